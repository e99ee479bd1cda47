"""Cached Triton launches (cnnfuse.kernels.launch), on the CPU.

The binder's argument order is checked against Triton's own binder on the project's kernels;
the cache against a stand-in for Triton's launch (no GPU here): a compiled kernel whose
launcher computes in Python, so a hit, a miss, a fallback and the CNNFUSE_CHECK_LAUNCH
comparison are each observable. The GPU run (CNNFUSE_CHECK_LAUNCH=1) checks the real
launcher bit for bit.
"""
import logging

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import (JITFunction, compute_cache_key,
                                create_function_from_signature)

from cnnfuse.kernels import launch
from cnnfuse.kernels.conv2d import _conv2d_kernel
from cnnfuse.kernels.se_gate import _se_gate_kernel


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 0):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)


def _jit(kernel) -> JITFunction:
    """A new JITFunction of the kernel's body (also under TRITON_INTERPRET=1, which wraps it
    otherwise), so no launch state carries over from another test."""
    return JITFunction(kernel.fn)


def _triton_binder(fn):
    return create_function_from_signature(fn.signature, fn.params,
                                          make_backend(GPUTarget("cuda", 90, 32)))


def _arguments(fn, dtype=torch.float16):
    """Positional values for every non-constexpr parameter of fn (tensors for *_ptr, ints of
    every specialisation class otherwise) and keyword values for its constexprs."""
    ints = [1, 16, 3, 0, 48, 7, 2 ** 33, 1]
    args, kwargs = [], {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            kwargs[p.name] = (True, 2, 64, ("leaky_relu", 0.25), "ieee")[i % 5]
        elif p.name.endswith("_ptr"):
            args.append(torch.empty(64, dtype=dtype)[i % 3:])
        elif p.name == "pool_scale":
            args.append(0.25)
        else:
            args.append(ints[i % len(ints)])
    kwargs.update(num_warps=4, num_stages=2)
    return tuple(args), kwargs


@pytest.mark.parametrize("kernel", [_conv2d_kernel, _se_gate_kernel, _scale_kernel],
                         ids=["conv2d", "se_gate", "scale"])
def test_values_in_tritons_order(kernel):
    fn = _jit(kernel)
    args, kwargs = _arguments(fn)
    bound, spec, options = _triton_binder(fn)(*args, **kwargs)
    values = launch.bind_values(fn, args, kwargs)
    bind = launch.make_binder(fn, tuple(map(type, values)))
    key, ours = bind(*args, **kwargs)
    assert len(ours) == len(bound) == len(fn.params)
    assert all(a is b for a, b in zip(ours, bound.values())), "not Triton's order"
    assert launch.cacheable(key[0], key)
    # constexprs are in the values (the launcher skips them, as it does Triton's)
    assert [v for v, p in zip(ours, fn.params) if p.is_constexpr] == \
        [kwargs[p.name] for p in fn.params if p.is_constexpr]


def test_defaults_are_applied():
    fn = _jit(_scale_kernel)
    x = torch.zeros(8)
    args, kwargs = (x, x, 8, 2.0, True), dict(BLOCK=8)
    values = launch.bind_values(fn, args, kwargs)
    key, ours = launch.make_binder(fn, tuple(map(type, values)))(*args, **kwargs)
    assert ours[-1] == 0 and tuple(_triton_binder(fn)(*args, **kwargs)[0].values()) == ours


def _variants():
    """name -> (first call, second call), each (args, kwargs) of _scale_kernel: two calls that
    Triton specialises differently, so a cached launch of the first must not serve the
    second."""
    x = torch.empty(64, dtype=torch.float16)
    assert x.data_ptr() % 16 == 0
    base = (x, x, 5, 1.5, False)
    kw = dict(BLOCK=16, num_warps=4)

    def args(**change):
        a = dict(zip(("x", "y", "n", "factor", "flag"), base))
        a.update(change)
        return tuple(a.values()), kw

    def constexprs(first, second):  # MODE, once as `first`, once as `second`
        return (base, dict(kw, MODE=first)), (base, dict(kw, MODE=second))
    return {
        "misaligned_pointer": ((base, kw), args(x=x[1:])),
        "pointer_dtype": ((base, kw), args(x=x.float())),
        "int_to_one": ((base, kw), args(n=1)),
        "int_divisible_by_16": ((base, kw), args(n=32)),
        "int_past_int32": ((base, kw), args(n=2 ** 31)),
        "bool_for_int": ((base, kw), args(n=True)),
        # equal under Python's ==, not to Triton: the type of each value, a float's sign
        "constexpr_tuple_float_for_int": constexprs((3, 1, 0), (3, 1.0, 0.0)),
        "constexpr_tuple_int_for_bool": constexprs((True, 0), (1, 0)),
        "constexpr_negative_zero": constexprs(0.0, -0.0),
        "runtime_tuple_float_for_int": (args(n=(16, 2)), args(n=(16.0, 2))),
        "runtime_tuple_bool_for_int": (args(flag=(1, 2)), args(flag=(True, 2))),
    }


@pytest.mark.parametrize("change", list(_variants()))
def test_key_is_finer_than_tritons(change):
    fn = _jit(_scale_kernel)
    (args, kwargs), (other, other_kwargs) = _variants()[change]
    tb = _triton_binder(fn)

    def tritons_key(a, k):  # a string: what Triton's own kernel cache is keyed by
        _, specialization, options = tb(*a, **k)
        return compute_cache_key({}, specialization, options)
    assert tritons_key(args, kwargs) != tritons_key(other, other_kwargs), \
        "not a specialisation change"
    bind = launch.make_binder(fn, tuple(map(type, launch.bind_values(fn, args, kwargs))))
    first, _ = bind(*args, **kwargs)
    assert launch.cacheable(first[0], first)
    second, _ = bind(*other, **other_kwargs)
    assert second is None or second != first


def test_equal_values_share_a_key():
    """The key is by value, not identity: a nan constexpr or a rebuilt tuple hits."""
    fn = _jit(_scale_kernel)
    x = torch.empty(64, dtype=torch.float16)
    kwargs = dict(BLOCK=16, MODE=(float("nan"), ("relu", 2)))
    args = (x, x, (16, 2), 1.5, False)
    bind = launch.make_binder(fn, tuple(map(type, launch.bind_values(fn, args, kwargs))))
    key, _ = bind(*args, **kwargs)
    again, _ = bind(x, x, (16, 2), 1.5, False, BLOCK=16, MODE=(float("nan"), ("relu", 2)))
    assert key == again and hash(key) == hash(again) and launch.cacheable(key[0], key)


class _Compiled:
    """Stands in for Triton's CompiledKernel: its launcher computes y = x * factor in Python
    (or something else, to play a wrong launcher)."""

    def __init__(self, log, wrong=False):
        self.log, self.wrong = log, wrong
        self.function, self.packed_metadata = "function", "metadata"

    def launch_metadata(self, grid, stream, *values):
        return ("metadata of", grid)

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, leave,
            *values):
        assert (function, metadata, stream) == ("function", "metadata", 77)
        self.log.append(("direct", (g0, g1, g2), values))
        self.hooks = (launch_metadata, enter, leave)
        x, y, n, factor = values[:4]
        y[:n] = x[:n] * factor + (1e-3 if self.wrong else 0)


