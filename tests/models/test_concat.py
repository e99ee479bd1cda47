"""Concatenations without torch.cat: convs write their outputs straight into their channel
slices (every g-th channel when a channel shuffle follows), other parts are copied in. Every
case runs with torch.empty poisoned with NaN, so a channel nobody writes shows."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse

from ..util import randomize_batchnorm, relative_error, triton_runnable


def _conv_bn(cin, cout, k=1, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Inception(nn.Module):
    """Four branches as GoogLeNet has them, plus a bare pool branch that must be copied."""
    def __init__(self, c=12):
        super().__init__()
        self.b1 = _conv_bn(c, 5)
        self.b2 = nn.Sequential(_conv_bn(c, 6), _conv_bn(6, 7, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(c, 3))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), F.max_pool2d(x, 3, 1, 1)], 1)


def _shuffle(x, groups, form):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    if form == "flatten":
        return torch.transpose(x, 1, 2).flatten(1, 2)
    if form == "reshape":
        return x.transpose(1, 2).reshape(n, c, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v2's unit: split, one branch through 1x1 → depthwise → 1x1, cat, shuffle."""
    def __init__(self, c=16, stride=1, form="view", split=None):
        super().__init__()
        self.stride, self.form = stride, form
        half = c // 2
        self.split = split or half
        if stride == 2:
            self.branch1 = nn.Sequential(_conv_bn(c, c, 3, 2, groups=c), _conv_bn(c, half))
            cin = c
        else:
            cin = c - self.split
        self.branch2 = nn.Sequential(_conv_bn(cin, half), _conv_bn(half, half, 3, stride, half),
                                     _conv_bn(half, c - self.split if stride == 1 else half))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x[:, :self.split], x[:, self.split:]
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _shuffle(out, 2, self.form)


@contextlib.contextmanager
def _poisoned_empty(monkeypatch):
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        yield


def _check(model, x, monkeypatch, tolerance=2e-5):
    model = randomize_batchnorm(model).eval()
    with torch.no_grad():
        expected = model(x)
        fused = cnnfuse.fuse(model)
        with _poisoned_empty(monkeypatch):
            got = fused(x.contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(got).all(), "a channel of the concatenation was never written"
    assert relative_error(got, expected) < tolerance
    code = "".join(m.code for m in fused.modules() if isinstance(m, torch.fx.GraphModule))
    assert code and "torch.cat" not in code and "transpose" not in code
    return cnnfuse.explain(model), fused


def test_inception_branches_write_their_slices(monkeypatch):
    report, _ = _check(Inception(), torch.randn(2, 12, 9, 7), monkeypatch)
    assert report.fused["conv writes its concat slice"] == 3  # the bare pool is copied


def test_nested_concatenation_is_spliced_into_the_outer(monkeypatch):
    """Inception-v3's last blocks: a branch that is itself a cat of two convs."""
    class InceptionE(nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.b1, self.stem = _conv_bn(c, 4), _conv_bn(c, 6)
            self.a, self.b = _conv_bn(6, 3, 3), _conv_bn(6, 5, 3)

        def forward(self, x):
            s = self.stem(x)
            return torch.cat([self.b1(x), torch.cat([self.a(s), self.b(s)], 1)], 1)
    report, fused = _check(InceptionE(), torch.randn(2, 8, 5, 6), monkeypatch)
    assert report.fused["conv writes its concat slice"] == 3
    assert "copy_into" not in fused.code


def test_dense_blocks_share_one_buffer(monkeypatch):
    """DenseNet: each layer's conv writes its slice once; every concatenation is a prefix."""
    import torchvision
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(3, 2),
                                        num_init_features=8, bn_size=2, num_classes=5)
    report, fused = _check(model, torch.randn(2, 3, 32, 32), monkeypatch)
    assert report.fused["dense block in one buffer"] == 2
    assert report.fused["conv writes its concat slice"] == 5
    assert fused.code.count("copy_into(") == 2  # each block's input, once


def test_dense_feature_read_elsewhere_keeps_its_cats(monkeypatch):
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.f1, self.f2 = _conv_bn(4, 3), _conv_bn(7, 3)

        def forward(self, x):
            a = self.f1(torch.cat([x], 1))
            b = self.f2(torch.cat([x, a], 1))
            return torch.cat([x, a, b], 1), a.sum()
    model = randomize_batchnorm(Leaky()).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected, fused = model(x), cnnfuse.fuse(model)
        with _poisoned_empty(monkeypatch):
            got = fused(x)
    assert "dense block in one buffer" not in cnnfuse.explain(model).fused
    assert all(relative_error(g, e) < 2e-5 for g, e in zip(got, expected))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("form", ["view", "flatten", "reshape"])
def test_channel_shuffle_becomes_interleaved_stores(stride, form, monkeypatch):
    report, _ = _check(ShuffleUnit(16, stride, form), torch.randn(2, 16, 9, 11), monkeypatch)
    assert report.fused["channel shuffle in conv stores"] == 1
    assert report.fused["conv writes its concat slice"] == stride


def test_shuffle_of_unequal_parts_is_still_exact(monkeypatch):
    """Groups that are not the parts: the buffer is a plain cat, shuffled once at the end."""
    _check(ShuffleUnit(16, 1, split=6), torch.randn(2, 16, 5, 5), monkeypatch)


def test_part_read_elsewhere_is_copied(monkeypatch):
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _conv_bn(4, 6), _conv_bn(4, 5)

        def forward(self, x):
            a = self.a(x)
            return torch.cat([a, self.b(x)], 1) + a.mean()
    report, _ = _check(TwoUses(), torch.randn(2, 4, 6, 6), monkeypatch)
    assert report.fused["conv writes its concat slice"] == 1


def test_cpu_build_of_the_cuda_kernels_writes_interleaved(backend, monkeypatch):
    """Depthwise (C++) and library conv + bias_act (C++) writing every other channel."""
    backend("cuda")
    _check(ShuffleUnit(16, 2), torch.randn(2, 16, 9, 11), monkeypatch)


@pytest.mark.skipif(not triton_runnable(), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_kernel_reads_slices_and_writes_interleaved(backend, monkeypatch):
    backend("triton")
    _check(nn.Sequential(ShuffleUnit(16, 1), ShuffleUnit(16, 2)), torch.randn(1, 16, 7, 6),
           monkeypatch)


def test_fused_shufflenet_compiles_in_one_graph():
    model = ShuffleUnit(16, 2)
    fused = cnnfuse.fuse(randomize_batchnorm(model).eval())
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), fused(x))


