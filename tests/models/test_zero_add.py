"""Adding a literal zero (MobileOne's blocks without an identity or scale branch: `out = 0 +
...`, `out += 0`) is dropped, so the branches sum into one conv and the activation after them
is absorbed; never where an in-place update would then write into a tensor others read."""
import copy

import pytest
import torch
from torch import nn

import cnnfuse

from ..util import assert_within_torch_error, randomize_batchnorm, relative_error


def _conv_bn(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout))


class _Block(nn.Module):
    """MobileOne's train-time forward: branches summed in place onto the scale branch (or a
    literal 0), plus the identity branch (or a literal 0)."""

    def __init__(self, c=6, identity=True, scale=False):
        super().__init__()
        self.identity = nn.BatchNorm2d(c) if identity else None
        self.scale = _conv_bn(c, c, 1) if scale else None
        self.kxk = nn.ModuleList(_conv_bn(c, c, 3) for _ in range(3))
        self.act = nn.ReLU()

    def forward(self, x):
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.scale is not None:
            scale_out = self.scale(x)
        out = scale_out + identity_out
        for ck in self.kxk:
            out += ck(x)
        out += 0
        return self.act(out)


def _check(model, x):
    model = randomize_batchnorm(model).eval()
    before = x.clone()
    with torch.no_grad():
        same = model(x)
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
        want = copy.deepcopy(model).double()(x.double())
    assert torch.equal(x, before), "the fused model wrote into its input"
    assert_within_torch_error(got, same, want)
    assert relative_error(got, want) < 2e-5
    return cnnfuse.explain(model)


@pytest.mark.parametrize("identity, scale", [(True, False), (False, True), (False, False)],
                         ids=["identity", "scale", "neither"])
def test_branches_sum_into_one_conv(identity, scale):
    torch.manual_seed(0)
    report = _check(_Block(identity=identity, scale=scale), torch.randn(2, 6, 7, 9))
    assert report.fused["parallel branches summed into one conv"] == 3 + scale, str(report)
    assert report.bn_folded == report.batchnorms, str(report)
    assert report.activations_absorbed == report.activation_sites == 1, str(report)


class _IntoInput(nn.Module):
    """0 + x of the input, then updated in place: dropping the sum would write into x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        out = 0 + x
        out += self.conv(x)
        return out


def test_input_is_not_written():
    torch.manual_seed(0)
    _check(_IntoInput(), torch.randn(1, 4, 5, 7))


class _IntegerZeroAdd(nn.Module):
    """A literal zero added to an integer tensor (a ReLU or pool of one): 0.0 + t is float in
    eager, t += 0.0 raises there; the conv beside it fuses either way."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.c, self.r, self.p = nn.Conv2d(3, 5, 1), nn.ReLU(), nn.MaxPool2d(1)

    def forward(self, x):
        y = self.c(x)
        q = (y * 10).long()
        if self.form == "relu":
            return y, self.r(q) + 0.0
        if self.form == "pool":
            return y, 0.0 + self.p(q)
        if self.form == "int_zero":
            return y, self.r(q) + 0
        q += 0.0
        return y, q


@pytest.mark.parametrize("form", ["relu", "pool", "int_zero", "in_place"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_zero_keeps_integer_promotion(form, layout):
    torch.manual_seed(2)
    model = _IntegerZeroAdd(form).eval()
    x = torch.randn(2, 3, 7, 5).contiguous(memory_format=layout)
    fused = cnnfuse.fuse(model)
    with torch.no_grad():
        if form == "in_place":
            with pytest.raises(RuntimeError, match="can't be cast"):
                model(x)
            with pytest.raises(RuntimeError, match="can't be cast"):
                fused(x)
            return
        (y_same, same), (y_got, got) = model(x), fused(x)
        y_want = copy.deepcopy(model).double()(x.double())[0]
    assert_within_torch_error(y_got, y_same, y_want)
    assert got.dtype == same.dtype == (torch.int64 if form == "int_zero" else torch.float32)
    assert torch.equal(got, same)
