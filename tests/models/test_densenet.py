"""DenseNet and pre-activation blocks: a BatchNorm (+ activation) before a conv moves into
the conv's load stage; each dense block is one buffer (see test_concat)."""
import pytest
import torch
from torch import nn

import cnnfuse

from ..util import randomize_batchnorm, relative_error, triton_runnable
from .harness import build, check_model


def test_fuse_densenet121():
    report = check_model(build("torchvision", "densenet121"), size=64)
    assert report.coverage == 1.0, str(report)
    # every dense layer's norm1 + relu1 and every transition's norm + relu become the next
    # conv's prologue; only the last norm (before the pool) stays
    assert report.fused["batchnorm + act in conv's load"] == 58 + 3
    assert [site for site, _ in report.unfused] == ["features.norm5"]
    assert report.fused["batchnorm folded"] == 58 + 1


class PreAct(nn.Module):
    """A pre-activation residual block: BN → ReLU → 3x3 conv (padded) twice, and a BN read
    twice, which must stay."""
    def __init__(self, c=6):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn3, self.conv3 = nn.BatchNorm2d(c), nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x))) + x
        z = self.conv2(nn.functional.silu(self.bn2(y)))
        w = self.bn3(y)
        return z, self.conv3(w), w


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_pre_activation_block(mode, backend):
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    model = randomize_batchnorm(PreAct()).eval()
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, fused = model(x), cnnfuse.fuse(model)
        got = fused(x)
    assert all(relative_error(g, e) < 2e-5 for g, e in zip(got, expected))
    report = cnnfuse.explain(model)
    assert report.fused["batchnorm + act in conv's load"] == 2
    assert [site for site, _ in report.unfused] == ["bn3"]
    assert fused.conv2.input_activation == "silu" and fused.conv1.has_residual


def test_pre_activation_state_dict_round_trips():
    model = randomize_batchnorm(PreAct()).eval()
    fused = cnnfuse.fuse(model)
    other = cnnfuse.fuse(randomize_batchnorm(PreAct(), torch.Generator().manual_seed(5)).eval())
    other.load_state_dict(fused.state_dict())
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(other(x), fused(x)))
