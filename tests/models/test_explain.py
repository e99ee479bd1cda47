"""explain tells the truth: its headline counts what was fused against what the model has
(conv sites with the functional convs the trace saw, BatchNorms, activations), and every site
left alone is listed with its reason, the modules the traced forward never runs included."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse

from ..util import randomize_batchnorm


def explain(model):
    return cnnfuse.explain(randomize_batchnorm(model).eval())


class Mixed(nn.Module):
    """What is fused and what is not, one of each: conv + BN + ReLU (fused), conv + BN +
    softsign (BN folds, the activation stays: no kernel computes it), a BatchNorm called twice (stays), a
    functional conv on the input's data (stays), and a head that runs only in training."""
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared = nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Conv2d(8, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        y = F.relu(self.bn_a(self.a(x)))
        y = F.softsign(self.bn_b(self.b(y)))
        y = self.shared(self.shared(y))
        z = F.conv2d(y, y[:2, :, :1, :1])
        if self.training:
            return z, self.aux(y)
        return z


def test_headline_counts_against_what_the_model_has():
    report = explain(Mixed())
    lines = str(report).splitlines()
    # conv sites: a, b, aux's conv and the functional conv; fused: a and b
    assert lines[0] == "cnnfuse: 2/4 conv sites fused (50.0%)", str(report)
    # BatchNorms: bn_a and bn_b folded, of 4 (shared, aux's)
    assert lines[1].strip() == "BatchNorms folded: 2/4 (50.0%)", str(report)
    # activations: the ReLU absorbed, the softsign kept
    assert lines[2].strip() == "activations absorbed: 1/2 (50.0%)", str(report)


def test_every_site_left_alone_is_listed_with_its_reason():
    reasons = {}
    for site, reason in explain(Mixed()).unfused:
        reasons.setdefault(site, []).append(reason)
    assert any("never runs in the traced forward" in r and "(1 convs, 1 BatchNorms)" in r
               for r in reasons["aux"]), reasons
    assert any("called at 2 places" in r for r in reasons["shared"]), reasons
    assert any("softsign: no fused kernel" in r for rs in reasons.values() for r in rs)
    assert any("computed from the input" in r for rs in reasons.values() for r in rs)


def test_fully_fused_model_says_so():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Hardswish())
    report = explain(model)
    assert str(report).splitlines()[:3] == [
        "cnnfuse: 2/2 conv sites fused (100.0%)", "  BatchNorms folded: 2/2 (100.0%)",
        "  activations absorbed: 2/2 (100.0%)"], str(report)
    assert not report.unfused


def test_no_batchnorm_no_batchnorm_line():
    report = explain(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softsign()))
    text = str(report)
    assert "BatchNorms" not in text and "activations absorbed: 0/1 (0.0%)" in text, text
    assert any("Softsign" in r for _, r in report.unfused)


def test_an_activation_no_kernel_computes_is_not_counted_as_absorbed():
    """A BatchNormAct2d whose activation no kernel computes (softsign) once read "100%" with
    every activation left: the BatchNorm folds, the activation is kept, listed and counted as
    kept."""
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False),
                          timm_layers.BatchNormAct2d(4, act_layer=nn.Softsign))

    class Wrap(nn.Module):  # traced as a graph, not as a Sequential
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body(x) * 2
    report = explain(Wrap())
    assert report.bn_folded == 1 and report.activations_absorbed == 0
    assert report.activation_sites == 1, str(report)
    assert "activations absorbed: 0/1 (0.0%)" in str(report)


