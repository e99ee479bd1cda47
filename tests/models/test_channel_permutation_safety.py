"""Channel permutations where the rewrite must not happen, or must happen differently: a
parametrised weight, a conv shared between separately traced modules, activations spelled as
functions or methods, a residual that broadcasts, a shuffle of a non-4-d tensor, and the
layout eager gives a shuffle's result. Each against the unfused model in float64 (randomised
BatchNorm statistics, odd sizes, NCHW and channels_last input, NaN-poisoned fresh buffers)."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

import cnnfuse

from ..util import randomize_batchnorm, relative_error
from .test_channel_permutation import _poisoned

LAYOUTS = [torch.contiguous_format, torch.channels_last]
LAYOUT_IDS = ["nchw", "channels_last"]


def _shuffle(x, g):
    n, c, h, w = x.size()
    return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _check(model, x, monkeypatch, layout, check_layout=True):
    """Fuse, run poisoned on x in `layout`, compare with the float64 model; the fused output
    is in the layout eager's is in (with check_layout)."""
    model = randomize_batchnorm(model).eval()
    want_model = copy.deepcopy(model).double()
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        eager = model(x)
        fused = cnnfuse.fuse(model)
        with _poisoned(monkeypatch):
            got = fused(x)
        want = want_model(x.double())
    assert got.shape == want.shape and got.dtype == eager.dtype
    assert relative_error(got, want) < 2e-5
    if got.dim() == 4 and check_layout:
        for fmt in LAYOUTS:
            assert got.is_contiguous(memory_format=fmt) == eager.is_contiguous(
                memory_format=fmt), fmt
    return fused


class _Double(nn.Module):
    def forward(self, w):
        return w * 2.0


class _ParamProducer(nn.Module):
    """A dense conv with a parametrised weight before the shuffle."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        parametrize.register_parametrization(self.c, "weight", _Double())

    def forward(self, x):
        return F.relu(_shuffle(self.bn(self.c(x)), 2))


class _ParamReader(nn.Module):
    """A dense conv with a parametrised weight reading the shuffle."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.Conv2d(6, 5, 1)
        parametrize.register_parametrization(self.d, "weight", _Double())

    def forward(self, x):
        return self.d(_shuffle(self.c(x), 2))


class _Half(nn.Module):
    def __init__(self, conv, reader):
        super().__init__()
        self.c, self.g, self.reader = conv, nn.Conv2d(6, 6, 3, padding=1, groups=3), reader

    def forward(self, x):
        if self.reader:
            return self.c(F.channel_shuffle(self.g(x), 3))
        return self.g(_shuffle(self.c(x), 3))


class _SharedUntraceable(nn.Module):
    """One conv in two children that are traced one by one (the parent's `if` on data is
    untraceable): permuting it for one child must not change the other."""

    def __init__(self, reader):
        super().__init__()
        conv = nn.Conv2d(6, 6, 1)
        self.a, self.b = _Half(conv, reader), _Half(conv, reader)

    def forward(self, x):
        if x.sum() > -1e9:
            return self.a(x) + self.b(x)
        return x


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", ["producer", "reader"])
def test_parametrised_weights_are_not_indexed(kind, layout, monkeypatch):
    torch.manual_seed(1)
    model = _ParamProducer() if kind == "producer" else _ParamReader()
    _check(model, torch.randn(2, 3, 7, 5), monkeypatch, layout)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("reader", [False, True], ids=["producer", "reader"])
def test_conv_shared_between_traces_is_permuted_for_one(reader, layout, monkeypatch):
    torch.manual_seed(1)
    # the layout of the producer form under channels_last input: the next test
    _check(_SharedUntraceable(reader), torch.randn(2, 6, 7, 5), monkeypatch, layout,
           check_layout=reader or layout != torch.channels_last)


@pytest.mark.xfail(strict=True, reason="an untraced parent's layout hook guesses channels_last "
                   "from its input where eager's conv after a contiguous shuffle is NCHW")
