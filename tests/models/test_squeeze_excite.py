"""Squeeze-and-excitation wherever it appears: the mean summed by the conv that produces the
block's input, the two FC layers in one gate kernel, the scale in the consuming conv's load;
and the in-place writes that must keep each of those moves from happening."""
import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse.models.modules import FusedConv2d
from cnnfuse.models.modules import FusedSqueezeExcite

from ..util import randomize_batchnorm, relative_error


class Block(nn.Module):
    """conv-BN-SiLU → SE (mean, FC, ReLU, FC, sigmoid) → scale → 1x1 conv; `hazard` puts an
    in-place write of the conv's output at one of three places."""

    def __init__(self, hazard: str = "", channels: int = 12):
        super().__init__()
        self.hazard = hazard
        self.conv = nn.Conv2d(8, channels, 3, padding=1, groups=4, bias=False)
        self.bn, self.act = nn.BatchNorm2d(channels), nn.SiLU()
        self.fc1, self.fc2 = nn.Conv2d(channels, 4, 1), nn.Conv2d(4, channels, 1)
        self.proj = nn.Conv2d(channels, 6, 1)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        if self.hazard == "before pool":
            y.mul_(2.0)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        if self.hazard == "before scale":
            y.add_(1.0)
        scaled = y * gate
        if self.hazard == "after scale":
            y.sub_(3.0)  # the product is a new tensor: the consumer must not read y instead
            return self.proj(scaled) + y.mean()
        return self.proj(scaled)


def _run(model, backend_name=None, monkeypatch=None):
    model = randomize_batchnorm(model).eval()
    if backend_name:
        monkeypatch.setenv("CNNFUSE_BACKEND", backend_name)
    x = torch.randn(3, 8, 7, 5)
    with torch.no_grad():
        expected = model(x.clone())
        fused = cnnfuse.fuse(model)
        got = fused(x.clone().contiguous(memory_format=torch.channels_last))
    return relative_error(got, expected), cnnfuse.explain(model), fused


@pytest.mark.parametrize("backend_name", ["reference", "triton", "cuda"])
def test_whole_block_fuses(backend_name, monkeypatch):
    from ..util import triton_runnable
    if backend_name == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    err, report, fused = _run(Block(), backend_name, monkeypatch)
    assert err < 2e-5
    for what in ("se gate", "se scale in next conv", "se pool in conv epilogue"):
        assert report.fused[what] == 1, str(report)
    producer = [m for m in fused.modules() if isinstance(m, FusedConv2d) and m.returns_pooled]
    assert len(producer) == 1 and producer[0].groups == 4
    se = [m for m in fused.modules() if isinstance(m, FusedSqueezeExcite)]
    assert len(se) == 1 and se[0].takes_pooled


@pytest.mark.parametrize("hazard", ["before pool", "before scale", "after scale"])
def test_in_place_writes_keep_the_eager_order(hazard):
    err, report, _ = _run(Block(hazard))
    assert err < 2e-5, f"{hazard}: fused output differs by {err:.2e}"
    if hazard in ("before pool", "before scale"):  # the mean is not taken where y is made
        assert report.fused["se pool in conv epilogue"] == 0


def test_pool_only_where_the_conv_is_called_once():
    class Twice(Block):
        def forward(self, x):
            y = self.act(self.bn(self.conv(x)))
            gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            return self.proj(y * gate) + self.conv(x).mean()
    err, report, _ = _run(Twice())
    assert err < 2e-5 and report.fused["se pool in conv epilogue"] == 0


class ResidualTail(nn.Module):
    """conv → SE → scale → + identity → ReLU (an SE-ResNet block's tail); `hazard` as above."""

    def __init__(self, hazard: str = ""):
        super().__init__()
        self.hazard = hazard
        self.block = Block(channels=8)
        self.inp = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        b = self.block
        identity = self.inp(x)
        y = b.act(b.bn(b.conv(identity)))
        gate = torch.sigmoid(b.fc2(torch.relu(b.fc1(y.mean((2, 3), keepdim=True)))))
        scaled = y * gate
        if self.hazard == "write before add":
            y.mul_(0.5)
            return self.relu(scaled + identity) + y.mean()
        if self.hazard == "add into identity":
            keep = identity  # the same tensor: the in-place add changes it too
            identity.add_(scaled)  # (FX traces `+=` as an out-of-place add)
            return self.relu(identity) + keep.mean()
        return self.relu(scaled + identity)


@pytest.mark.parametrize("backend_name", ["reference", "cuda"])
def test_residual_tail_is_one_pass(backend_name, monkeypatch):
    """Gate, add and ReLU in one bias_act call (the C++ kernel's CPU build under "cuda")."""
    err, report, fused = _run(ResidualTail(), backend_name, monkeypatch)
    assert err < 2e-5
    assert report.fused["se scale + residual add + relu"] == 1, str(report)
    code = fused.code
    assert code.count("channel_scale(") == 1 and "self.relu" not in code and " add" not in code


@pytest.mark.parametrize("hazard", ["write before add", "add into identity"])
def test_residual_tail_hazards(hazard):
    err, report, _ = _run(ResidualTail(hazard))
    assert err < 2e-5, f"{hazard}: fused output differs by {err:.2e}"
    assert report.fused["se scale + residual add + relu"] == 0


def test_gate_module_checks_its_input():
    se = FusedSqueezeExcite(12, 4, "relu", "sigmoid")
    se.takes_pooled = True
    with pytest.raises(ValueError, match="expected \\(N, C\\) means"):
        se(torch.randn(2, 12, 3, 3))


class SeparableThenSE(nn.Module):
    """depthwise → 1x1 → SE → 1x1: the 1x1 returns the mean, so it stays apart from the
    depthwise conv (a depthwise + 1x1 pair has one output)."""

    def __init__(self):
        super().__init__()
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.fc1, self.fc2 = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.proj = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = self.bn2(self.pw(torch.relu(self.bn1(self.dw(x)))))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.proj(y * gate)


class AddIntoView(nn.Module):
    """An SE tail whose in-place add writes into a view of another tensor."""

    def __init__(self):
        super().__init__()
        self.block = Block(channels=8)
        self.other = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        b = self.block
        y = b.act(b.bn(b.conv(x)))
        gate = torch.sigmoid(b.fc2(torch.relu(b.fc1(y.mean((2, 3), keepdim=True)))))
        big = self.other(x) * 1.0
        big.narrow(1, 0, 8).add_(y * gate)  # eager writes into big's first 8 channels
        return big


class ViewAfterScale(nn.Module):
    """A `.view` of the gated tensor (SE-ResNet's tail, then a flatten)."""

    def __init__(self):
        super().__init__()
        self.block = Block(channels=8)

    def forward(self, x):
        b = self.block
        y = b.act(b.bn(b.conv(x)))
        gate = torch.sigmoid(b.fc2(torch.relu(b.fc1(y.mean((2, 3), keepdim=True)))))
        out = torch.relu(y * gate + x)
        return out.view(out.shape[0], -1)


# (eager's own .view of a channels_last result fails, so ViewAfterScale takes NCHW only)
@pytest.mark.parametrize("model, layout", [
    (SeparableThenSE, "nchw"), (SeparableThenSE, "nhwc"), (AddIntoView, "nchw"),
    (AddIntoView, "nhwc"), (ViewAfterScale, "nchw")], ids=lambda v: getattr(v, "__name__", v))
def test_review_hazards(model, layout):
    m = randomize_batchnorm(model()).eval()
    x = torch.randn(3, 8, 7, 5)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = m(x.clone()), cnnfuse.fuse(m)(x.clone())
    assert relative_error(got, expected) < 2e-5
