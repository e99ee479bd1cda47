"""EfficientNet: MBConv with SiLU, a sigmoid-gated squeeze-and-excitation and stochastic depth
before the residual add (the identity at inference, so the add lands in the project conv).
The SE block's mean is summed by the depthwise conv's epilogue, its two FC layers are one gate
kernel, and the project conv applies the gate as it loads its input."""
import pytest
import torch

import cnnfuse

from ..util import needs_triton, randomize_batchnorm, relative_error
from .harness import FP32_TOLERANCE, build, check_model

MODELS = [("torchvision", "efficientnet_b0", 9, 16), ("torchvision", "efficientnet_b3", 19, 26),
          ("timm", "efficientnet_b0", 9, 16)]


@pytest.mark.parametrize("source, name, adds, se", MODELS, ids=[f"{s}-{n}" for s, n, _, _ in MODELS])
def test_fuse(source, name, adds, se):
    report = check_model(build(source, name), size=64)
    assert report.coverage == 1.0, str(report)
    assert report.fused["residual add"] == adds
    assert report.fused["batchnorm folded"] == report.conv_sites - 2 * se  # SE convs have no BN
    assert report.fused["activation sigmoid"] == se
    assert report.fused["se gate"] == report.fused["se scale in next conv"] == se
    # the squeeze is summed by the depthwise conv that makes the block's input
    assert report.fused["se pool in conv epilogue"] == se


def _run(backend_name, monkeypatch, size):
    monkeypatch.setenv("CNNFUSE_BACKEND", backend_name)
    model = randomize_batchnorm(build("torchvision", "efficientnet_b0")).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        got = cnnfuse.fuse(model)(x.contiguous(memory_format=torch.channels_last))
    return relative_error(got, expected)


@needs_triton
def test_whole_model_on_the_triton_kernels(monkeypatch):
    """Every conv (grouped, SE-scaled, residual) and every SE gate through Triton, interpreted."""
    assert _run("triton", monkeypatch, 32) < 1e-4


def test_whole_model_on_the_cpp_kernels(monkeypatch):
    """Depthwise convs on the CPU build of the CUDA C++ kernel."""
    assert _run("cuda", monkeypatch, 64) < FP32_TOLERANCE


def test_state_dict_round_trip():
    """The SE gate's parameters live in the fused model's state_dict like any other."""
    fused = cnnfuse.fuse(randomize_batchnorm(build("torchvision", "efficientnet_b0")).eval())
    other = cnnfuse.fuse(build("torchvision", "efficientnet_b0").eval())
    other.load_state_dict(fused.state_dict())
    assert any(k.endswith("_se_gate.w1") for k in fused.state_dict())
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(other(x), fused(x))


def test_tf_same_padding_is_fused():
    """timm's tf_* models pad each stride-2 conv by the input's size (Conv2dSame): those convs
    fuse too, padding by each call's input size (an odd one here)."""
    report = check_model(build("timm", "tf_efficientnet_b0"), size=63, min_coverage=1.0)
    assert report.fused["tf 'same' padding in the conv"] > 0, str(report)
