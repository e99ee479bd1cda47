"""Plans that resolve once (cnnfuse.ops._eager): a plan on a CPU build calls its backend
directly from the first call; a CUDA plan does once the autotuner's pick for it is final, and
goes back to the op's implementation whenever the picks could change.

The CPU builds are exercised for real (the C++ kernels' CPU build, the Triton interpreter):
the direct call gives the op implementation's bits. The CUDA resolution is exercised on the
CPU with the op implementation replaced by one that asks a real Autotuner, so that a final
pick, a non-final one and each invalidation are observable.
"""
import functools

import pytest
import torch

from cnnfuse import autotune
from cnnfuse import backend as cnnfuse_backend
from cnnfuse._ext import _C
from cnnfuse.models.modules import FusedConv2d, FusedPoolConv2d, FusedSeparableConv2d
from cnnfuse.ops import _eager

from ..util import needs_triton

CL = torch.channels_last
BUILDS = [pytest.param("cuda", marks=pytest.mark.skipif(_C is None, reason="_C not built")),
          pytest.param("triton", marks=needs_triton)]


def _conv(c=6, k=5, kernel=3, groups=1, activation="relu", residual=False, scale=False):
    m = FusedConv2d(c, k, kernel, (1, 1), (kernel // 2,) * 4, groups=groups,
                    activation=activation, has_residual=residual)
    m.has_input_scale = scale
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    m.pack_weight()
    return m


def _plans(m):
    return list(m.__dict__.get("_eager_plans", {}).values())


def _run_op(m, x, residual=None, input_scale=None, dest=None, pool=None):
    """The op implementation itself on the same arguments (what the plan must equal)."""
    from cnnfuse.ops.conv2d import _run
    return _run(x, m.weight, m.bias, list(m.stride), list(m.padding), list(m.dilation),
                m.groups, m.activation, residual, (input_scale, None, "none"), dest, pool)


CASES = {
    "dense": dict(),
    "depthwise": dict(c=6, k=6, groups=6),
    "residual": dict(residual=True),
    "input_scale": dict(scale=True),
    "pooled": dict(pooled=True),
    "into_slice": dict(into=True),
}


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_build_plan_calls_its_backend_directly(case, build, backend):
    backend(build)
    opts = dict(CASES[case])
    pooled, into = opts.pop("pooled", False), opts.pop("into", False)
    m = _conv(**opts)
    m.returns_pooled = pooled
    x = torch.randn(2, m.in_channels, 5, 7).contiguous(memory_format=CL)
    r = torch.randn(2, m.out_channels, 5, 7).contiguous(memory_format=CL) if m.has_residual \
        else None
    s = torch.rand(2, m.in_channels) if m.has_input_scale else None
    buf = torch.full((2, m.out_channels + 3, 5, 7), float("nan")).contiguous(memory_format=CL)
    out = buf[:, 1:1 + m.out_channels] if into else None
    with torch.no_grad():
        with cnnfuse_backend.tracing() as trace:
            got = m(x, r, s, out=out)
        want_pool = torch.empty(2, m.out_channels) if pooled else None
        want = _run_op(m, x, r, s, None, want_pool)
    (plan,) = _plans(m)
    assert isinstance(plan, _eager.OpImplConv) and plan.direct is not None
    assert trace and ("CPU build" in trace[-1][1] or "interpreter" in trace[-1][1]), trace
    if pooled:
        got, got_pool = got
        assert torch.equal(got_pool, want_pool)
    if into:
        assert got.data_ptr() == out.data_ptr() and buf[:, :1].isnan().all()
        got = buf[:, 1:1 + m.out_channels]
    assert torch.equal(got, want)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("kind", ["separable", "pool"])
def test_cpu_build_pair_plan_calls_its_backend_directly(kind, build, backend):
    backend(build)
    if kind == "separable":
        m = FusedSeparableConv2d(_conv(6, 6, groups=6, activation="relu6"), _conv(6, 5, 1))
    else:
        m = FusedPoolConv2d("max", (3, 3), (1, 1), (1, 1), _conv(6, 5, 1))
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        first = m(x)
        (plan,) = _plans(m)
        assert plan.direct is not None
        plan.direct = None  # the op implementation, as before the plan resolved
        assert torch.equal(m(x), first)


# --- CUDA resolution, with the op implementation asking a real Autotuner ----------------------

class _PickingRun:
    """Stands in for conv2d._run on a GPU: asks the autotuner for `key` among two candidates
    (the CPU build's library conv under the name 'cudnn', a failing one), then runs the pick."""

    def __init__(self, tuner):
        self.tuner, self.calls = tuner, 0

    def __call__(self, x, weight, bias, stride, padding, dilation, groups, activation,
                 residual, prologue, dest, pool=None):
        from cnnfuse.ops import conv2d as _
        import sys
        op = sys.modules["cnnfuse.ops.conv2d"]
        self.calls += 1
        lib = functools.partial(op._library_conv, x, weight, bias, stride, padding, dilation,
                                groups, activation, residual, dest)
        candidates = {"cudnn": lib, "never": lambda: pytest.fail("ran the other candidate")}
        name = self.tuner.pick("k", candidates, reference=lib, tolerance=1e-2, default="cudnn")
        return candidates[name]()


@pytest.fixture
def gpu_like(monkeypatch, backend):
    """A plan that resolves like a CUDA one: made as OpImplConv with nothing resolved, its
    op implementation asking a real Autotuner whose pick comes from `preset`."""
    import sys
    backend("cuda")
    tuner = autotune.Autotuner("conv2d")
    run = _PickingRun(tuner)
    monkeypatch.setattr(sys.modules["cnnfuse.ops.conv2d"], "_run", run)
    # on a GPU there is no CPU build to resolve to at once: only the pick resolves the plan
    monkeypatch.setattr(_eager.DirectConv, "for_cpu", classmethod(lambda cls, *args: None))
    monkeypatch.setattr(autotune, "preset", {"conv2d": {"k": "cudnn"}})
    monkeypatch.setattr(autotune, "recording", None)
    if _C is None:
        pytest.skip("_C not built")
    m = _conv(residual=True)
    plan = _eager.OpImplConv([1, 1], [1, 1, 1, 1], [1, 1], 1, "relu", "none")
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    r = torch.randn(2, 5, 5, 7).contiguous(memory_format=CL)

    def call():
        with torch.no_grad():
            return plan(x, m.weight, m.bias, r)
    return plan, run, call


def test_a_final_pick_resolves_the_plan(gpu_like):
    plan, run, call = gpu_like
    first = call()
    assert run.calls == 1 and plan.direct is not None and plan.direct.kind == "cudnn"
    with cnnfuse_backend.tracing() as trace:
        second = call()
    assert run.calls == 1, "the resolved plan still called the op implementation"
    assert trace == [("conv2d", "cuDNN + CUDA C++ bias_act")]
    assert torch.equal(first, second)


@pytest.mark.parametrize("change", ["preset", "recording", "tf32"])
def test_a_resolved_plan_asks_again_when_the_picks_could_change(gpu_like, monkeypatch, change):
    plan, run, call = gpu_like
    call()
    call()
    assert run.calls == 1
    if change == "preset":
        monkeypatch.setattr(autotune, "preset", {"conv2d": {"k": "cudnn"}})
    elif change == "recording":
        monkeypatch.setattr(autotune, "recording", {})
    else:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32",
                            not torch.backends.cudnn.allow_tf32)
    call()
    assert run.calls == 2
    if change == "recording":
        assert autotune.recording == {"conv2d": {"k": "cudnn"}}  # tune saw the key
        call()
        assert run.calls == 3  # and keeps seeing it while it records


