"""Channel gates other than squeeze-and-excitation: x * g(mean_hw(x)) with g any computation
on the (N, C) means (ECA's 1-D conv, the effective SE's one 1x1 conv, a gate of several ops,
mean + max): the mean summed by the conv that makes x, the product in the consuming conv's
load, g itself run as written. Every fused output against the unfused model in float64 on
randomised BatchNorm statistics, odd sizes; and the blocks that are not such a gate left
alone."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse
from cnnfuse.models.modules import FusedConv2d, FusedSqueezeExcite
from cnnfuse.models.modules.channel_gate import ChannelGate

from ..util import assert_mean_of, randomize_batchnorm, relative_error

timm = pytest.importorskip("timm")

C = 12


class HandEca(nn.Module):
    """ECA as the paper writes it: mean → (N, 1, C) → Conv1d(k, padding k // 2) → sigmoid."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(x, 1).squeeze(-1).transpose(-1, -2)
        y = torch.sigmoid(self.conv(y)).transpose(-1, -2).unsqueeze(-1)
        return x * y


class MultiOpGate(nn.Module):
    """conv1d → relu → conv1d → sigmoid on the means (kept (N, C, 1, 1) by keepdim)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(1, 2, 3, padding=1), nn.Conv1d(2, 1, 5, padding=2)

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        y = x.mean((2, 3), keepdim=True).view(n, 1, c)
        y = torch.sigmoid(self.c2(torch.relu(self.c1(y))))
        return y.view(n, c, 1, 1) * x


def _eca():
    from timm.layers import EcaModule
    return EcaModule(C, kernel_size=5)


def _ceca():
    from timm.layers import CecaModule
    return CecaModule(C, kernel_size=3)


def _eca_mlp():
    from timm.layers import EcaModule
    return EcaModule(C, kernel_size=3, use_mlp=True)


def _ese(add_maxpool=False):
    from timm.layers.squeeze_excite import EffectiveSEModule
    return EffectiveSEModule(C, add_maxpool=add_maxpool)


class Block(nn.Module):
    """conv-BN-SiLU → attention → [1x1 conv | · 0.5 + shortcut → ReLU]."""

    def __init__(self, attn: nn.Module, tail: str = "conv"):
        super().__init__()
        self.tail = tail
        self.conv = nn.Conv2d(8, C, 3, padding=1, bias=False)
        self.bn, self.act = nn.BatchNorm2d(C), nn.SiLU()
        self.attn = attn
        self.proj = nn.Conv2d(C, 6, 1)
        self.short = nn.Conv2d(8, C, 1)

    def forward(self, x):
        y = self.attn(self.act(self.bn(self.conv(x))))
        if self.tail == "residual":
            # a shortcut no conv epilogue makes, so the add stays with the product
            return torch.relu(y * 0.5 + F.avg_pool2d(self.short(x), 3, 1, 1))
        return self.proj(y)


def _check(model, size=(7, 5)):
    """(error of the fused fp32 model against the unfused one in float64, report, fused)."""
    model = randomize_batchnorm(model).eval()
    x = torch.randn(3, 8, *size)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        fused = cnnfuse.fuse(model)
        got = fused(x.clone().contiguous(memory_format=torch.channels_last))
        eager = model(x)
    # within a few times eager's own float32 error
    err, eager_err = relative_error(got, want), relative_error(eager, want)
    assert err <= 4 * eager_err + 1e-6, f"fused {err:.2e}, eager fp32 {eager_err:.2e}"
    return err, cnnfuse.explain(model), fused


def _cbam_channel():
    """CBAM's channel attention: one MLP on the mean and on the max, summed, then sigmoid."""
    from timm.layers.cbam import ChannelAttn
    return ChannelAttn(C, rd_ratio=0.5)


GATES = {"hand eca": HandEca, "timm eca": _eca, "timm ceca": _ceca, "timm eca mlp": _eca_mlp,
         "ese": _ese, "multi-op": MultiOpGate, "mean+max": lambda: _ese(add_maxpool=True),
         "cbam channel": _cbam_channel}


@pytest.mark.parametrize("name", list(GATES))
def test_gate_fuses_around_its_function(name):
    _, report, fused = _check(Block(GATES[name]()))
    for key in ("channel gate", "channel gate scale in next conv",
                "channel gate pool in conv epilogue"):
        assert report.fused[key] == 1, f"{key}\n{report}"
    gates = [m for m in fused.modules() if isinstance(m, ChannelGate)]
    assert len(gates) == 1 and gates[0].takes_pooled
    assert not any(isinstance(m, FusedSqueezeExcite) for m in fused.modules())
    code = fused.code
    assert " * " not in code and ".mean(" not in code, code
    if name in ("mean+max", "cbam channel"):  # the max is computed from x inside the gate, eagerly
        assert "amax" in gates[0].body.code


def test_residual_tail_and_scalar_factor():
    """x * gate * 0.5 + shortcut → ReLU: the factor folds into the gate, and one channel_scale
    pass takes the product, the add and the ReLU."""
    _, report, fused = _check(Block(_eca(), tail="residual"), size=(9, 6))
    assert report.fused["channel gate scale + residual add + relu"] == 1, str(report)
    assert report.fused["activation relu"] == 1
    assert fused.code.count("channel_scale(") == 1 and " * " not in fused.code


def test_gate_activation_is_listed():
    """The gate's sigmoid runs on N·C values inside the gate: counted and listed, not lost."""
    report = cnnfuse.explain(randomize_batchnorm(Block(_eca())).eval())
    reasons = [why for _, why in report.unfused if "channel gate" in why]
    assert len(reasons) == 1 and reasons[0].startswith("Sigmoid"), str(report)
    assert report.activation_sites == report.activations_absorbed + 1


class ReadsX(nn.Module):
    """The gate reads x itself (a corner of it), not only its mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        n, c = x.shape[:2]
        y = self.conv(x.mean((2, 3)).view(n, 1, c)).view(n, c, 1, 1)
        return x * torch.sigmoid(y + x[:, :, :1, :1])


class ReadsOther(nn.Module):
    """The gate reads another feature map (the block's input, whole)."""

    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(C, C, 1)

    def forward(self, x):
        g = torch.sigmoid(x.mean((2, 3), keepdim=True) + self.other(x).amax(1, keepdim=True))
        return x * g


class NotPerChannel(nn.Module):
    """A gate shared by the whole batch, (1, C, 1, 1): no per-image (N, C) scale."""

    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True).mean(0, keepdim=True))