# --- hazards: each was once fused wrongly or not at all --------------------------------------

def _cr(i, o, k=1):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2), nn.ReLU())


class Nested3(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.ModuleList(_cr(8, 2) for _ in range(4))

    def forward(self, x):
        a, b, c, d = (m(x) for m in self.c)
        return torch.cat([a, torch.cat([b, torch.cat([c, d], 1)], 1)], 1)


class SiblingFeedsSiblings(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = _cr(8, 4), _cr(8, 4), _cr(4, 3, 3), _cr(4, 5, 3)

    def forward(self, x):
        a = self.a(x)
        return self.c(a), self.d(a), self.b(x)


class WriterInputChangedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cr(8, 3), _cr(8, 3)

    def forward(self, x):
        x = x * 1
        a = self.a(x)  # reads x before the in-place relu below
        return torch.cat([a, self.b(F.relu(x, inplace=True))], 1)


class SiblingsAcrossInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cr(8, 4), _cr(8, 4)

    def forward(self, x):
        x = x * 1
        a = self.a(x)
        x.mul_(3)
        return a, self.b(x)


class DensePrefixChangedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.ModuleList(_cr(8 + 4 * i, 4) for i in range(3))

    def forward(self, x):
        f1 = self.f[0](torch.cat([x], 1))
        f2 = self.f[1](torch.cat([x, f1], 1).sub_(1))
        f3 = self.f[2](torch.cat([x, f1, f2], 1))
        return torch.cat([x, f1, f2, f3], 1)


class BatchSplitNotShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cr(8, 4), _cr(8, 4)

    def forward(self, x):
        c = torch.cat([self.a(x), self.b(x)], 1)
        n, ch, h, w = c.shape
        return c.view(1, 2, ch, h, w).transpose(1, 2).reshape(n, ch, h, w)


class CatOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cr(8, 3), _cr(8, 3)

    def forward(self, x):
        buf = torch.zeros(2, 6, 6, 6)
        torch.cat([self.a(x), self.b(x)], 1, out=buf)
        return buf


class ShuffleThenView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cr(8, 4), _cr(8, 4)

    def forward(self, x):
        c = torch.cat([self.a(x), self.b(x)], 1)
        n, ch, h, w = c.size()
        y = c.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return y.view(n, -1)


class Promoting(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cr(8, 3), _cr(8, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x).double()], 1)


class ResidualAddIntoView(nn.Module):
    """`view.add_(conv(x))` writes into the tensor the view is part of: not an epilogue."""
    def __init__(self):
        super().__init__()
        self.conv, self.other = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 12, 1)

    def forward(self, x):
        big = self.other(x) * 1.0
        big.narrow(1, 2, 4).add_(self.conv(x))
        return big


@pytest.mark.parametrize("model", [Nested3, SiblingFeedsSiblings, WriterInputChangedInPlace,
                                   SiblingsAcrossInPlace, DensePrefixChangedInPlace,
                                   BatchSplitNotShuffle, CatOut, ShuffleThenView, Promoting,
                                   ResidualAddIntoView],
                         ids=lambda m: m.__name__)
def test_hazard(model):
    m = model().eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected, got = m(x.clone()), cnnfuse.fuse(m)(x.clone())
    expected, got = (expected, got) if isinstance(expected, tuple) else ((expected,), (got,))
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and relative_error(g, e) < 2e-5


class SeparableBroadcastAdd(nn.Module):
    """A depthwise → 1x1 pair whose output gets a broadcast add: added outside the kernel."""
    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 6, 1)
        self.off = nn.Parameter(torch.randn(1, 6, 1, 1))

    def forward(self, x):
        return self.pw(self.dw(x)) + self.off


class SeparableInputChangedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = x * 1.0
        y = self.dw(x)
        x.mul_(2.0)
        return self.pw(y) + x


@pytest.mark.parametrize("model", [SeparableBroadcastAdd, SeparableInputChangedInPlace],
                         ids=lambda m: m.__name__)
def test_separable_hazard(model):
    test_hazard(model)


def test_separable_takes_the_broadcast_add_outside():
    from cnnfuse.models.modules import FusedSeparableConv2d
    fused = cnnfuse.fuse(SeparableBroadcastAdd().eval())
    pair = [m for m in fused.modules() if isinstance(m, FusedSeparableConv2d)]
    assert len(pair) == 1 and pair[0].has_residual
