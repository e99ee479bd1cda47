"""The main job's images: preprocessing equal to timm's and torchvision's own transforms on real
photographs, the overrides, bad folders and files, class names, and the agreement counts."""
import json

import pytest
import torch

from cnnfuse.bench import agreement, images, user_model

from .photos import copy_photos

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img")
    return folder, [folder / n for n in copy_photos(folder)]


def _theirs(transform, files):
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.parametrize("size", [None, 97], ids=["config", "size-97"])
def test_timm_model_preprocessed_as_timm_does(photos, size):
    folder, files = photos
    user = user_model.load("timm:resnet26d")
    pre = images.resolve(user.model, user.family, user.arch, size=size)
    assert pre.interpolation == "bicubic" and pre.size == (size or 224)
    cfg = timm.data.resolve_model_data_config(user.model)
    if size:
        cfg["input_size"] = (3, size, size)
    want = _theirs(timm.data.create_transform(**cfg), files[:3])
    got = images.load(files[:3], pre)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_torchvision_model_preprocessed_as_its_weights_say(photos):
    folder, files = photos
    user = user_model.load("resnet50")
    pre = images.resolve(user.model, user.family, user.arch)
    assert (pre.size, pre.resize) == (224, 232) and "IMAGENET1K_V2" in pre.source
    transform = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    want = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[:3]])
    assert torch.allclose(images.load(files[:3], pre), want, atol=1e-5)


def test_overrides_and_grey_photos(photos):
    folder, files = photos
    user = user_model.load("squeezenet1_1")
    pre = images.resolve(user.model, user.family, user.arch, size=40, mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.5, 1.0))
    assert "--size, --mean, --std given" in pre.source and pre.resize == 45
    grey = [f for f in files if f.name == "camera.png"]
    x = images.load(grey, pre)
    assert x.shape == (1, 3, 40, 40)
    # one grey channel, each normalised with its own mean and std
    pixels = x * torch.tensor([0.25, 0.5, 1.0]).view(3, 1, 1) + 0.5
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-6)
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-6)
    with pytest.raises(ValueError, match="--mean takes three numbers"):
        images.resolve(user.model, user.family, user.arch, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="--std takes three numbers.*each > 0"):
        images.resolve(user.model, user.family, user.arch, std=(0.5, -1, 0.5))


def test_unknown_config_says_imagenet_defaults():
    pre = images.resolve(torch.nn.Conv2d(3, 3, 1), "torchvision", "no_such_arch",
                         fallback_size=299)
    assert (pre.size, pre.resize) == (299, 341) and "ImageNet defaults" in pre.source


def test_folders_and_files(tmp_path):
    with pytest.raises(ValueError, match="--images .*no .jpg, .jpeg, .png files"):
        images.find(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "b.PNG").write_bytes(b"not an image")
    Image.new("RGBA", (30, 20), (255, 0, 0, 128)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 30), (0, 255, 0)).save(tmp_path / "c.jpeg")
    found = images.find(tmp_path)
    assert [f.name for f in found] == ["a.png", "b.PNG", "c.jpeg"]
    pre = images.Preprocess(16, 18, (0, 0, 0), (1, 1, 1), "bilinear", "test")
    with pytest.raises(ValueError, match="b.PNG' is not a readable image"):
        images.load(found, pre)
    x = images.load([found[0], found[2]], pre)
    assert x.shape == (2, 3, 16, 16)
    assert torch.allclose(x[0, 0], torch.ones(16, 16)) and x[0, 1:].abs().max() == 0
    assert torch.allclose(x[1, 1], torch.ones(16, 16), atol=0.02)


def test_labels(tmp_path):
    names, where = images.labels(None, 1000)
    assert names[0] == "tench" and where == "ImageNet class names"
    assert images.labels(None, 4) == (["class 0", "class 1", "class 2", "class 3"],
                                      "class indices")
    text = tmp_path / "names.txt"
    text.write_text("cat\ndog \nbird\n\n")
    assert images.labels(text, 3) == (["cat", "dog", "bird"], "from names.txt")
    with pytest.raises(ValueError, match="--labels .*names 3 classes; the model has 5"):
        images.labels(text, 5)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"1": ["n02", "dog"], "0": ["n01", "cat"]}))
    assert images.labels(index, 2)[0] == ["cat", "dog"]
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(["a", "b"]))
    assert images.labels(plain, 2)[0] == ["a", "b"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="--labels .*not valid JSON"):
        images.labels(bad, 2)
    with pytest.raises(ValueError, match="--labels .*no such file"):
        images.labels(tmp_path / "absent.txt", 2)


def test_agreement_counts_each_kind_of_difference():
    g = torch.Generator().manual_seed(0)
    unfused = torch.randn(5, 10, generator=g)
    fused = unfused.clone()
    order = unfused.argsort(dim=1, descending=True)
    fused[1, order[1, 1]] = unfused[1, order[1, 0]] + 1   # row 1: new top-1, same top-5
    fused[3, order[3, 6]] = unfused[3, order[3, 4]] + 0.01  # row 3: top-5 differs only
    fused[4] += 1e-3                                         # row 4: shifted, same ranks
    a = agreement.compare(unfused, fused, [f"im{i}" for i in range(5)])
    assert (a.images, a.top1_same, a.top5_same, a.k) == (5, 4, 4, 5)
    assert a.max_abs_diff == pytest.approx(float((fused - unfused).abs().max()))
    assert a.rows[1][1][0] != a.rows[1][2][0] and a.rows[0][1] == a.rows[0][2]
    text = agreement.side_by_side(a, [f"c{i}" for i in range(10)], first=3)
    assert text.count("DIFFERENT") == 1 and "and 2 more" in text
    assert "top-1 agreement 4/5 (80.0%)" in agreement.summary(a, "fp32")
    with pytest.raises(ValueError, match="for 4 images"):
        agreement.compare(unfused, fused, ["a"] * 4)
