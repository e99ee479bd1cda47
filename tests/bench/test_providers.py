"""The benchmark providers on the CPU: each builds the model it claims, the logit check
before timing can fail, and compiled providers run the fused model."""
import pytest
import torch
import torchvision
from torch import nn

from cnnfuse.bench import providers

from ..util import randomize_batchnorm


def _resnet18():
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


def _input(model):
    x = providers.example_input(2, 32, torch.float32, "cpu")
    return x, providers.reference_logits(model, x)


class _Untraceable(nn.Module):
    """Control flow on a tensor value: FX cannot trace the top level, its children can."""
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.body(x)
        return y if y.sum() > 0 else -y


@pytest.mark.parametrize("make_model", [_resnet18, lambda: randomize_batchnorm(_Untraceable())
                                        .eval()], ids=["traces", "children-trace"])
def test_cudnn_folded_has_no_batchnorm_and_same_logits(make_model):
    model = make_model()
    x, reference = _input(model)
    folded = providers.make("cudnn_folded", model, torch.float32, "cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "model was modified"
    with torch.no_grad():
        assert providers.relative_error(folded(x), reference) < 2e-5


def test_cnnfuse_provider_checked_before_timing():
    model = _resnet18()
    x, reference = _input(model)
    prepared = providers.prepare("cnnfuse", model, x, reference)
    assert prepared.max_rel_error < 2e-5
    assert prepared.replay is None and prepared.peak_mem_mb is None  # no GPU: nothing timed


def test_wrong_logits_fail_the_check(monkeypatch):
    model = _resnet18()
    x, reference = _input(model)
    real_make = providers.make
    monkeypatch.setattr(providers, "make", lambda *a: (lambda t: real_make(*a)(t) * 1.01))
    with pytest.raises(AssertionError, match="logits off by"):
        providers.prepare("cnnfuse", model, x, reference)
    # A baseline is reported, not judged.
    assert providers.prepare("cudnn", model, x, reference).max_rel_error > 1e-3


def test_unknown_provider():
    with pytest.raises(ValueError, match="unknown provider 'tensorrt'"):
        providers.make("tensorrt", _resnet18(), torch.float32, "cpu")


@pytest.mark.slow
def test_torch_compile_of_the_fused_model():
    """cnnfuse+inductor: inductor (freezing) compiles around the cnnfuse ops."""
    model = _resnet18()
    x, reference = _input(model)
    try:
        prepared = providers.prepare("cnnfuse+inductor", model, x, reference)
        assert prepared.max_rel_error < 2e-5
    finally:
        providers.release()


# --- on a GPU -------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("name", ["resnet50", "googlenet", "mobilenet_v2", "efficientnet_b0"])
def test_cnnfuse_needs_no_more_memory_than_eager(name):
    from cnnfuse.bench import zoo
    model = zoo.build(name)
    x = providers.example_input(32, 224, torch.float16, "cuda")
    reference = providers.reference_logits(model, x)
    peaks = {}
    for provider in ("cudnn", "cnnfuse"):
        prepared = providers.prepare(provider, model, x, reference)
        peaks[provider] = prepared.peak_mem_mb
        del prepared
        providers.release()
    assert peaks["cnnfuse"] <= peaks["cudnn"], peaks


@pytest.mark.cuda
@pytest.mark.parametrize("provider", providers.PROVIDERS)
def test_every_provider_runs_in_a_cuda_graph(provider):
    model = _resnet18()
    x = providers.example_input(4, 64, torch.float16, "cuda")
    reference = providers.reference_logits(model, x)
    try:
        prepared = providers.prepare(provider, model, x, reference)
        assert prepared.max_rel_error < providers.TOLERANCE[torch.float16]
        prepared.replay()
        torch.cuda.synchronize()
    finally:
        providers.release()


@pytest.mark.cuda
def test_graph_capture_on_the_first_call(tmp_path, monkeypatch):
    """No warm-up trick: a fused model captured before it ever ran (nothing tuned, nothing
    compiled) replays correctly, and tunes later outside the graph."""
    import cnnfuse
    monkeypatch.setenv("CNNFUSE_CACHE_DIR", str(tmp_path))
    model = _resnet18()
    fused = cnnfuse.fuse(model, dtype=torch.float16).cuda()
    x = providers.example_input(4, 64, torch.float16, "cuda")
    reference = providers.reference_logits(model, x)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = fused(x)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert providers.relative_error(y, reference) < providers.TOLERANCE[torch.float16]
    with torch.no_grad():
        assert providers.relative_error(fused(x), reference) < providers.TOLERANCE[torch.float16]
