"""Channel permutations (IGC's interleave, channel shuffles not after a concatenation): the
BatchNorms and activations after one move before it and fold, a dense conv next to one takes
it into its weights, a residual add moves before it into the conv's epilogue; what is left is
one copy that explain lists. Each block against its unfused self in float64, randomised
BatchNorm statistics, odd sizes, fresh buffers poisoned with NaN."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse
from cnnfuse.models.architectures.igc import BasicBlock, IGCNet, interleave
from cnnfuse.models.modules.permute import interleave_channels, interleave_index

from ..util import assert_within_torch_error, randomize_batchnorm, relative_error


@contextlib.contextmanager
def _poisoned(monkeypatch):
    """torch.empty and torch.empty_like return NaN-filled tensors: a channel nobody writes
    shows in the result."""
    with monkeypatch.context() as m:
        for name in ("empty", "empty_like"):
            real = getattr(torch, name)

            def poisoned(*args, _real=real, **kwargs):
                t = _real(*args, **kwargs)
                return t.fill_(float("nan")) if t.is_floating_point() else t
            m.setattr(torch, name, poisoned)
        yield


def _check(model, x, monkeypatch):
    """Fuse, run poisoned, compare with the unfused model in float64; (explain, fused code)."""
    model = randomize_batchnorm(model).eval()
    with torch.no_grad():
        same = model(x)
        fused = cnnfuse.fuse(model)
        with _poisoned(monkeypatch):
            got = fused(x.contiguous(memory_format=torch.channels_last))
        want = copy.deepcopy(model).double()(x.double())
    assert_within_torch_error(got, same, want)
    assert relative_error(got, want) < 2e-5
    code = "".join(m.code for m in fused.modules() if isinstance(m, torch.fx.GraphModule))
    return cnnfuse.explain(model), code


def test_interleave_channels():
    """The op and its index map agree with the view/transpose idiom, both ways, in either
    layout; bad groups raise."""
    x = torch.randn(2, 12, 3, 5)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        for g in (2, 3, 4):
            y = interleave_channels(xl, g)
            assert torch.equal(y, interleave(x, g)) and y.is_contiguous(memory_format=layout)
            assert torch.equal(y, x[:, interleave_index(12, g)])
            assert torch.equal(interleave_channels(y, g, True), x)
    with pytest.raises(ValueError, match="groups"):
        interleave_channels(x, 5)
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        interleave_channels(x[0, 0], 2)
    for shape in ((2, 12, 7), (2, 12, 3, 2, 5)):  # other ranks: as torch.channel_shuffle
        y = torch.randn(shape)
        assert torch.equal(interleave_channels(y, 3), torch.channel_shuffle(y, 3))
        assert torch.equal(interleave_channels(y, 3, True), torch.channel_shuffle(y, 4))


@pytest.mark.parametrize("stride", [1, 2])
def test_igc_block_folds_everything(stride, monkeypatch):
    """An IGC residual block (L=2, M=3): both BatchNorms fold into the secondary convs, both
    ReLUs and the residual add are epilogues; the two interleaves between grouped convs stay
    copies, listed; the projecting shortcut (a dense conv) takes the inverse permutation the
    add needs into its weights, so no copy is added."""
    torch.manual_seed(0)
    block = BasicBlock(4, 2, 3, stride)
    report, code = _check(block, torch.randn(2, 4, 9, 7), monkeypatch)
    assert report.bn_folded == report.batchnorms == 3, str(report)
    assert report.activations_absorbed == report.activation_sites == 2, str(report)
    assert report.fused["residual add"] == 1, str(report)
    assert report.fused["channel permutation as one copy"] == 4, str(report)
    # bn1 and its ReLU past igc1's last interleave, bn2 past igc2's, the last ReLU past the
    # permutation after the add
    assert report.fused["batchnorms moved before a channel permutation"] == 2, str(report)
    assert report.fused["activations moved before a channel permutation"] == 2, str(report)
    listed = [site for site, reason in report.unfused if "interleave" in reason]
    assert sorted(listed) == ["igc1.primary", "igc1.secondary", "igc2.primary",
                              "igc2.secondary"], str(report)
    assert "transpose" not in code


def test_igc_network_identity_blocks_cancel(monkeypatch):
    """Through a whole network: block k's output permutation and block k+1's inverse on its
    shortcut cancel, so only the first identity block (shortcut from the stem's pool) copies
    its shortcut; every BatchNorm folds, every activation is absorbed."""
    torch.manual_seed(0)
    report, _ = _check(IGCNet(2, 3, num_classes=5), torch.randn(1, 3, 33, 31), monkeypatch)
    assert report.bn_folded == report.batchnorms == 20, str(report)
    assert report.activations_absorbed == report.activation_sites == 17, str(report)
    inverse = [s for s, r in report.unfused if "(inverse)" in r]
    assert inverse == ["stem.3"], str(report)
    # sites, not moves: each BatchNorm / activation once, past however many permutations
    assert report.fused["batchnorms moved before a channel permutation"] <= report.batchnorms
    assert report.fused["activations moved before a channel permutation"] <= (
        report.activation_sites)


class _Shuffled(nn.Module):
    """conv → BN → shuffle → ReLU → conv, the shuffle in one of its forms."""

    def __init__(self, form: str, first_groups: int = 1, second_groups: int = 1):
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(6, 12, 3, padding=1, groups=first_groups, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 6, 1, groups=second_groups)
        self.shuffle = nn.ChannelShuffle(3)

    def forward(self, x):
        y = self.bn(self.a(x))
        if self.form == "module":
            y = self.shuffle(y)
        elif self.form == "function":
            y = F.channel_shuffle(y, 3)
        else:
            y = interleave(y, 3)
        return self.b(F.relu(y))


@pytest.mark.parametrize("form", ["view", "module", "function"])
def test_dense_producer_takes_the_permutation(form, monkeypatch):
    """A dense conv's output rows (and its BatchNorm's parameters) in permuted order: no
    copy, nothing listed."""
    torch.manual_seed(0)
    report, code = _check(_Shuffled(form),
                          torch.randn(1, 6, 7, 9), monkeypatch)
    assert report.fused["channel permutation in conv weights"] == 1, str(report)
    assert "interleave_channels" not in code and "channel_shuffle" not in code, code
    assert report.bn_folded == 1 and report.activations_absorbed == 1, str(report)


def test_dense_reader_takes_the_permutation(monkeypatch):
    """A grouped producer and a dense reader: the reader's input columns are permuted."""
    torch.manual_seed(0)
    report, code = _check(_Shuffled("view", first_groups=3), torch.randn(1, 6, 7, 9),
                          monkeypatch)
    assert report.fused["channel permutation in conv weights"] == 1, str(report)
    assert "interleave_channels" not in code, code


