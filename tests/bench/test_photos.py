"""The main job on a user's checkpoint and photographs (CPU): timm resnet26d with randomised
BatchNorm statistics and a classifier head fitted so that each photograph has its own class,
saved as a state_dict; `--size 128` keeps the run short (the preprocessing is otherwise the
model's timm config: bicubic, crop 0.875, ImageNet mean and std)."""
import json

import pytest
import torch

from cnnfuse.bench import zoo
from cnnfuse.bench.__main__ import main

from .photos import copy_photos

timm = pytest.importorskip("timm")
PIL = pytest.importorskip("PIL.Image")

SIZE = 128
CLASSES = (1, 151, 281, 409, 530, 817)  # one per photograph, in file-name order


@pytest.fixture(scope="module")
def photos_and_checkpoint(tmp_path_factory):
    """(photo folder, photo names, checkpoint path): the head is the random one plus a
    least-squares part that adds a margin to class CLASSES[i] for photo i, computed on
    timm's own transforms (so the main job must preprocess as timm does to predict them)."""
    root = tmp_path_factory.mktemp("photos")
    names = copy_photos(root / "images")
    torch.manual_seed(3)
    model = timm.create_model("resnet26d", pretrained=False)
    zoo.randomize_batchnorm(model, torch.Generator().manual_seed(5)).eval()
    cfg = dict(timm.data.resolve_model_data_config(model), input_size=(3, SIZE, SIZE))
    transform = timm.data.create_transform(**cfg)
    x = torch.stack([transform(PIL.open(root / "images" / n).convert("RGB")) for n in names])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True).double()
        spread = model(x).double().std()
        target = torch.zeros(len(names), model.num_classes, dtype=torch.float64)
        target[torch.arange(len(names)), torch.tensor(CLASSES)] = 10 * spread
        model.fc.weight += (torch.linalg.pinv(features) @ target).T.float()
        assert model(x).argmax(1).tolist() == list(CLASSES)
    checkpoint = root / "ck.pt"
    torch.save({"epoch": 7, "state_dict": model.state_dict()}, checkpoint)
    return root / "images", names, checkpoint


def test_checkpoint_and_photos_agree(photos_and_checkpoint, tmp_path, capsys):
    folder, names, checkpoint = photos_and_checkpoint
    assert main(["--model", "timm:resnet26d", "--checkpoint", str(checkpoint), "--images",
                 str(folder), "--size", str(SIZE), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ck.pt (state_dict under 'state_dict')" in out
    assert f"images: {len(names)} from {folder}" in out
    assert "bicubic" in out and "timm's pretrained config of resnet26d; --size given" in out
    assert f"top-1 agreement {len(names)}/{len(names)} (100.0%)" in out
    assert f"top-5 agreement {len(names)}/{len(names)} (100.0%)" in out
    for name in names:  # side by side: every photograph's row, same class both sides
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert "DIFFERENT" not in row
    doc = json.loads((tmp_path / "timm_resnet26d_b2_fp32.json").read_text())
    got = doc["images"]
    assert got["images"] == len(names) and got["top1_agreement"] == 1.0
    assert got["top5_agreement"] == 1.0
    # the checkpoint's fitted classes: its weights were loaded, the photos preprocessed as
    # timm does, and in file-name order
    assert [p["unfused"][0] for p in got["predictions"]] == list(CLASSES)
    assert [p["fused"][0] for p in got["predictions"]] == list(CLASSES)
    assert [p["image"] for p in got["predictions"]] == names
    # fp32 folding and reassociation only: far below the logits' scale, and not zero
    # (BatchNorm is folded, so bit-identical logits would mean the fused model did not run)
    assert 0 < got["max_abs_logit_diff"] <= 1e-4 * got["max_abs_logit"]
    assert doc["max_rel_error"] < 1e-4 and doc["batch"] == 2 and doc["batch_asked"] == 64


def test_labels_file_names_the_predictions(photos_and_checkpoint, tmp_path, capsys):
    folder, names, checkpoint = photos_and_checkpoint
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing-{i}" for i in range(1000)) + "\n")
    assert main(["--model", "timm/resnet26d", "--checkpoint", str(checkpoint), "--images",
                 str(folder), "--size", "32", "--labels", str(labels), "--cpu-batch", "6",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "class names: from labels.txt" in out and "batch 6, not the 64 asked" in out
    assert "thing-" in out
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    assert main(["--model", "timm/resnet26d", "--images", str(folder), "--size", "32",
                 "--labels", str(short), "--out", str(tmp_path)]) == 2
    assert "--labels" in capsys.readouterr().err


def test_pickled_model_needs_trust(tmp_path, capsys):
    torch.manual_seed(0)
    import torchvision
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.squeezenet1_1(), whole)
    assert main(["--model", "squeezenet1_1", "--checkpoint", str(whole)]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "weights_only=True" in err