@pytest.fixture
def fake_triton(monkeypatch):
    """launch.plain replaced by a Python model of the kernel; the device and stream fixed."""
    calls, device = [], [0]
    compiled = _Compiled(calls)

    def plain(kernel, grid, args, kwargs):
        calls.append(("plain", grid, args))
        x, y, n, factor = args[:4]
        y[:n] = x[:n] * factor
        return compiled
    monkeypatch.setattr(launch, "plain", plain)
    monkeypatch.setattr(launch, "_driver", [(lambda: device[0], lambda d: 77)])
    monkeypatch.delenv("CNNFUSE_CHECK_LAUNCH", raising=False)
    return calls, compiled, device


def _call(fn, x, y, n=5, factor=2.0, cache=None, grid=(1,), **constexprs):
    launch.launch(fn, grid, (x, y, n, factor, False), dict(BLOCK=16, num_warps=4, **constexprs),
                  cache)


def test_second_call_launches_directly_with_tritons_values(fake_triton):
    calls, _, _ = fake_triton
    fn = _jit(_scale_kernel)
    x, y = torch.randn(8), torch.full((8,), float("nan"))
    _call(fn, x, y)
    _call(fn, x, y, grid=(3, 2))
    assert [c[0] for c in calls] == ["plain", "direct"]
    assert calls[1][1] == (3, 2, 1)
    assert calls[1][2] == tuple(_triton_binder(fn)(x, y, 5, 2.0, False, BLOCK=16,
                                                   num_warps=4)[0].values())
    assert torch.equal(y[:5], x[:5] * 2) and y[5:].isnan().all()


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int_one", "int_16", "float_value",
                                    "constexpr", "option", "device", "other_cache", "debug",
                                    "instrumentation", "stages_hook", "global_changed"])