def test_grouped_both_sides_stays_a_copy(monkeypatch):
    """Grouped on both sides: one copy, listed, and the BatchNorm and ReLU still fold."""
    torch.manual_seed(0)
    report, code = _check(_Shuffled("view", first_groups=3, second_groups=2),
                          torch.randn(1, 6, 7, 9), monkeypatch)
    assert "interleave_channels" in code
    assert report.bn_folded == 1 and report.activations_absorbed == 1, str(report)
    assert any("interleave of 3 groups" in r for _, r in report.unfused), str(report)


class _Residual(nn.Module):
    """relu(P(bn(grouped conv(x))) + x): the add needs P⁻¹(x), a copy of the input."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.relu(interleave(self.bn(self.conv(x)), 2) + x)


@pytest.mark.parametrize("inplace", [False, True])
def test_residual_add_moves_before_the_permutation(inplace, monkeypatch):
    torch.manual_seed(0)
    report, _ = _check(_Residual(inplace), torch.randn(2, 6, 5, 7), monkeypatch)
    assert report.fused["residual add"] == 1, str(report)
    assert report.activations_absorbed == report.activation_sites == 1, str(report)
    assert any("(inverse)" in r for _, r in report.unfused), str(report)


class _Shared(nn.Module):
    """The conv's output is read by two shuffles and by the add, the ReLU after one shuffle
    is in place, and PReLU has per-channel slopes: nothing moves, both shuffles stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.relu = nn.ReLU(inplace=True)
        self.prelu = nn.PReLU(6)
        self.three, self.two = nn.ChannelShuffle(3), nn.ChannelShuffle(2)

    def forward(self, x):
        y = self.conv(x)
        return self.prelu(self.two(y)) + self.relu(self.three(y)) + y


def test_nothing_moves_past_other_readers(monkeypatch):
    torch.manual_seed(0)
    report, code = _check(_Shared(), torch.randn(1, 6, 5, 7), monkeypatch)
    assert code.count("interleave_channels(") == 2, code
    assert report.fused["batchnorms moved before a channel permutation"] == 0
    assert report.fused["activations moved before a channel permutation"] == 0
    assert report.activations_absorbed == 0, str(report)


class _CatShuffle(nn.Module):
    """Two conv branches concatenated, then nn.ChannelShuffle (ShuffleNet written with the
    module): each conv stores every second channel of the buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5),
                               nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU())
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        return self.shuffle(torch.cat([self.a(x), self.b(x)], 1))


def test_shuffle_module_after_a_concatenation_is_a_store(monkeypatch):
    torch.manual_seed(0)
    report, code = _check(_CatShuffle(), torch.randn(2, 4, 7, 5), monkeypatch)
    assert report.fused["channel shuffle in conv stores"] == 1, str(report)
    assert report.fused["conv writes its concat slice"] == 2, str(report)
    assert "interleave_channels" not in code and "torch.cat" not in code, code


class _Slope(nn.Module):
    """grouped conv → BN → shuffle → F.leaky_relu(·, 0.2) → grouped conv: the activation's
    slope is a constant, so it moves before the shuffle with the BatchNorm and both fold."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(6, 12, 3, padding=1, groups=3, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 6, 1, groups=2)

    def forward(self, x):
        return self.b(F.leaky_relu(interleave(self.bn(self.a(x)), 3), 0.2))


def test_activation_with_constant_arguments_moves(monkeypatch):
    torch.manual_seed(0)
    report, _ = _check(_Slope(), torch.randn(1, 6, 7, 9), monkeypatch)
    assert report.bn_folded == 1 and report.activations_absorbed == 1, str(report)
    assert report.fused["activation leaky_relu(0.2)"] == 1, str(report)
