"""The fused modules' fast eager path (cnnfuse.ops._eager): a plan cached per call signature is
never reused for a call it does not fit, and computes what the op computes.

Each test calls a module once, then again with one thing changed (shape, strides, a channel
slice, a misaligned slice, dtype, residual, out, the module's settings, the backend), on
fresh random data with NaN-poisoned outputs, and checks the answer against the fp64
reference and that a new plan was made. Backends: the reference path (CPU default), the CPU
build of the C++ kernels (CNNFUSE_BACKEND=cuda) and the Triton interpreter (tiny shapes).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnnfuse import backend as cnnfuse_backend
from cnnfuse import ref
from cnnfuse._ext import _C
from cnnfuse.models.modules import (FusedConv2d, FusedPoolConv2d, FusedSeparableConv2d,
                                    FusedSqueezeExcite)
from cnnfuse.ops import _eager

from ..util import assert_within_torch_error, needs_triton, relative_error, triton_runnable

CL = torch.channels_last
BACKENDS = ["auto", "reference",
            pytest.param("cuda", marks=pytest.mark.skipif(_C is None, reason="_C not built")),
            pytest.param("triton", marks=needs_triton)]


def _conv(c=6, k=5, kernel=3, groups=1, activation="relu", residual=False, stride=1,
          padding=(1, 1, 1, 1)):
    m = FusedConv2d(c, k, kernel, (stride, stride), padding, groups=groups,
                    activation=activation, has_residual=residual)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    m.pack_weight()
    return m


def _expected(m: FusedConv2d, x, residual=None):
    """fp64 reference, and PyTorch's own result in x's dtype (for the error bound)."""
    args = (list(m.stride), list(m.padding), list(m.dilation), m.groups, m.activation)
    want = ref.conv2d(x.double(), m.weight.double(), m.bias.double(), *args,
                      None if residual is None else residual.double())
    same = ref.conv2d(x, m.weight.to(x.dtype), m.bias.to(x.dtype), *args, residual)
    return want, same


def _nplans(m) -> int:
    return len(m.__dict__.get("_eager_plans", {}))


def _misaligned(shape):
    """A channels_last tensor whose data starts 4 bytes past a 16-byte boundary."""
    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + 1)
    return flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)


VARIANTS = {  # the second call's input, from the first's shape (2, 6, 5, 7)
    "batch": lambda: torch.randn(3, 6, 5, 7).contiguous(memory_format=CL),
    "height_width": lambda: torch.randn(2, 6, 4, 9).contiguous(memory_format=CL),
    "nchw": lambda: torch.randn(2, 6, 5, 7),
    "channel_slice": lambda: torch.randn(2, 11, 5, 7).contiguous(memory_format=CL)[:, 3:9],
    "misaligned": lambda: _misaligned((2, 6, 5, 7)),
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("change", list(VARIANTS))
def test_conv_plan_is_not_reused_for_another_geometry(change, backend_name, backend):
    backend(backend_name)
    m = _conv()
    first = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        y0 = m(first)
        second = VARIANTS[change]()
        y1 = m(second)
    for x, y in ((first, y0), (second, y1)):
        assert y.is_contiguous(memory_format=CL)
        assert_within_torch_error(y, *reversed(_expected(m, x)))
    assert _nplans(m) == 2, "the second call reused the first call's plan"
    with torch.no_grad():  # and the first plan still serves its own signature
        assert torch.equal(m(first), y0)
    assert _nplans(m) == 2


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_conv_plan_is_not_reused_for_another_dtype(backend_name, backend):
    backend(backend_name)
    m = _conv(residual=True)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    r = torch.randn(2, 5, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        m(x, r)
        m.to(torch.bfloat16)
        xb, rb = x.to(torch.bfloat16), r.to(torch.bfloat16)
        y = m(xb, rb)
    assert y.dtype == torch.bfloat16 and _nplans(m) == 2
    assert_within_torch_error(y, *reversed(_expected(m, xb, rb)))


def test_conv_plan_is_not_reused_for_another_device():
    m = _conv()
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        m(x)
        m.to("meta")
        y = m(x.to("meta"))
    assert y.device.type == "meta" and tuple(y.shape) == (2, 5, 5, 7) and _nplans(m) == 2


def test_resolved_plans_are_used_on_the_cpu_builds(backend):
    """The variants above run the resolved backend there, not the op implementation."""
    for name in [b.values[0] if hasattr(b, "values") else b for b in BACKENDS[2:]]:
        if (name == "cuda" and _C is None) or (name == "triton" and not triton_runnable()):
            continue
        backend(name)
        m = _conv()
        with torch.no_grad():
            m(torch.randn(2, 6, 5, 7).contiguous(memory_format=CL))
        (plan,) = m.__dict__["_eager_plans"].values()
        assert plan.direct is not None, name


def test_fast_path_gives_the_op_bits():
    """Eager plans and the torch.library op (taken under a dispatch mode) agree exactly."""
    m = _conv(residual=True)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    r = torch.randn(2, 5, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        fast = m(x, r)
        assert _nplans(m) == 1
        with FlopCounterMode(display=False):
            assert not _eager.active(x)
            through_op = m(x, r)
    assert _nplans(m) == 1
    assert torch.equal(fast, through_op)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_functional_ops_skip_the_wrapper_and_keep_the_ops_result(backend_name, backend):
    """cnnfuse.ops called eagerly run the op's implementation directly: same result as
    through torch.library, also into a channel slice and with the pooled mean."""
    from cnnfuse import ops
    backend(backend_name)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    w, b = torch.randn(5, 6, 3, 3), torch.randn(5)
    results = []
    for mode in (torch.no_grad(), FlopCounterMode(display=False)):
        with torch.no_grad(), mode:
            buf = torch.full((2, 9, 5, 7), float("nan")).contiguous(memory_format=CL)
            into = ops.conv2d(x, w, b, 1, 1, activation="relu", out=buf, out_channel_offset=3)
            y, pooled = ops.conv2d(x, w, b, 1, 1, activation="relu", return_pooled=True)
            pc = ops.pool_conv2d(x, w[:, :, :1, :1].contiguous(), b, mode="max")
        assert into is buf and buf[:, :3].isnan().all() and buf[:, 8:].isnan().all()
        results.append((buf[:, 3:8], y, pooled, pc))
    for fast, through_op in zip(*results):
        assert torch.equal(fast, through_op)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_residual_and_out_change_between_calls(backend_name, backend):
    backend(backend_name)
    m = _conv(residual=True, activation="relu6")
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        for offset, width in ((0, 5), (0, 9), (3, 9), (2, 7)):
            r = torch.randn(2, 5, 5, 7).contiguous(memory_format=CL)
            buf = torch.full((2, width, 5, 7), float("nan")).contiguous(memory_format=CL)
            out = buf[:, offset:offset + 5]
            got = m(x, r, out=out)
            assert got.data_ptr() == out.data_ptr()
            assert_within_torch_error(out, *reversed(_expected(m, x, r)))
            rest = torch.cat([buf[:, :offset], buf[:, offset + 5:]], 1)
            assert rest.isnan().all(), "wrote outside its slice"
        # a fresh residual with the same signature: the new values, not the cached ones
        r2 = torch.randn(2, 5, 5, 7).contiguous(memory_format=CL)
        assert_within_torch_error(m(x, r2), *reversed(_expected(m, x, r2)))


def test_a_bad_call_after_a_good_one_gets_the_ops_error():
    m = _conv()
    with torch.no_grad():
        m(torch.randn(2, 6, 5, 7))
        with pytest.raises(ValueError, match="x has 4 channels"):
            m(torch.randn(2, 4, 5, 7))
        with pytest.raises(TypeError, match="float64"):
            m(torch.randn(2, 6, 5, 7, dtype=torch.float64))


def test_too_small_input_after_a_good_one():
    m = _conv(padding=(0, 0, 0, 0))
    with torch.no_grad():
        m(torch.randn(1, 6, 5, 5))
        with pytest.raises(ValueError, match="too small"):
            m(torch.randn(1, 6, 2, 2))
        with pytest.raises(ValueError, match="has_residual=False"):
            m(torch.randn(1, 6, 5, 5), torch.randn(1, 5, 3, 3))


@pytest.mark.parametrize("setting", ["activation", "stride", "padding"])
def test_module_settings_changed_after_a_call(setting):
    m = _conv()
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        m(x)
        if setting == "activation":
            m.activation = "sigmoid"
        elif setting == "stride":
            m.stride = (2, 1)
        else:
            m.padding = (0, 2, 1, 0)
        assert_within_torch_error(m(x), *reversed(_expected(m, x)))


@pytest.mark.skipif(_C is None, reason="_C not built")
def test_backend_change_between_calls(backend):
    m = _conv(c=4, k=4, groups=4)  # depthwise: the C++ kernel's CPU build under "cuda"
    x = torch.randn(2, 4, 5, 7).contiguous(memory_format=CL)
    ran = []
    with torch.no_grad():
        for name in ("reference", "cuda", "reference"):
            backend(name)
            with cnnfuse_backend.tracing() as trace:
                y = m(x)
            ran.append(trace[-1][1])
            assert_within_torch_error(y, *reversed(_expected(m, x)))
    assert ran[0] == ran[2] == "reference" and "CPU build" in ran[1], ran


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("route", ["fast", "op"])
@pytest.mark.parametrize("use_out", [False, True], ids=["new", "out"])
def test_float32_weight_with_half_input(dtype, route, use_out):
    """A folded weight kept float32 (it would overflow fp16): the conv runs in float32 and
    the result comes back in x's dtype, also into out= and with the pooled mean."""
    m = _conv(residual=True)
    with torch.no_grad():
        m.weight.mul_(3e4)  # |w·x| far past fp16's 65504 before the 1e-4 below
        m.bias.mul_(3e4)
        x = torch.randn(2, 6, 5, 7, dtype=dtype).contiguous(memory_format=CL) * 1e-4
        r = torch.randn(2, 5, 5, 7, dtype=dtype).contiguous(memory_format=CL)
    want = ref.conv2d(x.double(), m.weight.double(), m.bias.double(), [1, 1], [1, 1, 1, 1],
                      [1, 1], 1, "relu", r.double())
    buf = torch.full((2, 8, 5, 7), float("nan"), dtype=dtype).contiguous(memory_format=CL)
    out = buf[:, 2:7] if use_out else None
    mode = FlopCounterMode(display=False) if route == "op" else torch.no_grad()
    with torch.no_grad(), mode:
        y = m(x, r, out=out)
        m.returns_pooled = not use_out
        pooled = None if use_out else m(x, r)[1]
    assert y.dtype == dtype and torch.isfinite(y).all()
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert relative_error(y, want) <= tol
    if use_out:
        assert y.data_ptr() == out.data_ptr() and buf[:, :2].isnan().all()
    else:
        assert pooled.dtype == torch.float32
        assert relative_error(pooled, y.double().mean((2, 3))) <= 1e-5
    if route == "fast":
        assert _nplans(m) >= 1