def test_a_changed_call_misses(fake_triton, monkeypatch, change):
    from triton import knobs
    calls, _, device = fake_triton
    fn = _jit(_scale_kernel)
    # a global the kernel read when compiled (Triton records them in cache_key())
    read = {"SCALE": (1, 2)}
    fn.used_global_vals = {("SCALE", id(read)): ((1, 2), read)}
    x, y = torch.randn(40), torch.empty(40)
    _call(fn, x, y)
    _call(fn, x, y)  # cached
    args = dict(x=x, y=y)
    extra = {}
    if change == "misaligned":
        args = dict(x=x[1:], y=y)
    elif change == "dtype":
        args = dict(x=x.double(), y=y.double())
    elif change == "int_one":
        args["n"] = 1
    elif change == "int_16":
        args["n"] = 16
    elif change == "float_value":
        args["factor"] = 3.0
    elif change == "constexpr":
        extra = dict(MODE=1)
    elif change == "option":
        launch.launch(fn, (1,), (x, y, 5, 2.0, False), dict(BLOCK=16, num_warps=8))
    elif change == "device":
        device[0] = 1
    elif change == "other_cache":
        args["cache"] = {}
    elif change == "debug":  # JITFunction.run adds it to the options
        monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    elif change == "instrumentation":
        monkeypatch.setattr(knobs.compilation, "instrumentation_mode", "consan")
    elif change == "stages_hook":  # its hash goes into Triton's key
        monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", lambda: ("k", "h"))
    elif change == "global_changed":  # Triton raises: the plain launch must be the one to run
        read["SCALE"] = (1, 3)
    if change != "option":
        _call(fn, **args, **extra)
    assert [c[0] for c in calls] == ["plain", "direct", "plain"]


def test_unhashable_launch_options_launch_plain(fake_triton):
    """Options Triton accepts as lists or dicts (extern_libs, ptx_options) cannot be a key."""
    calls, _, _ = fake_triton
    fn = _jit(_scale_kernel)
    x, y = torch.randn(8), torch.empty(8)
    for options in (dict(extern_libs={"libdevice": "/libdevice.bc"}), dict(ptx_options=["-v"])):
        for _ in range(2):
            launch.launch(fn, (1,), (x, y, 5, 2.0, False), dict(BLOCK=16, **options))
    assert [c[0] for c in calls] == ["plain"] * 4


def test_gluon_descriptors_launch_plain(fake_triton, monkeypatch):
    """gluon's TensorDescriptor carries a shared-memory layout Triton specialises on; two that
    differ only there must not share a cached kernel."""
    hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    gl = pytest.importorskip("triton.experimental.gluon.language")
    calls, compiled, _ = fake_triton
    monkeypatch.setattr(launch, "plain", lambda *a: calls.append(("plain",)) or compiled)
    fn = _jit(_scale_kernel)
    base, y = torch.zeros(64, 64, dtype=torch.float16), torch.empty(8)
    descs = [hopper.TensorDescriptor(base, [64, 64], [64, 1], [64, 64], gl.NVMMASharedLayout(
        swizzle_byte_width=width, element_bitwidth=16, rank=2)) for width in (128, 64)]
    assert not launch._is_descriptor(type(descs[0]))
    for desc in descs:
        launch.launch(fn, (1,), (desc, y, 0, 2.0, False), dict(BLOCK=16))
    assert [c[0] for c in calls] == ["plain", "plain"]


def test_launch_hooks_reach_the_launcher(fake_triton, monkeypatch):
    from triton import knobs
    _, compiled, _ = fake_triton
    fn = _jit(_scale_kernel)
    x, y = torch.randn(8), torch.empty(8)
    _call(fn, x, y)
    _call(fn, x, y)
    assert compiled.hooks == (None, None, None)  # no hook: nothing to call, no metadata

    def profiler(metadata):
        pass
    enter = knobs.runtime.launch_enter_hook
    if hasattr(enter, "calls"):  # a HookChain: its list swapped, the old one back after
        monkeypatch.setattr(enter, "calls", [profiler])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", profiler)
    _call(fn, x, y, grid=(2,))
    assert compiled.hooks[0] == ("metadata of", (2,))
    assert compiled.hooks[1] is knobs.runtime.launch_enter_hook