def test_report_keeps_the_conv_line_first():
    """The first line reads as it always has (scripts parse it)."""
    report = explain(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert str(report).splitlines()[0] == "cnnfuse: 1/1 conv sites fused (100.0%)"
    assert report.coverage == 1.0 and report.conv_fused == report.conv_sites == 1


class _OwnConv(nn.Module):
    """A module with no Conv2d child that calls F.conv2d on its own weight."""
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class _DataConv(nn.Module):
    """A module with no parameters that convolves its input with a slice of itself."""
    def forward(self, x):
        return F.conv2d(x, x[:2, :, :1, :1])


def test_functional_convs_in_conv_free_modules_are_counted():
    """A Sequential is fused child by child: a child with no Conv2d of its own that calls
    F.conv2d is still a conv site, fused when its weight is a parameter, listed when it is
    computed from the input."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _OwnConv(), _DataConv())
    report = explain(model)
    assert report.conv_sites == 3 and report.conv_fused == 2, str(report)
    assert any("computed from the input" in r for _, r in report.unfused), str(report)
    x = torch.randn(2, 3, 5, 7)
    with torch.no_grad():
        want = model(x)
        got = cnnfuse.fuse(model)(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


class _Eager(nn.Module):
    """An add of two pooled tensors, a product of two convs' outputs that is no SE gate, a
    bilinear up-sampling, and shape arithmetic (not listed)."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h = x.shape[2] + x.shape[3]
        p = F.max_pool2d(self.a(x), 2) + F.avg_pool2d(self.b(x), 2)
        q = self.a(x[:, :, :h // 2]) * self.b(x[:, :, :h // 2])
        return F.interpolate(p, scale_factor=2.0, mode="bilinear"), q


def test_eager_elementwise_ops_are_listed():
    reasons = [r for _, r in explain(_Eager()).unfused]
    assert sum("add of two tensors runs eager" in r for r in reasons) == 1, reasons
    assert sum("product of two tensors runs eager" in r for r in reasons) == 1, reasons
    assert sum("bilinear up-sampling runs eager" in r for r in reasons) == 1, reasons


def _same_in_both_layouts(model, x):
    """The fused model against the float64 original, NCHW and channels_last input."""
    import copy
    model = randomize_batchnorm(model).eval()
    fused = cnnfuse.fuse(model)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        for layout in (torch.contiguous_format, torch.channels_last):
            got = fused(x.contiguous(memory_format=layout))
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


class _ConvAndItsWeight(nn.Module):
    """A Conv2d called, and F.conv2d on its weight beside it: two conv sites."""
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.c(x) + F.conv2d(x, self.c.weight, padding=1)


def test_functional_conv_beside_its_conv2d_is_a_site_of_its_own():
    report = explain(_ConvAndItsWeight())
    assert report.conv_sites == report.conv_fused == 2, str(report)
    assert report.coverage == 1.0
    _same_in_both_layouts(_ConvAndItsWeight(), torch.randn(2, 3, 7, 5))


class _UntracedOwnConv(nn.Module):
    """F.conv2d on its own weight in a forward FX cannot trace (an `if` on data)."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        if x.sum() > -1e9:
            return F.conv2d(x, self.w, padding=1)
        return x


class _WithUntraced(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _UntracedOwnConv(), _OwnConvFrom3(), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


class _OwnConvFrom3(_OwnConv):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))


class _ChildNamedConv2d(nn.Module):
    """Untraceable, its only conv a child called `conv2d`: one site, not two."""
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > -1e9:
            return self.conv2d(x)
        return x


def test_conv_in_an_untraced_forward_is_a_site_listed():
    report = explain(_UntracedOwnConv())
    assert (report.conv_sites, report.conv_fused) == (1, 0), str(report)
    assert any("not traced" in r for _, r in report.unfused), str(report)
    report = explain(_WithUntraced())
    assert (report.conv_sites, report.conv_fused) == (3, 2), str(report)
    assert [s for s, r in report.unfused if "not traced" in r] == ["a"], str(report)
    _same_in_both_layouts(_WithUntraced(), torch.randn(2, 3, 7, 5))
    report = explain(_ChildNamedConv2d())
    assert (report.conv_sites, report.conv_fused) == (1, 1), str(report)
