"""The main job's model loading: names from torchvision and timm, state_dict checkpoints in the
shapes training scripts save them, whole pickled models only on request, and clear errors."""
import pytest
import torch

from cnnfuse.bench import user_model, zoo

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name, family, arch", [
    ("resnet50", "torchvision", "resnet50"),
    ("googlenet", "torchvision", "googlenet"),
    ("timm:resnet26d", "timm", "resnet26d"),
    ("timm/inception_v4", "timm", "inception_v4"),
    ("resnet26d", "timm", "resnet26d"),       # torchvision lacks it, timm has it
    (" mobilenet_v3_small ", "torchvision", "mobilenet_v3_small"),
    ("cnnfuse/nin", "cnnfuse", "nin"),
])
def test_names_resolve(name, family, arch):
    assert user_model.resolve(name) == (family, arch)


@pytest.mark.parametrize("name, says", [
    ("fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
    ("timm:resnet26x", "did you mean"),
    ("", "--model must be a model name"),
    ("cnnfuse/no_such_seed", "cnnfuse.models.architectures has .*nin"),
])
def test_bad_names_are_named(name, says):
    with pytest.raises(ValueError, match=says):
        user_model.resolve(name)


def test_zoo_names_build_the_zoo_models():
    got = user_model.load("squeezenet1_1").model
    want = zoo.build("squeezenet1_1")
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k


def test_every_zoo_name_resolves():
    for name in zoo.ZOO:
        family, arch = user_model.resolve(name)
        assert name.endswith(arch) and family in ("torchvision", "timm", "cnnfuse")


def test_seed_architecture_checkpoint_loads(tmp_path):
    trained = zoo.build("cnnfuse/nin")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.save(trained.state_dict(), tmp_path / "nin.pt")
    got = user_model.load("cnnfuse/nin", tmp_path / "nin.pt")
    assert got.family == "cnnfuse" and _same_weights(got.model, trained)


def _trained(name="mobilenet_v3_small", **kwargs):
    """A model with weights and BatchNorm statistics unlike any fresh build's."""
    torch.manual_seed(11)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    zoo.randomize_batchnorm(model, torch.Generator().manual_seed(12))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap, where", [
    (lambda sd: sd, "(state_dict)"),
    (lambda sd: {"state_dict": sd, "epoch": 3}, "under 'state_dict'"),
    (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
     "under 'model', 'module.' prefix dropped"),
    (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, "'_orig_mod.' prefix dropped"),
], ids=["plain", "nested", "data-parallel", "compiled"])
def test_state_dict_checkpoints_load(tmp_path, wrap, where):
    trained = _trained()
    path = tmp_path / "ck.pt"
    torch.save(wrap(trained.state_dict()), path)
    got = user_model.load("mobilenet_v3_small", path)
    assert where in got.weights and got.family == "torchvision"
    assert _same_weights(got.model, trained) and not got.model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(got.model(x), trained(x))


def test_googlenet_checkpoint_with_aux_heads_loads(tmp_path):
    trained = _trained("googlenet", aux_logits=True, init_weights=False)
    torch.save(trained.state_dict(), tmp_path / "g.pt")
    got = user_model.load("googlenet", tmp_path / "g.pt").model
    assert not hasattr(got, "aux1") or got.aux1 is None
    assert torch.equal(got.fc.weight, trained.fc.weight)


def test_num_classes_for_a_checkpoint_with_its_own_head(tmp_path):
    trained = _trained(num_classes=10)
    path = tmp_path / "ten.pt"
    torch.save(trained.state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch: classifier.3.weight.*--num-classes"):
        user_model.load("mobilenet_v3_small", path)
    got = user_model.load("mobilenet_v3_small", path, num_classes=10).model
    assert _same_weights(got, trained)
    with pytest.raises(ValueError, match="--num-classes must be a positive integer"):
        user_model.load("mobilenet_v3_small", path, num_classes=0)


def _squeezenet_state(kind):
    if kind == "no-weights":
        return {"epoch": 3, "lr": 0.1}
    if kind == "other-arch":
        return torchvision.models.squeezenet1_0().state_dict()
    state = dict(torchvision.models.squeezenet1_1().state_dict())
    if kind == "missing":
        del state["classifier.1.bias"]
    else:
        state["extra.weight"] = torch.zeros(3)
    return state


@pytest.mark.parametrize("kind, says", [
    ("no-weights", "no state_dict in it .*epoch, lr"),
    ("other-arch", "does not fit the architecture: .*shape mismatch"),
    ("missing", "missing: classifier.1.bias"),
    ("unexpected", "unexpected: extra.weight"),
])
def test_checkpoints_that_do_not_fit_are_named(tmp_path, kind, says):
    path = tmp_path / "ck.pt"
    torch.save(_squeezenet_state(kind), path)
    with pytest.raises(ValueError, match="--checkpoint .*" + says):
        user_model.load("squeezenet1_1", path)


def test_unreadable_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pt' could not be read by torch.load"):
        user_model.load("squeezenet1_1", truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for trust in (False, True):  # not a pickle at all: nothing to trust
        with pytest.raises(ValueError, match="notes.pt' could not be read by torch.load: not a"):
            user_model.load("squeezenet1_1", text, trust_pickle=trust)


def test_pickled_model_only_with_trust(tmp_path):
    trained = _trained("squeezenet1_1")
    path = tmp_path / "whole.pt"
    torch.save(trained, path)
    with pytest.raises(ValueError, match="not a plain state_dict: it pickles torchvision.models."
                                         "squeezenet.SqueezeNet.*--trust-pickle") as refused:
        user_model.load("squeezenet1_1", path)
    assert "\x1b" not in str(refused.value)  # torch's own message has bold escapes
    with pytest.warns(UserWarning, match="weights_only=False"):
        got = user_model.load("squeezenet1_1", path, trust_pickle=True)
    assert got.family == "pickle" and "SqueezeNet" in got.weights
    assert _same_weights(got.model, trained)
    torch.save([1, 2], tmp_path / "list.pt")  # weights_only loads it, but it is no model
    with pytest.raises(TypeError, match="holds a list"):
        user_model.load("squeezenet1_1", tmp_path / "list.pt")