def test_the_cache_a_caller_passes_holds_its_entries(fake_triton):
    calls, _, _ = fake_triton
    fn = _jit(_scale_kernel)
    x, y, mine = torch.randn(8), torch.empty(8), {}
    _call(fn, x, y, cache=mine)
    _call(fn, x, y, cache=mine)
    assert len(mine) == 1 and not getattr(fn, launch._STATE).cache
    assert [c[0] for c in calls] == ["plain", "direct"]


def test_plain_launch_where_the_fast_one_does_not_apply(fake_triton, monkeypatch, caplog):
    calls, _, _ = fake_triton
    fn = _jit(_scale_kernel)
    x, y = torch.randn(8), torch.empty(8)
    for _ in range(2):
        _call(fn, x, y, grid=lambda meta: (1,))  # a callable grid
    from triton.runtime.interpreter import InterpretedFunction
    interpreted = InterpretedFunction(_scale_kernel.fn)
    for _ in range(2):
        _call(interpreted, x, y)
    for _ in range(2):  # a tuple holding a tensor: its identity would be the key
        launch.launch(fn, (1,), (x, y, 5, 2.0, False), dict(BLOCK=16, MODE=(x,)))
    assert [c[0] for c in calls] == ["plain"] * 6
    unchecked = _jit(_se_gate_kernel)
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    with caplog.at_level(logging.WARNING, logger="cnnfuse"):
        for _ in range(2):
            _call(unchecked, x, y)
    assert [c[0] for c in calls[6:]] == ["plain"] * 2
    assert "3.2.0" in caplog.text and "Triton's own launcher" in caplog.text


def test_another_type_pattern_launches_plain_then_caches(fake_triton):
    calls, _, _ = fake_triton
    fn = _jit(_scale_kernel)
    x, y = torch.randn(8), torch.empty(8)
    _call(fn, x, y)
    _call(fn, x, y, n=True)  # bool where an int was
    _call(fn, x, y, n=True)
    _call(fn, x, y)
    _call(fn, x, y, n=True)
    assert [c[0] for c in calls] == ["plain", "plain", "direct", "direct", "direct"]


def test_check_mode_compares_with_tritons_launch(fake_triton, monkeypatch):
    calls, compiled, _ = fake_triton
    monkeypatch.setenv("CNNFUSE_CHECK_LAUNCH", "1")
    fn = _jit(_scale_kernel)
    x, y = torch.randn(8), torch.full((8,), float("nan"))
    _call(fn, x, y)
    _call(fn, x, y)  # direct on y, plain on a copy: equal
    assert [c[0] for c in calls] == ["plain", "direct", "plain"]
    copy = calls[2][2][1]
    assert copy.data_ptr() != y.data_ptr() and copy.data_ptr() % 16 == y.data_ptr() % 16
    compiled.wrong = True
    with pytest.raises(RuntimeError, match="y_ptr"):
        _call(fn, x, y)


def test_check_mode_only_launches_during_a_graph_capture(fake_triton, monkeypatch):
    """Comparing synchronises, which a CUDA graph capture forbids: the cached launch alone."""
    calls, _, _ = fake_triton
    monkeypatch.setenv("CNNFUSE_CHECK_LAUNCH", "1")
    fn = _jit(_scale_kernel)
    x, y = torch.randn(8), torch.empty(8)
    _call(fn, x, y)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _call(fn, x, y)
    assert [c[0] for c in calls] == ["plain", "direct"]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _call(fn, x, y)
    assert [c[0] for c in calls] == ["plain", "direct", "direct", "plain"]


def test_scratch_copy_keeps_strides_and_alignment():
    base = torch.randn(3, 40)
    for t in (base[:, 1:30:2], base.t()[3:], base[1:, 5:]):
        c = launch._scratch_copy(t)
        assert c.stride() == t.stride() and torch.equal(c, t)
        assert c.data_ptr() % 16 == t.data_ptr() % 16 and c.data_ptr() != t.data_ptr()