def test_layout_after_a_contiguous_shuffle_inside_an_untraced_parent(monkeypatch):
    torch.manual_seed(1)
    _check(_SharedUntraceable(False), torch.randn(2, 6, 7, 5), monkeypatch, torch.channels_last)


class _ModuleShuffleFunctionActs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(6, 12, 1), nn.BatchNorm2d(12)
        self.s, self.bn2 = nn.ChannelShuffle(4), nn.BatchNorm2d(12)
        self.g = nn.Conv2d(12, 12, 3, padding=1, groups=4)

    def forward(self, x):
        return self.g(F.relu(self.bn2(self.s(F.relu(self.bn(self.c(x)))))))


class _MethodAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.h = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=2)

    def forward(self, x):
        return self.h(F.channel_shuffle(self.c(x).relu(), 3))


class _ResidualFunctionAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.g, self.r = nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.Conv2d(6, 6, 1)
        self.h = nn.Conv2d(6, 6, 3, padding=1, groups=2)

    def forward(self, x):
        return self.h(F.channel_shuffle(self.g(x), 3) + F.relu(self.r(x)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("cls", [_ModuleShuffleFunctionActs, _MethodAct, _ResidualFunctionAct])
def test_function_and_method_activations_in_a_dense_chain(cls, layout, monkeypatch):
    torch.manual_seed(1)
    _check(cls(), torch.randn(2, 6, 7, 5), monkeypatch, layout)


class _ResidualBroadcast(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.bias, self.m = nn.Parameter(torch.randn(6, 1, 1)), nn.Conv2d(6, 1, 1)

    def forward(self, x):
        r = self.bias if self.kind == "parameter" else self.m(x)
        return _shuffle(self.c(x), 3) + r


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", ["parameter", "one_channel"])
def test_broadcasting_residual_is_not_permuted(kind, layout, monkeypatch):
    torch.manual_seed(1)
    _check(_ResidualBroadcast(kind), torch.randn(2, 6, 7, 5), monkeypatch, layout)


class _Shuffle3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv1d(3, 6, 1), nn.Conv2d(3, 6, 1)

    def forward(self, x):
        d = self.d(x)
        y = F.channel_shuffle(self.c(x.flatten(2)), 3)  # (N, C, L)
        z = F.channel_shuffle(self.c(x.flatten(2)).unsqueeze(-1).unsqueeze(-1), 2)  # 5-d
        return d + y.reshape(d.shape) + z.reshape(d.shape)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_shuffle_of_other_ranks(layout, monkeypatch):
    torch.manual_seed(1)
    _check(_Shuffle3d(), torch.randn(2, 3, 7, 5), monkeypatch, layout)


class _ShuffleOut(nn.Module):
    """A grouped conv's output shuffled (a copy stays), then viewed or returned."""

    def __init__(self, end):
        super().__init__()
        self.end = end
        self.c, self.bn = nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6)
        self.d = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        if self.end == "residual":
            return F.relu(_shuffle(self.bn(self.c(x)), 3) + _shuffle(x, 3))
        if self.end == "dense_producer":
            return F.relu(_shuffle(self.bn(self.d(x)), 3))
        if self.end == "dense_reader":
            return self.d(_shuffle(self.bn(self.c(x)), 3))
        if self.end == "function":
            return F.relu(F.channel_shuffle(self.bn(self.c(x)), 3))
        y = F.relu(_shuffle(self.bn(self.c(x)), 3))
        return y.view(x.size(0), -1) if self.end == "view" else y


@pytest.mark.parametrize("model_layout", LAYOUTS, ids=["nchw_model", "channels_last_model"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("end", ["out", "view", "residual", "dense_producer", "dense_reader",
                                 "function"])
def test_shuffle_result_in_eager_layout(end, layout, model_layout, monkeypatch):
    """view → transpose → contiguous → view returns a contiguous tensor whatever the input's
    layout; F.channel_shuffle keeps its input's layout."""
    torch.manual_seed(1)
    model = _ShuffleOut(end).to(memory_format=model_layout)
    _check(model, torch.randn(2, 6, 7, 5), monkeypatch, layout)