class ReadsSpatialParameter(nn.Module):
    """The gate adds a learned (1, C, H, W) map to the means: a gate of size H x W."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, C, 5, 7))

    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True) + self.pos)


class WritesX(nn.Module):
    """x written between the mean and the product: the mean must be of x before the write."""

    def forward(self, x):
        g = torch.sigmoid(x.mean((2, 3), keepdim=True))
        x.mul_(2.0)
        return x * g


class GateReadTwice(nn.Module):
    """The gate's value also leaves the block."""

    def forward(self, x):
        g = torch.sigmoid(x.mean((2, 3), keepdim=True))
        return x * g + g


@pytest.mark.parametrize("attn", [ReadsX, ReadsOther, ReadsSpatialParameter, NotPerChannel,
                                  WritesX, GateReadTwice],
                         ids=lambda c: c.__name__)
def test_not_a_channel_gate_is_left_alone(attn):
    _, report, fused = _check(Block(attn()), size=(5, 7))
    assert report.fused["channel gate"] == 0, str(report)
    assert not any(isinstance(m, ChannelGate) for m in fused.modules())


def test_pooled_epilogue_mean_is_the_mean():
    """The mean the producing conv sums (float32 accumulation) against x's float64 mean."""
    fused = cnnfuse.fuse(randomize_batchnorm(Block(_eca())).eval())
    conv = next(m for m in fused.modules() if isinstance(m, FusedConv2d) and m.returns_pooled)
    x = torch.randn(2, 8, 11, 13).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, pooled = conv(x)
    assert_mean_of(pooled, y)


