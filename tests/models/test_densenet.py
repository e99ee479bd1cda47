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


# --- hazards: each was once fused wrongly ------------------------------------------------------

class GateThenPreAct(nn.Module):
    """conv(relu(bn(x · g))): the SE gate comes before the BatchNorm."""
    def __init__(self, c=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, 6, 3, padding=1)

    def forward(self, x):
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.conv(torch.relu(self.bn(x * g)))


class InputChangedInPlace(nn.Module):
    """The conv must read x as the BatchNorm saw it, before the in-place multiply."""
    def __init__(self, c=8):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = x * 1.0
        y = torch.relu(self.bn(x))
        x.mul_(2.0)
        return self.conv(y) + x


@pytest.mark.parametrize("model", [GateThenPreAct, InputChangedInPlace],
                         ids=lambda m: m.__name__)
def test_prologue_hazard(model):
    m = randomize_batchnorm(model()).eval()
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        assert relative_error(cnnfuse.fuse(m)(x.clone()), m(x.clone())) < 2e-5


def test_prologue_stays_float32_in_a_half_model():
    """The shift cancels against x · scale: in fp16 it would lose what eager BatchNorm keeps
    (here it would overflow to -inf)."""
    model = PreAct().eval()
    with torch.no_grad():
        model.bn1.running_mean.fill_(2000.0)
        model.bn1.running_var.fill_(1e-4)
    fused = cnnfuse.fuse(model, dtype=torch.float16)
    assert fused.conv1.input_affine.dtype == torch.float32
    assert torch.isfinite(fused.conv1.input_affine).all()
    fused = fused.to(torch.bfloat16)
    assert fused.conv1.input_affine.dtype == torch.float32
