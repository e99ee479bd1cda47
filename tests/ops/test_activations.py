"""The activation table (cnnfuse.ref.activation) and every backend that computes it: the
reference and eager's in-place forms, the Triton conv epilogue and prologue and the SE gate
(interpreted on the CPU), the C++ bias_act and depthwise kernels (CPU build) — each against
PyTorch's own module in float64 on values at the kinks (0, thresholds, bounds)."""
import math
import os
import re
import subprocess
import sys
import timeit
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnfuse import ops, ref
from cnnfuse.ops.conv2d import CUDNN_FUSED_CODES
from cnnfuse.ref import activation as table

from ..util import DTYPE_IDS, DTYPES, triton_runnable

ROOT = Path(__file__).resolve().parents[2]

# Every activation with its defaults, and the parametrised ones at other values: negative
# and > 1 slopes (a PReLU weight may be either), small and large alphas, an asymmetric
# hardtanh, softplus with other beta and threshold, celu with a negative alpha (PyTorch takes
# it: alpha·(exp(x/alpha) - 1) below 0, an exponent that is then positive).
NAMES = list(ref.ACTIVATIONS) + [
    "leaky_relu(0.2)", "leaky_relu(-0.5)", "leaky_relu(1.5)", "elu(0.5)", "elu(2.0)",
    "celu(0.7)", "celu(3.0)", "celu(-1.0)", "celu(-0.5)", "hardtanh(-2.0,0.5)",
    "softplus(2.0,5.0)", "softplus(0.5,1.0)", "softplus(-1.5,3.0)",
]

# NaN and the infinities: PyTorch lets NaN through every activation and gives each its limit
# at ±inf (or NaN where the formula is inf·0: silu, hardswish, gelu, mish at -inf).
SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -1.0, 2.0]


def torch_module(name: str) -> nn.Module:
    """PyTorch's own module for an activation spelling."""
    code, a, b = ref.activation_args(name)
    base = ref.ACTIVATIONS[code]
    if base == "leaky_relu":  # as a PReLU with one weight: the same function
        return nn.LeakyReLU(a) if a >= 0 else _prelu(a)
    make = {
        "none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU,
        "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "elu": lambda: nn.ELU(a), "celu": lambda: nn.CELU(a), "selu": nn.SELU,
        "mish": nn.Mish, "tanh": nn.Tanh, "hardtanh": lambda: nn.Hardtanh(a, b),
        "softplus": lambda: nn.Softplus(a, b),
    }[base]
    return make()


def _prelu(a: float) -> nn.Module:
    m = nn.PReLU(1)
    with torch.no_grad():
        m.weight.fill_(a)
    return m


def kinks(name: str) -> list:
    """Where the activation's formula changes or loses precision most easily."""
    code, a, b = ref.activation_args(name)
    base = ref.ACTIVATIONS[code]
    points = [0.0, 1.0, -1.0, 30.0, -30.0]
    if base == "softplus":
        points.append(b / a)  # where beta·x reaches the threshold
    points += {"relu6": [6.0], "hardswish": [-3.0, 3.0], "hardsigmoid": [-3.0, 3.0],
               "hardtanh": [a, b], "mish": [20.0], "tanh": [9.0, -9.0]}.get(base, [])
    return points