def _pair(kind):
    if kind == "separable":
        dw, pw = _conv(6, 6, groups=6, activation="relu6"), _conv(6, 5, kernel=1,
                                                                     padding=(0, 0, 0, 0))
        pw.activation = "silu"
        m = FusedSeparableConv2d(dw, pw)

        def expected(x):
            mid = ref.conv2d(x.double(), dw.weight.double(), dw.bias.double(), [1, 1],
                             [1, 1, 1, 1], [1, 1], 6, "relu6", None)
            want = ref.conv2d(mid, pw.weight.double(), pw.bias.double(), [1, 1], [0] * 4,
                              [1, 1], 1, "silu", None)
            same = F.silu(F.conv2d(F.relu6(F.conv2d(x, dw.weight, dw.bias, 1, 1, 1, 6)),
                                   pw.weight, pw.bias))
            return want, same
        return m, expected
    conv = _conv(6, 5, kernel=1, padding=(0, 0, 0, 0))
    m = FusedPoolConv2d("avg_valid", (3, 3), (1, 1), (1, 1), conv)

    def expected(x):
        pooled = F.avg_pool2d(x.double(), 3, 1, 1, count_include_pad=False)
        want = ref.conv2d(pooled, conv.weight.double(), conv.bias.double(), [1, 1], [0] * 4,
                          [1, 1], 1, "relu", None)
        same = F.relu(F.conv2d(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
                               conv.weight, conv.bias))
        return want, same
    return m, expected


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("change", ["batch", "nchw", "channel_slice", "misaligned"])
@pytest.mark.parametrize("kind", ["separable", "pool"])
def test_pair_plan_is_not_reused_for_another_geometry(kind, change, backend_name, backend):
    backend(backend_name)
    m, expected = _pair(kind)
    first = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        y0 = m(first)
        second = VARIANTS[change]()
        buf = torch.full((second.shape[0], 9, 5, 7), float("nan")).contiguous(memory_format=CL)
        y1 = m(second, out=buf[:, 1:6])
        for x, y in ((first, y0), (second, y1)):
            want, same = expected(x)
            assert_within_torch_error(y, same, want)
    assert buf[:, :1].isnan().all() and buf[:, 6:].isnan().all()
    assert _nplans(m) == 2


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_se_gate_plan_follows_batch_and_dtype(backend_name, backend):
    backend(backend_name)
    fc1, fc2 = _conv(8, 3, kernel=1, padding=(0,) * 4), _conv(3, 8, kernel=1, padding=(0,) * 4)
    fc2.activation = "sigmoid"
    se = FusedSqueezeExcite.from_convs(fc1, fc2)
    w1, b1 = se.w1.double(), se.b1.double()
    w2, b2 = se.w2.double(), se.b2.double()
    with torch.no_grad():
        for n in (2, 3):
            x = torch.randn(n, 8, 4, 5).contiguous(memory_format=CL)
            g = se(x)
            p = x.double().mean((2, 3))
            want = torch.sigmoid(F.linear(torch.relu(F.linear(p, w1, b1)), w2, b2))
            same = torch.sigmoid(F.linear(torch.relu(F.linear(x.mean((2, 3)), se.w1, se.b1)),
                                          se.w2, se.b2))
            assert_within_torch_error(g, same, want)
    assert _nplans(se) == 2


def test_not_taken_while_tracing():
    m = _conv()
    x = torch.randn(1, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        traced = torch.jit.trace(m, (x,), check_trace=False)
    assert "cnnfuse::conv2d" in str(traced.graph)
    assert _nplans(m) == 0