def test_gate_module_checks_its_inputs():
    fused = cnnfuse.fuse(randomize_batchnorm(Block(_eca())).eval())
    gate = next(m for m in fused.modules() if isinstance(m, ChannelGate))
    x = torch.randn(2, C, 3, 3)
    with pytest.raises(ValueError, match="pooled=None"):
        gate(x)
    with pytest.raises(ValueError, match="pooled has shape"):
        gate(x, torch.randn(2, C + 1))
    assert gate(x, x.mean((2, 3))).shape == (2, C)


def test_se_blocks_keep_the_se_gate_kernel():
    from timm.layers import SqueezeExcite
    _, report, fused = _check(Block(SqueezeExcite(C, rd_ratio=0.25)))
    assert report.fused["se gate"] == 1 and report.fused["channel gate"] == 0, str(report)


# name: (gates fused, activations absorbed, of all); the rest are the gates' sigmoids
MODELS = {"eca_nfnet_l0": (12, (52, 64)), "ecaresnet26t": (8, (27, 35))}


# eca_nfnet_l0 takes half a minute on two busy cores: slow; ecaresnet26t stays in the quick set
@pytest.mark.parametrize("name", [pytest.param("eca_nfnet_l0", marks=pytest.mark.slow),
                                  "ecaresnet26t"])
def test_timm_eca_models(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = cnnfuse.fuse(model)(x.contiguous(memory_format=torch.channels_last))
    err = relative_error(got, want)
    report = cnnfuse.explain(model)
    assert err < 1e-5, f"{name}: {err:.2e}\n{report}"
    gates, acts = MODELS[name]
    assert report.fused["channel gate"] == report.fused["channel gate pool in conv epilogue"] \
        == gates, str(report)
    assert (report.activations_absorbed, report.activation_sites) == acts, str(report)
    kept = [why for _, why in report.unfused if why.startswith(("Sigmoid", "SiLU"))]
    assert len(kept) == acts[1] - acts[0] and all("channel gate" in w for w in kept), str(report)
    assert not any("product of two tensors" in why for _, why in report.unfused), str(report)


@pytest.mark.parametrize("backend_name", ["reference", "triton", "cuda"])
def test_each_backend(backend_name, monkeypatch):
    """The pooled epilogue and the scaled load on each conv backend (Triton interpreted, the
    C++ kernels' CPU build under "cuda")."""
    from ..util import triton_runnable
    if backend_name == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("CNNFUSE_BACKEND", backend_name)
    _, report, _ = _check(Block(HandEca(k=5)))
    assert report.fused["channel gate pool in conv epilogue"] == 1, str(report)


@pytest.mark.parametrize("name", ["timm eca", "ese", "mean+max"])
def test_bfloat16_within_eager_error(name):
    """In bfloat16 the gate takes the float32 mean rounded to bfloat16, as eager's mean is:
    the fused model is as close to float64 as eager bfloat16 is."""
    model = randomize_batchnorm(Block(GATES[name]())).eval()
    x = torch.randn(2, 8, 7, 5)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        eager = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))
        fused = cnnfuse.fuse(model, dtype=torch.bfloat16)
        got = fused(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) <= 2 * relative_error(eager, want) + 1e-3
    assert any(isinstance(m, ChannelGate) and m.takes_pooled for m in fused.modules())


class Spelled(nn.Module):
    """One ECA gate, its mean spelled one of the ways models write it."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling, self.pool = spelling, nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        n, c = x.size(0), x.size(1)
        if self.spelling == "module":
            m = self.pool(x)
        elif self.spelling == "torch.mean":
            m = torch.mean(x, dim=(-2, -1), keepdim=True)
        else:
            m = x.mean(dim=[3, 2])
        return torch.mul(x, torch.sigmoid(self.conv(m.reshape(n, 1, c))).reshape(n, c, 1, 1))


@pytest.mark.parametrize("spelling", ["module", "torch.mean", "method"])
def test_mean_spellings(spelling):
    _, report, _ = _check(Block(Spelled(spelling)))
    assert report.fused["channel gate pool in conv epilogue"] == 1, str(report)