def test_a_pick_that_is_not_final_leaves_the_plan_unresolved(gpu_like, monkeypatch):
    plan, run, call = gpu_like
    monkeypatch.setattr(autotune, "preset", {})
    monkeypatch.setattr(autotune.Autotuner, "_load", lambda self: {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    call()
    call()
    assert run.calls == 2 and plan.direct is None


def test_autotuner_says_which_picks_are_final(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "preset", {"conv2d": {"p": "a"}})
    monkeypatch.setattr(autotune, "recording", None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuner = autotune.Autotuner("conv2d")
    tuner._table = {"t": {"best": "b"}}
    cands = {"a": lambda: torch.ones(1), "b": lambda: torch.ones(1)}

    def final(key, candidates=cands):
        with autotune.observing() as seen:
            tuner.pick(key, candidates, reference=lambda: torch.ones(1), tolerance=1e-3,
                       default="a")
        (pick,) = seen
        assert pick.candidate is candidates[pick.name]
        return pick.final
    assert final("p") and final("t")  # the preset, the cache
    assert final("one", {"a": cands["a"]})  # a single candidate
    monkeypatch.setenv("CNNFUSE_AUTOTUNE", "0")
    assert final("off")  # autotuning off: the default for as long as it stays off
    monkeypatch.delenv("CNNFUSE_AUTOTUNE")
    failing = {"a": lambda: torch.zeros(1), "b": lambda: torch.zeros(1)}
    assert not final("all wrong", failing)  # every candidate off: not kept
    monkeypatch.setattr(autotune, "recording", {})
    assert not final("p")  # cnnfuse.tune must see every call
    monkeypatch.setattr(autotune, "recording", None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not final("captured")


def test_a_pick_is_final_by_its_own_key_while_another_thread_picks(monkeypatch):
    """Two threads share a tuner: the one whose candidates all fail must not be told final
    because the other's pick, made in between, was."""
    import threading
    monkeypatch.setattr(autotune, "preset", {})
    monkeypatch.setattr(autotune, "recording", None)
    monkeypatch.setattr(autotune.Autotuner, "_load", lambda self: {})
    monkeypatch.setattr(autotune.Autotuner, "_save", lambda self: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuner = autotune.Autotuner("conv2d")
    inside, done, picks = threading.Event(), threading.Event(), {}

    def wrong():  # the other thread picks while this candidate runs
        inside.set()
        assert done.wait(10)
        return torch.zeros(1)

    def pick(key, candidates, default):
        with autotune.observing() as seen:
            tuner.pick(key, candidates, reference=lambda: torch.ones(1), tolerance=1e-3,
                       default=default)
        picks[key] = seen

    def failing():
        pick("A", {"x": wrong, "y": lambda: torch.zeros(1)}, "x")

    def other():
        assert inside.wait(10)
        try:
            pick("B", {"only": lambda: torch.ones(1)}, "only")
        finally:
            done.set()
    threads = [threading.Thread(target=failing), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [(p.key, p.name, p.final) for p in picks["A"]] == [("A", "x", False)]
    assert [(p.key, p.name, p.final) for p in picks["B"]] == [("B", "only", True)]


def test_nested_observing_blocks_each_keep_their_own_list(monkeypatch):
    monkeypatch.setattr(autotune, "preset", {"conv2d": {"k": "a"}})
    monkeypatch.setattr(autotune, "recording", None)
    tuner = autotune.Autotuner("conv2d")

    def pick():
        tuner.pick("k", {"a": None}, reference=None, tolerance=0, default="a")
    with autotune.observing() as outer:
        with autotune.observing() as inner:  # equal lists (both empty) until a pick
            pass
        pick()
        with autotune.observing() as inner:
            pick()
    assert len(outer) == 2 and len(inner) == 1
    assert autotune._observing.lists == []  # nothing left collecting picks


def test_plans_pickle_without_their_resolved_backend(backend):
    """A copy keeps the geometry only, and resolves again on its own first call."""
    import copy
    import pickle
    if _C is None:
        pytest.skip("_C not built")
    backend("cuda")
    m = _conv()
    pair = FusedPoolConv2d("max", (3, 3), (1, 1), (1, 1), _conv(6, 5, 1))
    x = torch.randn(1, 6, 4, 4).contiguous(memory_format=CL)
    with torch.no_grad():
        y, y_pair = m(x), pair(x)
    (plan,), (pair_plan,) = _plans(m), _plans(pair)
    assert plan.direct is not None and pair_plan.direct is not None
    restored = pickle.loads(pickle.dumps(plan))
    assert restored.direct is None and restored.args == plan.args
    restored_pair = pickle.loads(pickle.dumps(pair_plan))
    assert restored_pair.direct is None and restored_pair.args == pair_plan.args
    with torch.no_grad(), cnnfuse_backend.tracing() as trace:
        assert torch.equal(restored(x, m.weight, m.bias), y)
        assert torch.equal(restored_pair(x, pair.conv.weight, pair.conv.bias), y_pair)
    assert restored.direct is not None and restored_pair.direct is not None
    assert trace[0] == ("conv2d", plan.direct.label)
    assert ("pool_conv2d", pair_plan.direct.label) in trace
    clone, pair_clone = copy.deepcopy(m), copy.deepcopy(pair)
    with torch.no_grad():
        assert torch.equal(clone(x), y) and torch.equal(pair_clone(x), y_pair)
    assert all(p.direct is not None for p in _plans(clone) + _plans(pair_clone))


# --- the operand conversions a resolved CUDA plan makes, as conv2d._run does ------------------

def _cuda_stand_in(x):
    """What DirectConv reads of x when it is made (device, strides, shape), saying CUDA."""
    import types
    return types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), stride=x.stride,
                                 shape=x.shape)


@pytest.fixture
def received(monkeypatch):
    """conv2d's backends replaced by ones recording the x, weight and residual they get."""
    import sys
    op = sys.modules["cnnfuse.ops.conv2d"]
    seen = {}

    def recorder(offset):
        def backend(*args):
            seen.update(x=args[offset], weight=args[offset + 1], residual=args[offset + 8])
            return args[offset]
        return backend
    for name in ("_library_conv", "_cudnn_fused", "_depthwise"):
        monkeypatch.setattr(op, name, recorder(0))
    monkeypatch.setattr(op, "_triton", recorder(1))  # after the config
    return seen


@pytest.mark.parametrize("kind,depthwise", [
    (kind, dw) for dw in (False, True) for kind in ("triton", "cudnn", "cudnn_fused", "depthwise")
    if dw or kind != "depthwise"])  # the depthwise kernel runs depthwise convs only
def test_resolved_cuda_conv_converts_the_operands_as_run_does(received, kind, depthwise):
    """On CUDA _run makes x (unless already NHWC or a channel slice of NHWC) and the residual
    channels_last, and the weight too unless the conv is depthwise (its packed tap-major
    layout is the one every backend is timed with)."""
    from cnnfuse.ops._direct import DirectConv
    from cnnfuse.ops.depthwise_conv2d import pack_weight
    c, k = (8, 8) if depthwise else (8, 6)
    groups = c if depthwise else 1
    weight = torch.randn(k, c // groups, 3, 3)
    if depthwise:
        weight = pack_weight(weight)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], groups, "relu", "none")
    nchw = torch.randn(2, c, 5, 7)
    wide = torch.randn(2, k + 3, 5, 7).contiguous(memory_format=CL)
    residual = wide[:, 1:1 + k]  # a channel slice: not channels_last-contiguous
    plan = DirectConv(kind, object(), kind, geometry, _cuda_stand_in(nchw), weight, residual,
                      True)
    plan(nchw, weight, None, residual, None, None, None, None)
    assert received["x"].is_contiguous(memory_format=CL), "x not made channels_last"
    assert torch.equal(received["x"], nchw)
    assert received["residual"].is_contiguous(memory_format=CL), "residual not converted"
    assert torch.equal(received["residual"], residual)
    if depthwise:  # kept as packed, not copied
        assert received["weight"] is weight
    else:
        assert received["weight"].is_contiguous(memory_format=CL), "weight not converted"
        assert torch.equal(received["weight"], weight)
    # operands already in _run's layouts reach the backend as they are
    x = nchw.contiguous(memory_format=CL)
    residual = residual.contiguous(memory_format=CL)
    weight = weight if depthwise else weight.contiguous(memory_format=CL)
    plan = DirectConv(kind, object(), kind, geometry, _cuda_stand_in(x), weight, residual, True)
    plan(x, weight, None, residual, None, None, None, None)
    assert received["x"] is x and received["weight"] is weight
    assert received["residual"] is residual


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["nchw_input", "nchw_input_triton", "residual_slice",
                                  "residual_slice_triton", "depthwise_cudnn", "depthwise",
                                  "pooled", "into_slice", "tuned"])
def test_resolved_cuda_plan_gives_run_bits(case, monkeypatch, tmp_path):
    """A resolved CUDA plan against conv2d._run on the same arguments, bit for bit: operands
    in other layouts than _run's, a depthwise conv on a library backend, a pooled result,
    a channel slice of a wider output."""
    from cnnfuse.ops.conv2d import _run
    from cnnfuse.ops.depthwise_conv2d import pack_weight
    monkeypatch.setenv("CNNFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "recording", None)
    monkeypatch.setattr(autotune, "preset", {})  # "tuned": the autotuner's own search
    depthwise = case.startswith("depthwise")
    n, c, k, h, w = 2, 16, 16 if depthwise else 24, 9, 11
    groups = c if depthwise else 1
    dev = dict(device="cuda", dtype=torch.half)
    weight = torch.randn(k, c // groups, 3, 3, **dev) * 0.2
    weight = pack_weight(weight) if depthwise else weight.contiguous(memory_format=CL)
    bias = torch.randn(k, **dev)
    x = torch.randn(n, c, h, w, **dev)
    if not case.startswith("nchw_input"):
        x = x.contiguous(memory_format=CL)
    residual = None
    if case.startswith("residual_slice"):
        residual = torch.randn(n, k + 5, h, w, **dev).contiguous(memory_format=CL)[:, 2:2 + k]
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], groups, "relu", "none")
    if case != "tuned":
        if case.endswith("_triton"):  # the kernel's default config for this conv
            from cnnfuse.kernels import conv2d as kernel
            problem = kernel.Conv2dProblem.of_conv(x.shape, weight.shape, *geometry[:4])
            name, kind = kernel.default_config(problem, dtype=x.dtype).name, "triton"
        else:
            name = kind = "depthwise" if case == "depthwise" else "cudnn"

        class Always(dict):  # every conv2d key picks `name`
            def get(self, key, default=None):
                return name
        monkeypatch.setattr(autotune, "preset", {"conv2d": Always()})
    plan = _eager.OpImplConv(*geometry)

    def outputs():
        buf = torch.full((n, k + 4, h, w), float("nan"), **dev).contiguous(memory_format=CL)
        dest = buf[:, 3:3 + k] if case == "into_slice" else None
        pool = torch.full((n, k), float("nan"), device="cuda") if case == "pooled" else None
        return buf, dest, pool

    def run(fn):
        buf, dest, pool = outputs()
        y = fn(dest, pool)
        torch.cuda.synchronize()
        return y, buf, pool
    with torch.no_grad():
        first = run(lambda dest, pool: plan(x, weight, bias, residual, None, None, dest, pool))
        assert plan.direct is not None, "the pick did not resolve the plan"
        if case != "tuned":
            assert plan.direct.kind == kind
        second = run(lambda dest, pool: plan(x, weight, bias, residual, None, None, dest, pool))
        want = run(lambda dest, pool: _run(x, weight, bias, *geometry[:4], "relu", residual,
                                           (None, None, "none"), dest, pool))
    for got in (first, second):
        y, buf, pool = got
        assert torch.equal(y, want[0])
        if case == "into_slice":
            assert y.data_ptr() == buf[:, 3:].data_ptr() and buf[:, :3].isnan().all()
            assert torch.equal(buf[:, 3:3 + k], want[1][:, 3:3 + k])
        if case == "pooled":
            assert torch.equal(pool, want[2])


def test_a_pair_resolves_on_its_own_pick_among_its_convs_picks(monkeypatch, backend):
    """The two-ops backend of a pair asks the autotuner for its convs too: the pair's plan
    resolves on the pair's own pick."""
    import sys
    if _C is None:
        pytest.skip("_C not built")
    backend("cuda")
    module = sys.modules["cnnfuse.ops.pool_conv2d"]
    calls = []

    def picking_run(*args):
        calls.append(args)
        for op, name in (("conv2d", "cudnn"), ("pool_conv2d", "two_ops"), ("conv2d", "cudnn")):
            autotune.Autotuner(op).pick("k", {name: None}, reference=None, tolerance=0,
                                        default=name)
        return module._two_ops(*args)
    monkeypatch.setattr(module, "_run", picking_run)
    # as on a GPU: no CPU build to resolve to at once, only the pick resolves the plan
    monkeypatch.setattr(_eager.DirectPair, "for_cpu", classmethod(lambda cls, *args: None))
    monkeypatch.setattr(autotune.Autotuner, "_load", lambda self: {})  # no GPU to name
    monkeypatch.setattr(autotune, "preset", {})
    monkeypatch.setattr(autotune, "recording", None)
    plan = _eager.OpImplPair("pool_conv2d", ("max", [3, 3], [1, 1], [1, 1, 1, 1], "relu"))
    conv = _conv(6, 5, 1)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        first = plan(x, conv.weight, conv.bias)
        assert plan.direct is not None and len(calls) == 1
        with cnnfuse_backend.tracing() as trace:
            second = plan(x, conv.weight, conv.bias)
    assert len(calls) == 1 and trace[0] == ("pool_conv2d", "two ops")
    assert torch.equal(first, second)