def test_tma_descriptors_key_on_their_layout():
    from triton.tools.tensor_descriptor import TensorDescriptor
    fn = _jit(_scale_kernel)
    base = torch.empty(64, 32, dtype=torch.float16)
    desc = TensorDescriptor.from_tensor(base, [16, 16])
    args, kwargs = (desc, base, 5, 1.0, False), dict(BLOCK=16)
    bind = launch.make_binder(fn, tuple(map(type, launch.bind_values(fn, args, kwargs))))
    key, values = bind(*args, **kwargs)
    assert launch.cacheable(key[0], key)
    assert tuple(_triton_binder(fn)(*args, **kwargs)[0].values()) == values
    for other in (TensorDescriptor.from_tensor(base, [32, 16]),
                  TensorDescriptor.from_tensor(base[:32], [16, 16]),
                  TensorDescriptor.from_tensor(base.float(), [16, 16]),
                  TensorDescriptor.from_tensor(torch.empty(64, 32, dtype=torch.float16),
                                               [16, 16], padding="nan")):
        assert bind(other, *args[1:], **kwargs)[0] != key


# --- on a GPU: the real launcher ----------------------------------------------------------------

def _se_gate_launch(n=5, c=40, r=12, dtype=torch.float16):
    from cnnfuse.kernels.se_gate import _tiles
    dev = dict(device="cuda", dtype=dtype)
    pooled, gate = torch.randn(n, c, device="cuda"), torch.full((n, c), float("nan"), **dev)
    w1, b1, w2, b2 = (torch.randn(r, c, **dev), torch.randn(r, **dev),
                      torch.randn(c, r, **dev), torch.randn(c, **dev))
    tiles = _tiles(r)
    grid = (triton.cdiv(n, tiles["BLOCK_N"]),)
    args = (pooled, w1, b1, w2, b2, gate, n, c, r, *pooled.stride(), *w1.stride(),
            *w2.stride(), *gate.stride())
    kwargs = dict(HAS_B1=True, HAS_B2=True, ACT1=1, ACT2=6, **tiles, num_warps=4,
                  num_stages=1)
    return grid, args, kwargs, gate


@pytest.mark.cuda
def test_cached_launch_on_the_gpu_gives_tritons_bits(monkeypatch):
    from cnnfuse.kernels.se_gate import _se_gate_kernel
    grid, args, kwargs, gate = _se_gate_launch()
    _se_gate_kernel[grid](*args, **kwargs)
    want = gate.clone()
    plain_calls = []
    real_plain = launch.plain
    monkeypatch.setattr(launch, "plain", lambda *a: plain_calls.append(1) or real_plain(*a))
    cache = {}
    for check in ("0", "1", "0"):
        monkeypatch.setenv("CNNFUSE_CHECK_LAUNCH", check)
        gate.fill_(float("nan"))
        compiled = launch.launch(_se_gate_kernel, grid, args, kwargs, cache)
        torch.cuda.synchronize()
        assert compiled is not None and torch.equal(gate, want)
    # the first call and the checked one went through Triton; the others launched directly
    assert len(plain_calls) == 2 and len(cache) == 1
    misaligned = torch.empty(gate.numel() + 1, dtype=gate.dtype, device="cuda")[1:].view(
        gate.shape)
    launch.launch(_se_gate_kernel, grid, args[:5] + (misaligned,) + args[6:], kwargs, cache)
    torch.cuda.synchronize()
    assert len(plain_calls) == 3 and len(cache) == 2 and torch.equal(misaligned, want)


@pytest.mark.cuda
def test_resolved_cuda_plan_gives_the_op_bits(monkeypatch, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode
    from cnnfuse.models.modules import FusedConv2d
    monkeypatch.setenv("CNNFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CNNFUSE_CHECK_LAUNCH", "1")
    m = FusedConv2d(16, 32, 3, (1, 1), (1, 1, 1, 1), activation="relu").cuda().half()
    x = torch.randn(2, 16, 9, 11, device="cuda", dtype=torch.half).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        first = m(x)
        (plan,) = m.__dict__["_eager_plans"].values()
        assert plan.direct is not None, "the autotuner's pick did not resolve the plan"
        second = m(x)
        with FlopCounterMode(display=False):
            through_op = m(x)
    assert torch.equal(first, second) and torch.equal(second, through_op)