def kink_data(name: str, n: int = 2) -> torch.Tensor:
    """(rows, 37) float64 values: each kink, just either side of it at several scales, and
    at least n rows of random values; 37 is odd, so no vector width divides it."""
    offsets = [0.0, 1e-6, -1e-6, 1e-3, -1e-3, 0.05, -0.05, 0.4, -0.4, 0.6, -0.6]
    values = torch.tensor([k + o for k in kinks(name) for o in offsets], dtype=torch.float64)
    g = torch.Generator().manual_seed(len(name))
    extra = (-values.numel()) % 37 + n * 37
    return torch.cat([values, torch.randn(extra, generator=g, dtype=torch.float64) * 4]).view(
        -1, 37)


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """The identity convs below pass x through exactly only with fp32 products (a GPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def assert_close_elementwise(ours, torch_same, ref64, dtype):
    """|ours - ref64| <= 2 |torch_same - ref64| + eps(dtype) |ref64| + tiny, per element: a
    formula that cancels (exp(x) - 1 near 0) fails even where values are small."""
    eps = {torch.float32: 2e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    tiny = {torch.float32: 1e-20, torch.float16: 2.0 ** -24, torch.bfloat16: 1e-20}[dtype]
    ours, torch_same = ours.double(), torch_same.double()
    bound = 2 * (torch_same - ref64).abs() + eps * ref64.abs() + tiny
    bad = ((ours - ref64).abs() > bound) | (ours.isnan() & ~ref64.isnan())  # NaN: unwritten
    assert not bad.any(), (
        f"{int(bad.sum())} values off; first at x-index {int(bad.flatten().nonzero()[0])}: "
        f"ours {ours.flatten()[bad.flatten()][0].item()!r}, "
        f"fp64 {ref64.flatten()[bad.flatten()][0].item()!r}")


# ------------------------------------------------------------------ the table itself

def _enum_names(source: str, enum: str) -> list:
    body = re.search(rf"enum {enum}[^{{]*{{(.*?)}};", source, re.S).group(1)
    names = [e.split("=")[0].strip() for e in body.split(",") if e.strip()]
    return [n for n in names if n != "kNumActivations"]


def _snake(cpp: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", cpp[1:]).lower()


def test_cpp_enum_follows_the_table():
    source = (ROOT / "csrc/common/activation.h").read_text()
    assert [_snake(n) for n in _enum_names(source, "Activation")] == list(ref.ACTIVATIONS)
    switch = source[source.index("float activate("):]
    for cpp in _enum_names(source, "Activation")[1:]:
        assert f"case {cpp}:" in switch, f"activate() has no case for {cpp}"


def test_triton_has_a_branch_per_code():
    source = (ROOT / "kernels/activation.py").read_text()
    codes = {int(c) for c in re.findall(r"CODE == (\d+):", source)}
    assert codes == set(range(1, len(ref.ACTIVATIONS)))
    from cnnfuse.kernels.activation import _PARAMETRISED
    assert set(_PARAMETRISED) == {ref.ACTIVATIONS.index(n) for n in table.PARAMETERS}


def test_every_activation_has_an_inplace_form_and_a_reference():
    assert set(table._INPLACE) == set(ref.ACTIVATIONS)
    assert len(table._REFERENCE) == len(ref.ACTIVATIONS)
    assert set(table.PARAMETERS) <= set(ref.ACTIVATIONS)


def test_cudnn_fused_builds_exactly_the_codes_it_is_sent():
    source = (ROOT / "csrc/conv2d/cudnn_fused.cpp").read_text()
    body = source[source.index("TensorPtr apply_activation("):]
    body = body[:body.index("\n}\n")]
    header = (ROOT / "csrc/common/activation.h").read_text()
    enum = _enum_names(header, "Activation")
    cases = {enum.index(c) for c in re.findall(r"case (k\w+):", body)}
    assert cases == set(CUDNN_FUSED_CODES)


# ------------------------------------------------------------------ spelling

@pytest.mark.parametrize("spelled, canonical", [
    ("relu", "relu"), ("leaky_relu", "leaky_relu(0.01)"), ("leaky_relu( 0.2 )", "leaky_relu(0.2)"),
    ("leaky_relu(-0.0)", "leaky_relu(0.0)"), ("elu", "elu(1.0)"), ("elu(1)", "elu(1.0)"),
    ("hardtanh", "hardtanh(-1.0,1.0)"), ("hardtanh(0,6)", "relu6"),
    ("softplus", "softplus(1.0,20.0)"), ("softplus(2, 10)", "softplus(2.0,10.0)"),
    ("leaky_relu(0.1)", "leaky_relu(0.1)"), ("selu", "selu"),
])
def test_canonical_spelling(spelled, canonical):
    assert ref.canonical(spelled) == canonical
    assert ref.canonical(canonical) == canonical
    assert ref.activation_name(*ref.activation_args(spelled)) == canonical


def test_canonical_from_parameters_is_exact():
    assert ref.canonical("leaky_relu", 0.1) == "leaky_relu(0.1)"
    slope = 0.1 + 0.2  # 0.30000000000000004: the spelling keeps every bit
    assert ref.activation_args(ref.canonical("leaky_relu", slope))[1] == slope
    assert ref.canonical("hardtanh", 0, 6) == "relu6"
    assert ref.canonical("elu", 1) == ref.canonical("elu")


@pytest.mark.parametrize("bad, error, match", [
    ("swish", ValueError, "not supported"), ("leaky_relu(0.1,0.2)", ValueError, "1 parameter"),
    ("relu(1)", ValueError, "0 parameter"), ("elu(a)", ValueError, "must be numbers"),
    ("celu(0)", ValueError, "alpha must not be 0"), ("hardtanh(1,-1)", ValueError, "above"),
    ("softplus(0,20)", ValueError, "beta"), ("leaky_relu(nan)", ValueError, "NaN"),
    ("hardtanh(-1e39,1e39)", ValueError, "float32"), ("leaky_relu(1e39)", ValueError, "float32"),
    ("softplus(1.0,-3.5e38)", ValueError, "float32"), ("elu(-1e300)", ValueError, "float32"),
    (3, TypeError, "must be a str"),
])
def test_bad_spellings(bad, error, match):
    with pytest.raises(error, match=match):
        ref.activation_args(bad)


def test_float32_range_edges():
    """Infinite parameters and float32's largest are taken; one ulp of float64 past it is not
    (PyTorch raises for a float32 tensor)."""
    big = float(torch.finfo(torch.float32).max)
    assert ref.activation_args("hardtanh(-inf,inf)")[1:] == (-math.inf, math.inf)
    assert ref.activation_args(f"hardtanh({-big!r},{big!r})")[1:] == (-big, big)
    with pytest.raises(ValueError, match="float32"):
        ref.canonical("hardtanh", -1.0, math.nextafter(big, math.inf))
    with pytest.raises(RuntimeError, match="overflow"):
        nn.Hardtanh(-1.0, math.nextafter(big, math.inf))(torch.zeros(2))


def test_op_errors_name_the_argument():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="input_activation: .*swish"):
        ops.conv2d(x, torch.randn(4, 4, 1, 1), input_affine=torch.ones(2, 4),
                   input_activation="swish")
    with pytest.raises(ValueError, match="activation: .*1 parameter"):
        ops.bias_act(x, activation="elu(1,2)")


def test_parsed_lookup_is_under_a_microsecond():
    for name in ("leaky_relu(0.2)", "relu"):
        ref.activation_args(name)
        best = min(timeit.repeat(lambda: ref.activation_args(name), number=20000, repeat=5))
        assert best / 20000 < 1e-6, f"{name}: {best / 20000 * 1e9:.0f} ns a lookup"


def special_data() -> torch.Tensor:
    """(1, 37) float64: SPECIALS repeated to an odd length."""
    return torch.tensor((SPECIALS * 5)[:37], dtype=torch.float64).view(1, 37)


def assert_specials(ours, ref64):
    """NaN where PyTorch (float64) has NaN, the same infinities, the finite limits to fp32
    rounding. float64, not float32: PyTorch's vectorised float32 CPU gelu gives NaN at +inf
    (its limit, and its CUDA kernel's result, is +inf)."""
    ours, ref64 = ours.double().flatten(), ref64.double().flatten()
    where = [i for i in range(ours.numel()) if not (
        (ours[i].isnan() and ref64[i].isnan()) or ours[i] == ref64[i]
        or abs(ours[i] - ref64[i]) <= 1e-6 * abs(ref64[i]) + 1e-7)]
    assert not where, (f"{len(where)} values off; f({(SPECIALS * 5)[where[0] % 37]}) = "
                       f"{ours[where[0]].item()} (PyTorch {ref64[where[0]].item()})")


# ------------------------------------------------------------------ reference and eager forms

@pytest.mark.parametrize("name", NAMES)
def test_reference_is_pytorch(name):
    x = kink_data(name)
    module = torch_module(name).double()
    torch.testing.assert_close(ref.apply_activation(x, name), module(x), rtol=1e-13,
                               atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_reference_specials(name):
    x = special_data()
    want = torch_module(name).double()(x)
    assert_specials(ref.apply_activation(x, name), want)
    assert_specials(ref.apply_activation(x.float(), name), want)
    assert_specials(table.activate_(x.float(), name), torch_module(name)(x.float()))


@pytest.mark.parametrize("name", NAMES)
def test_inplace_forms_give_eager_bits(name):
    x = kink_data(name).float()
    y = x.clone()
    out = table.activate_(y, name)
    assert torch.equal(out, torch_module(name)(x))
    if name not in ("none", "gelu", "gelu_tanh") and not name.startswith("softplus"):
        assert out.data_ptr() == y.data_ptr()  # in place


# ------------------------------------------------------------------ C++ kernels (CPU build)

def _nchw(x2d: torch.Tensor, dtype) -> torch.Tensor:
    """(rows, 37) values as a channels_last (1, 37, rows, 1) tensor."""
    return x2d.t().reshape(1, 37, -1, 1).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_bias_act_cpp(name, dtype, backend):
    backend("cuda")
    x = _nchw(kink_data(name), dtype)
    out = torch.full_like(x, float("nan"))
    ops.bias_act(x, activation=name, out=out)
    module = torch_module(name)
    assert_close_elementwise(out, module(x.float()).to(dtype) if dtype != torch.float32
                             else module(x), module.double()(x.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_depthwise_cpp(name, dtype, backend):
    """A 1x1 depthwise conv of weight 1: the epilogue sees the kink values exactly."""
    backend("cuda")
    x = _nchw(kink_data(name), dtype)
    w = torch.ones(37, 1, 1, 1, dtype=dtype)
    out = torch.full_like(x, float("nan"))
    ops.depthwise_conv2d(x, w, activation=name, out=out)
    module = torch_module(name)
    assert_close_elementwise(out, module(x.float()).to(dtype) if dtype != torch.float32
                             else module(x), module.double()(x.double()), dtype)


@pytest.mark.parametrize("name", NAMES)
def test_bias_act_cpp_specials(name, backend):
    backend("cuda")
    x = _nchw(special_data(), torch.float32)
    out = torch.full_like(x, 123.0)
    ops.bias_act(x, activation=name, out=out)
    assert_specials(out.flatten(), torch_module(name).double()(x.double()).flatten())


@pytest.mark.parametrize("name", NAMES)
def test_depthwise_cpp_specials(name, backend):
    backend("cuda")
    x = _nchw(special_data(), torch.float32)
    out = torch.full_like(x, 123.0)
    ops.depthwise_conv2d(x, torch.ones(37, 1, 1, 1), activation=name, out=out)
    assert_specials(out.flatten(), torch_module(name).double()(x.double()).flatten())


def test_depthwise_schema_takes_the_parameters():
    x = _nchw(kink_data("elu(0.5)"), torch.float32)
    code, p0, p1 = ref.activation_args("hardtanh(-0.5,0.25)")
    out = torch.empty_like(x)
    torch.ops.cnnfuse.depthwise_conv2d(x, torch.ones(37, 1, 1, 1), None, [1, 1], [0, 0, 0, 0],
                                       [1, 1], code, None, out, None, p0, p1)
    assert torch.equal(out, x.clamp(-0.5, 0.25))


# ------------------------------------------------------------------ Triton (interpreter)

needs_triton = pytest.mark.skipif(not triton_runnable(),
                                  reason="Triton needs a GPU or TRITON_INTERPRET=1")


def _eye_conv_inputs(name, dtype):
    """x (1, 37, n, 1) of kink values and the identity 1x1 weight: conv(x) = x exactly."""
    x = _nchw(kink_data(name), dtype)
    w = torch.eye(37, dtype=dtype).view(37, 37, 1, 1).contiguous(
        memory_format=torch.channels_last)
    return x, w


@needs_triton
@pytest.mark.parametrize("name", NAMES)
def test_triton_conv_epilogue(name, backend):
    backend("triton")
    x, w = _eye_conv_inputs(name, torch.float32)
    out = torch.full((1, 37, x.shape[2], 1), float("nan")).contiguous(
        memory_format=torch.channels_last)
    ops.conv2d(x, w, activation=name, out=out)
    module = torch_module(name)
    assert_close_elementwise(out, module(x), module.double()(x.double()), torch.float32)


@needs_triton
@pytest.mark.parametrize("name", NAMES)
def test_triton_conv_prologue(name, backend):
    """input_affine (scale 1, shift 0) then the activation as x loads."""
    backend("triton")
    x, w = _eye_conv_inputs(name, torch.float32)
    affine = torch.stack([torch.ones(37), torch.zeros(37)])
    y = ops.conv2d(x, w, input_affine=affine, input_activation=name)
    module = torch_module(name)
    assert_close_elementwise(y, module(x), module.double()(x.double()), torch.float32)


def _one_channel(x: torch.Tensor) -> torch.Tensor:
    """(1, 37) values as a (1, 1, 37, 1) tensor: a 1x1 conv of weight 1 over one channel
    passes them through, inf and NaN included (an identity over 37 channels would add inf·0)."""
    return x.float().view(1, 1, 37, 1).contiguous(memory_format=torch.channels_last)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf·0
@pytest.mark.parametrize("name", NAMES)
def test_triton_conv_epilogue_specials(name, backend):
    backend("triton")
    x = _one_channel(special_data())
    out = torch.full_like(x, 123.0)
    ops.conv2d(x, torch.ones(1, 1, 1, 1), activation=name, out=out)
    assert_specials(out, torch_module(name).double()(x.double()))


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf·0
@pytest.mark.parametrize("name", NAMES)
def test_triton_conv_prologue_specials(name, backend):
    backend("triton")
    x = _one_channel(special_data())
    y = ops.conv2d(x, torch.ones(1, 1, 1, 1), input_affine=torch.tensor([[1.0], [0.0]]),
                   input_activation=name)
    assert_specials(y, torch_module(name).double()(x.double()))


@needs_triton
@pytest.mark.parametrize("name", ["leaky_relu(0.2)", "elu(0.5)", "hardtanh(-2.0,0.5)",
                                  "softplus(2.0,5.0)", "mish", "tanh", "selu", "celu(0.7)"])
def test_triton_fp16_epilogue(name, backend):
    backend("triton")
    x, w = _eye_conv_inputs(name, torch.float16)
    y = ops.conv2d(x, w, activation=name)
    module = torch_module(name)
    assert_close_elementwise(y, module(x.float()).half(), module.double()(x.double()),
                             torch.float16)


@needs_triton
@pytest.mark.parametrize("name", NAMES)
def test_se_gate(name, backend):
    """Both of the gate's activations; the identity FC layers pass the kink values through."""
    backend("triton")
    pooled = kink_data(name, n=1).float()  # (N, 37)
    eye = torch.eye(37)
    gate = ops.se_gate(pooled, eye, None, eye, None, activation="none", gate_activation=name)
    same, ref64 = torch_module(name)(pooled), torch_module(name).double()(pooled.double())
    assert_close_elementwise(gate, same, ref64, torch.float32)
    h = ops.se_gate(pooled, eye, None, eye, None, activation=name, gate_activation="none")
    assert_close_elementwise(h, same, ref64, torch.float32)


PAIR_NAMES = ["leaky_relu(-0.5)", "elu(0.5)", "celu(3.0)", "selu", "mish", "tanh",
              "hardtanh(-2.0,0.5)", "softplus(2.0,5.0)"]


@needs_triton
@pytest.mark.parametrize("name", PAIR_NAMES)
def test_triton_separable_both_activations(name, backend):
    """A 1x1 depthwise of weight 1 (the kink values pass) with its activation, then the
    identity 1x1 with the same one again."""
    backend("triton")
    x, w = _eye_conv_inputs(name, torch.float32)
    y = ops.separable_conv2d(x, torch.ones(37, 1, 1, 1), None, w, dw_activation=name,
                             activation=name)
    m = torch_module(name)
    same, ref64 = m(m(x)), torch_module(name).double()(torch_module(name).double()(x.double()))
    assert_close_elementwise(y, same, ref64, torch.float32)


@needs_triton
@pytest.mark.parametrize("name", PAIR_NAMES)
def test_triton_pool_conv2d_epilogue(name, backend):
    """A 1x1 max pool (the identity) and the identity 1x1 conv: the epilogue alone."""
    backend("triton")
    x, w = _eye_conv_inputs(name, torch.float32)
    y = ops.pool_conv2d(x, w, mode="max", kernel_size=1, activation=name)
    assert_close_elementwise(y, torch_module(name)(x), torch_module(name).double()(x.double()),
                             torch.float32)


def test_bare_code_of_a_parametrised_activation_is_refused():
    from cnnfuse.kernels.activation import act_code
    fn = getattr(act_code, "fn", act_code)
    with pytest.raises(ValueError, match="needs the triple"):
        fn(ref.activation_code("leaky_relu"))
    assert fn(ref.activation_code("tanh")) == ref.activation_code("tanh")
    assert fn(ref.activation_args("elu(0.5)")) == ref.activation_code("elu")


def test_opcheck_parametrised_schemas():
    x = _nchw(kink_data("elu(0.5)"), torch.float32)
    code, p0, p1 = ref.activation_args("elu(0.5)")
    torch.library.opcheck(torch.ops.cnnfuse.bias_act.default,
                          (x, None, None, code, torch.empty_like(x), None, p0, p1))
    torch.library.opcheck(torch.ops.cnnfuse.depthwise_conv2d.default,
                          (x, torch.ones(37, 1, 1, 1), None, [1, 1], [0, 0, 0, 0], [1, 1],
                           code, None, torch.empty_like(x), None, p0, p1))
    assert math.isclose(p0, 0.5)


# ------------------------------------------------------------------ ahead of time, for sm_90

AOT_SCRIPT = """
import sys, torch
from cnnfuse import ref
from cnnfuse.kernels.conv2d import Conv2dConfig, Conv2dProblem, compile_for_shape
p = Conv2dProblem(2, 32, 9, 9, 32, 3, 3, padding=(1, 1, 1, 1), input_affine=torch.float32,
                  activation=ref.activation_args(sys.argv[1]),
                  input_activation=ref.activation_args(sys.argv[2]))
# one K split: the epilogue is in this kernel, not in a split-K sum
print(compile_for_shape(p, Conv2dConfig(64, 32, 32, 4, 3), torch.float16).asm["ptx"])
"""


@pytest.mark.parametrize("epilogue, prologue, immediates", [
    ("leaky_relu(0.3)", "hardtanh(-2.0,0.5)", ("0f3E99999A", "0fC0000000", "0f3F000000")),
])
def test_parameters_specialise_the_compiled_kernel(epilogue, prologue, immediates):
    """Compiled for sm_90 as a launch specialises it, each parameter is an immediate operand
    of the PTX (0.3 is 0f3E99999A, -2 0fC0000000, 0.5 0f3F000000).
    Compiling needs TRITON_INTERPRET unset, so it runs in a subprocess."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT, epilogue, prologue], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for imm in immediates:
        assert imm in done.stdout, f"{imm} not in the PTX of {epilogue} / {prologue}"


NAN_PTX_SCRIPT = """
import re, sys, torch, triton, triton.language as tl
from cnnfuse import ref
from cnnfuse.kernels.activation import apply_activation
from cnnfuse.kernels.aot import compile_specialised

@triton.jit
def act_kernel(x_ptr, y_ptr, ACT: tl.constexpr):
    offs = tl.arange(0, 128)
    tl.store(y_ptr + offs, apply_activation(tl.load(x_ptr + offs), ACT))

for name in sys.argv[1:]:
    act = ref.activation_args(name)
    act = act if act[0] in (9, 10, 11, 15, 16) else act[0]
    x = torch.empty(128)
    ptx = compile_specialised(act_kernel, (x, x), dict(ACT=act)).asm["ptx"]
    print(name, sorted(set(re.findall(r"\\b(?:min|max)(?:\\.\\w+)*\\.f(?:32|64)\\b", ptx))),
          "f64" in ptx)
"""


def test_compiled_clamps_let_nan_through(tmp_path):
    """Compiled for sm_90, every float min/max of the activations is the NaN-propagating one
    (min.NaN.f32 / max.NaN.f32); the plain min.f32 returns the other operand, so relu(NaN)
    would be 0 on the GPU. No float64. A @jit function must live in a file: the script is
    written to one."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = sorted(set(NAMES))
    script = tmp_path / "act_ptx.py"
    script.write_text(NAN_PTX_SCRIPT)
    done = subprocess.run([sys.executable, str(script), *names], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(names)
    for line in lines:
        name, rest = line.split(" ", 1)
        ops_used, f64 = rest.rsplit(" ", 1)
        assert f64 == "False", f"{name}: float64 in the PTX"
        for op in eval(ops_used):
            assert ".NaN." in op, f"{name}: {op} drops NaN"
