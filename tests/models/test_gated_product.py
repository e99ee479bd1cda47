"""The attention product (1 + M) * T as one call with eager's rounding, in each spelling,
against the unfused block in float64; a sum read elsewhere, or written in between, stays."""
import copy

import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse.models.architectures.residual_attention import AttentionModule
from cnnfuse.models.modules.gate import one_plus_gate
from cnnfuse.models.passes.gated_product import KEY

from ..util import assert_within_torch_error, randomize_batchnorm, relative_error


class _Gate(nn.Module):
    """conv trunk, sigmoid-conv mask, the product spelled as `form`, then a conv."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.trunk = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.mask = nn.Sequential(nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6), nn.Sigmoid())
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        t, m = self.trunk(x), self.mask(x)
        if self.form == "left":
            y = (1 + m) * t
        elif self.form == "right":
            y = t * (m + 1)
        elif self.form == "torch":
            y = torch.mul(torch.add(m, 1), t)
        elif self.form == "shared":  # the sum is read twice: it stays
            s = 1 + m
            return self.out(s * t) + s.sum()
        else:  # m changed in place between the sum and the product: it stays
            s = 1 + m
            m.mul_(2)
            y = s * t
        return self.out(y)


def _check(model, x):
    model = randomize_batchnorm(model).eval()
    with torch.no_grad():
        same = model(x)
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
        want = copy.deepcopy(model).double()(x.double())
    assert_within_torch_error(got, same, want)
    assert relative_error(got, want) < 2e-5
    return cnnfuse.explain(model)


@pytest.mark.parametrize("form", ["left", "right", "torch"])
def test_product_in_one_pass(form):
    torch.manual_seed(0)
    report = _check(_Gate(form), torch.randn(2, 5, 7, 9))
    assert report.fused[KEY] == 1, str(report)
    assert any("one elementwise pass" in r for _, r in report.unfused), str(report)


@pytest.mark.parametrize("form", ["shared", "written"])
def test_product_stays(form):
    torch.manual_seed(0)
    report = _check(_Gate(form), torch.randn(2, 5, 7, 9))
    assert report.fused[KEY] == 0, str(report)


def test_attention_module():
    """An attention module of depth 2 (odd size): its one product in one pass, every
    BatchNorm folded or in a load, every activation absorbed; the up-samplings and skip add
    listed as eager."""
    torch.manual_seed(0)
    report = _check(AttentionModule(8, 2), torch.randn(1, 8, 11, 9))
    assert report.fused[KEY] == 1, str(report)
    assert report.bn_folded == report.batchnorms, str(report)
    assert report.activations_absorbed == report.activation_sites, str(report)
    reasons = [r for _, r in report.unfused]
    assert sum("bilinear up-sampling runs eager" in r for r in reasons) == 2, str(report)
    assert sum("add of two tensors runs eager" in r for r in reasons) == 1, str(report)


def test_one_plus_gate_falls_back():
    """Mixed dtypes and numbers compute as written."""
    t, m = torch.randn(2, 3), torch.rand(2, 3, dtype=torch.float64)
    assert torch.equal(one_plus_gate(t, m), (1 + m) * t)
    assert one_plus_gate(3, 2) == 9
    x = torch.randn(2, 3, 4, 5)
    g = torch.rand(2, 3, 1, 1)  # broadcast as the product is
    assert torch.allclose(one_plus_gate(x, g), (1 + g) * x, rtol=1e-6, atol=1e-7)


class _InfTrunk(nn.Module):
    """A trunk that overflows to ±inf and a mask in (-1, 0] (a sigmoid's 0, a tanh's -0.5):
    eager gives ±inf, never NaN."""

    def __init__(self, mask: str):
        super().__init__()
        self.mask, self.c = mask, nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        t = self.bn(self.c(x)) * 1e38 * 1e38
        y = self.c(x)
        m = torch.sigmoid(y * 0 - 200) if self.mask == "zero" else torch.tanh(y * 0 - 0.55)
        return (1 + m) * t


@pytest.mark.parametrize("mask", ["zero", "negative"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_product_is_eager_bit_for_bit(mask, layout):
    torch.manual_seed(3)
    model = randomize_batchnorm(_InfTrunk(mask)).eval()
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=layout)
    with torch.no_grad():
        same, got = model(x), cnnfuse.fuse(model)(x)
    assert cnnfuse.explain(model).fused[KEY] == 1
    assert not got.isnan().any() and got.isinf().all()
    assert torch.equal(got, same)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_plus_gate_rounds_as_eager(dtype):
    """(1 + m) rounded, then the product: not t + m·t; a broadcast mask as written."""
    torch.manual_seed(4)
    t = torch.randn(3, 5, 7, 9).to(dtype)
    m = (torch.rand(3, 5, 7, 9) * 1e-3).to(dtype)
    assert torch.equal(one_plus_gate(t, m), (1 + m) * t)
    small = torch.rand(3, 5, 1, 1).to(dtype)
    assert torch.equal(one_plus_gate(t, small), (1 + small) * t)
    assert torch.equal(one_plus_gate(t[:, :, :1], m), (1 + m) * t[:, :, :1])
