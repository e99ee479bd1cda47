"""The parametrised activations in every form a model writes them (module, functional with
positional or keyword parameters, tensor method, in place), fused into a conv's epilogue and
into its load stage, each fused model against the original in float64 with randomised
BatchNorm statistics; what must not fuse (a parameter known only at run time, a PReLU per
channel) stays and is said; timm's cspresnet50 with its LeakyReLUs all absorbed."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import cnnfuse
from cnnfuse import FusedConv2d
from cnnfuse.models.patterns import activation_of_module, activation_of_node

from ..util import randomize_batchnorm, relative_error

TOLERANCE = 2e-5  # fp32 fused against fp64: a few ulps; a wrong slope shows as 1e-2


def _prelu(weight: float) -> nn.PReLU:
    m = nn.PReLU(1)
    with torch.no_grad():
        m.weight.fill_(weight)
    return m


# (form, activation it computes): modules, functions with positional and keyword parameters,
# in-place flags and functions, methods.
FORMS = [
    (nn.LeakyReLU(0.2), "leaky_relu(0.2)"), (nn.LeakyReLU(), "leaky_relu(0.01)"),
    (nn.LeakyReLU(0.3, inplace=True), "leaky_relu(0.3)"),
    (_prelu(-0.375), "leaky_relu(-0.375)"), (_prelu(1.75), "leaky_relu(1.75)"),
    (nn.ELU(0.5), "elu(0.5)"), (nn.ELU(inplace=True), "elu(1.0)"), (nn.CELU(2.0), "celu(2.0)"),
    (nn.CELU(-1.0), "celu(-1.0)"), (lambda x: F.celu(x, alpha=-0.5), "celu(-0.5)"),
    (nn.SELU(), "selu"), (nn.SELU(inplace=True), "selu"), (nn.Mish(), "mish"),
    (nn.Tanh(), "tanh"), (nn.Hardtanh(-2.0, 0.5), "hardtanh(-2.0,0.5)"),
    (nn.Hardtanh(), "hardtanh(-1.0,1.0)"), (nn.ReLU6(), "relu6"), (nn.Hardtanh(0.0, 6.0), "relu6"),
    (nn.Softplus(2.0, 3.0), "softplus(2.0,3.0)"), (nn.Softplus(), "softplus(1.0,20.0)"),
    (lambda x: F.leaky_relu(x, 0.2), "leaky_relu(0.2)"),
    (lambda x: F.leaky_relu(x, negative_slope=0.15), "leaky_relu(0.15)"),
    (lambda x: F.leaky_relu(x, 0.25, True), "leaky_relu(0.25)"),
    (lambda x: F.leaky_relu_(x, 0.05), "leaky_relu(0.05)"),
    (lambda x: F.elu(x, 0.7), "elu(0.7)"),
    (lambda x: F.elu(x, alpha=1.5, inplace=True), "elu(1.5)"),
    (lambda x: F.elu_(x), "elu(1.0)"), (lambda x: F.celu(x, alpha=0.3), "celu(0.3)"),
    (lambda x: torch.celu(x, 1.2), "celu(1.2)"), (lambda x: F.selu(x, True), "selu"),
    (torch.selu, "selu"), (lambda x: F.mish(x, inplace=True), "mish"), (torch.tanh, "tanh"),
    (F.tanh, "tanh"), (lambda x: x.tanh(), "tanh"), (lambda x: x.tanh_(), "tanh"),
    (torch.tanh_, "tanh"),
    (lambda x: F.hardtanh(x, -0.5, 2.0), "hardtanh(-0.5,2.0)"),
    (lambda x: F.hardtanh(x, min_val=-3.0), "hardtanh(-3.0,1.0)"),
    (lambda x: F.hardtanh_(x, -1.0, 0.5), "hardtanh(-1.0,0.5)"),
    (lambda x: F.softplus(x, 3.0), "softplus(3.0,20.0)"),
    (lambda x: F.softplus(x, beta=0.5, threshold=2.0), "softplus(0.5,2.0)"),
]
FORM_IDS = [f"{i}-{name}" for i, (_, name) in enumerate(FORMS)]


class Act(nn.Module):
    """A callable as a module, so the conv's reader is one graph node."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _as_module(act):
    return act if isinstance(act, nn.Module) else Act(act)


class ConvBnAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(5, 7, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.act = _as_module(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class BnActConv(nn.Module):
    """A pre-activation BatchNorm + activation before a conv: the conv's prologue."""

    def __init__(self, act):
        super().__init__()
        self.stem = nn.Conv2d(5, 7, 1)
        self.bn = nn.BatchNorm2d(7)
        self.act = _as_module(act)
        self.conv = nn.Conv2d(7, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(self.act(self.bn(self.stem(x) * 1.5)))


def _compare(model, x):
    """The fused copy (float32) against the original in float64; returns (fused, report)."""
    model = randomize_batchnorm(model).eval()
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
    err = relative_error(got, expected)
    assert err < TOLERANCE, f"fused differs by {err:.2e} (relative)"
    return fused, cnnfuse.explain(model)


def _data():
    # values around the kinks after the BatchNorm: several units wide, 0 well inside
    return torch.randn(2, 5, 7, 6) * 2


def convs(model):
    return [m for m in model.modules() if isinstance(m, FusedConv2d)]


@pytest.mark.parametrize("act, name", FORMS, ids=FORM_IDS)
def test_epilogue(act, name):
    fused, report = _compare(ConvBnAct(act), _data())
    (conv,) = convs(fused)
    assert conv.folded_bn and conv.activation == name, str(report)
    assert report.fused[f"activation {name}"] == 1, str(report)
    assert report.activations_absorbed == report.activation_sites == 1, str(report)


@pytest.mark.parametrize("act, name", FORMS, ids=FORM_IDS)
def test_prologue(act, name):
    fused, report = _compare(BnActConv(act), _data())
    conv = [c for c in convs(fused) if c.input_affine is not None]
    assert conv and conv[0].input_activation == name, str(report)
    assert report.fused[f"activation {name} in conv's load"] == 1, str(report)


def test_prelu_weight_is_read_at_fuse_time():
    model = ConvBnAct(_prelu(0.3))
    fused, _ = _compare(model, _data())
    # the float32 weight's exact value, spelled in full
    assert convs(fused)[0].activation == "leaky_relu(0.30000001192092896)"
    with torch.no_grad():
        model.act.weight.fill_(0.5)  # a later change is not seen by the fused copy
    assert convs(fused)[0].activation == "leaky_relu(0.30000001192092896)"


class _Traced(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, s):
        return self.fn(x, s)


@pytest.mark.parametrize("fn", [
    lambda x, s: F.leaky_relu(x, s), lambda x, s: F.elu(x, alpha=s),
    lambda x, s: F.hardtanh(x, -1.0, s), lambda x, s: F.softplus(x, 1.0, s),
    lambda x, s: F.leaky_relu(x, 0.1, s),
], ids=["slope", "alpha", "max_val", "threshold", "inplace"])
def test_a_parameter_known_only_at_run_time_is_not_matched(fn):
    graph = fx.symbolic_trace(_Traced(fn)).graph
    node = next(n for n in graph.nodes if n.op == "call_function")
    assert activation_of_node(node, {}) is None


@pytest.mark.parametrize("act", [
    lambda x: F.leaky_relu(x, True), lambda x: F.celu(x, 0.0), lambda x: F.hardtanh(x, 1.0, -1.0),
    lambda x: F.gelu(x, approximate="sigmoid"), lambda x: F.hardtanh(x, -1e39, 1e39),
    lambda x: F.leaky_relu(x, 1e39),
], ids=["bool-slope", "celu-alpha-0", "hardtanh-inverted", "gelu-unknown",
        "hardtanh-beyond-float32", "slope-beyond-float32"])
def test_values_the_formula_cannot_take_are_not_matched(act):
    class Fn(nn.Module):
        def forward(self, x):
            return act(x)
    graph = fx.symbolic_trace(Fn()).graph
    node = next(n for n in graph.nodes if n.op == "call_function")
    assert activation_of_node(node, {}) is None


def test_module_subclass_with_a_forward_of_its_own_is_not_matched():
    class Doubled(nn.LeakyReLU):
        def forward(self, x):
            return 2 * super().forward(x)
    assert activation_of_module(Doubled(0.1)) is None
    assert activation_of_module(nn.CELU(0.0)) is None


def test_per_channel_prelu_stays_and_is_explained():
    model = ConvBnAct(nn.PReLU(7, init=0.2))
    with torch.no_grad():
        model.act.weight.uniform_(-0.5, 0.5)
    fused, report = _compare(model, _data())
    (conv,) = convs(fused)
    assert conv.folded_bn and conv.activation == "none"
    assert any(isinstance(m, nn.PReLU) for m in fused.modules())
    assert report.activations_absorbed == 0 and report.activation_sites == 1, str(report)
    assert any("per-channel weights" in reason for _, reason in report.unfused), str(report)


def test_timm_activation_modules():
    a = pytest.importorskip("timm.layers.activations")
    me = pytest.importorskip("timm.layers.activations_me")
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 4
    from cnnfuse.ref import apply_activation
    for m, name in [(a.Swish(), "silu"), (a.Mish(), "mish"), (a.HardSwish(), "hardswish"),
                    (a.HardSigmoid(), "hardsigmoid"), (a.GELU(), "gelu"),
                    (a.GELUTanh(), "gelu_tanh"), (a.Sigmoid(), "sigmoid"), (a.Tanh(), "tanh"),
                    (a.PReLU(1, init=0.3), "leaky_relu(0.30000001192092896)"),
                    (me.SwishMe(), "silu"), (me.MishMe(), "mish"),
                    (me.HardSwishMe(), "hardswish"), (me.HardSigmoidMe(), "hardsigmoid")]:
        assert activation_of_module(m) == name, type(m)
        # what the table says it computes is what it computes
        torch.testing.assert_close(apply_activation(x, name), m.double()(x.clone()))
    for m in (a.HardMish(), a.QuickGELU(), a.PReLU(4)):
        assert activation_of_module(m) is None, type(m)


@pytest.mark.parametrize("name", ["Mish", "Swish", "HardSwish", "GELUTanh"])
def test_timm_activation_modules_fuse_whole(name):
    # FX would trace into timm's modules (they are not torch.nn's); they stay one call
    a = pytest.importorskip("timm.layers.activations")
    fused, report = _compare(ConvBnAct(getattr(a, name)()), _data())
    (conv,) = convs(fused)
    assert conv.folded_bn and conv.activation == activation_of_module(getattr(a, name)())
    assert report.activations_absorbed == report.activation_sites == 1, str(report)


@pytest.mark.slow
def test_cspresnet50_leaky_relus_are_absorbed():
    timm = pytest.importorskip("timm")
    model = randomize_batchnorm(timm.create_model("cspresnet50", pretrained=False)).eval()
    leaky = sum(isinstance(m, nn.LeakyReLU) for m in model.modules())
    assert leaky > 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
    err = relative_error(got, expected)
    assert err < 1e-5, f"fused cspresnet50 differs by {err:.2e} (relative)"
    report = cnnfuse.explain(model)
    assert not any(isinstance(m, nn.LeakyReLU) for m in fused.modules()), str(report)
    absorbed = sum(n for k, n in report.fused.items() if k.startswith("activation leaky_relu"))
    assert absorbed == leaky, str(report)
    assert report.activations_absorbed == report.activation_sites, str(report)


def test_save_and_load_keep_the_parameters(tmp_path):
    """The activations (epilogue and prologue) travel through cnnfuse.save as their spelling."""
    model = nn.Sequential(ConvBnAct(nn.ELU(0.5)), nn.Conv2d(7, 5, 1),
                          BnActConv(nn.Softplus(2.0, 3.0)))
    fused = cnnfuse.fuse(randomize_batchnorm(model).eval())
    x = _data()
    cnnfuse.save(fused, tmp_path / "m.cnnfuse")
    loaded = cnnfuse.load(tmp_path / "m.cnnfuse")
    acts = sorted(c.activation for c in convs(loaded)) + sorted(
        c.input_activation for c in convs(loaded) if c.input_affine is not None)
    assert "elu(0.5)" in acts and "softplus(2.0,3.0)" in acts, acts
    with torch.no_grad():
        xc = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(loaded(xc), fused(xc))


def test_timm_prelu_traced_through_fuses():
    """timm's PReLU is no leaf of the trace: the graph holds F.prelu(x, weight), the one
    weight read at fuse time; a per-channel one stays."""
    a = pytest.importorskip("timm.layers.activations")
    fused, report = _compare(ConvBnAct(a.PReLU(1, init=-0.375)), _data())
    assert convs(fused)[0].activation == "leaky_relu(-0.375)", str(report)
    model = ConvBnAct(a.PReLU(7, init=0.25))
    with torch.no_grad():
        model.act.weight.uniform_(-0.5, 0.5)
    fused, report = _compare(model, _data())
    assert convs(fused)[0].activation == "none" and report.activations_absorbed == 0
