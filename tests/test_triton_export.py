"""cnnfuse::conv2d_triton (a torch.library triton_op): the Triton conv at one tile config,
written by cnnfuse.export where the autotuner picked a Triton config on CUDA, so that
torch.compile and AOTInductor see (and an AOTInductor package carries) the kernel itself.

On the CPU: the op's schema (opcheck on the reference), its launch under the interpreter
(the same bits as kernels.conv2d's own launcher), export of a model on fake CUDA tensors with
simulated picks (the rewritten calls, the keys the conv op itself would ask), and the Triton
kernel HOP that AOTAutograd traces from the program, with a symbolic batch. On a GPU: the
AOTInductor package of a Triton-picked model runs the kernel, without Python's launcher, to
the same outputs."""
import contextlib
import importlib
import logging
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                   StatelessSymbolicContext)
from torch.utils._python_dispatch import TorchDispatchMode

import cnnfuse
from cnnfuse import autotune
from cnnfuse.kernels.conv2d_configs import Conv2dConfig, Conv2dProblem, default_config
from cnnfuse.ops import triton_conv2d, triton_window_conv2d
from cnnfuse.ops.triton_conv2d import config_list

from .util import needs_triton, randomize_batchnorm

OPS = torch.ops.cnnfuse


@pytest.fixture(autouse=True)
def _no_picks(monkeypatch):
    monkeypatch.delenv("CNNFUSE_PICKS", raising=False)
    monkeypatch.setattr(autotune, "preset", {})
    monkeypatch.setattr(autotune, "recording", None)


def _nhwc(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _conv_args(n=3, c=5, h=7, w=9, k=12, r=3, s=3, stride=(1, 1), padding=(1, 1, 1, 1),
               groups=1, activation="relu", residual=False, prologue=False,
               dtype=torch.float32):
    x = _nhwc(n, c, h, w, dtype=dtype)
    weight = _nhwc(k, c // groups, r, s, dtype=dtype) * 0.3
    bias = torch.randn(k, dtype=dtype)
    oh = (h + padding[2] + padding[3] - r) // stride[0] + 1
    ow = (w + padding[0] + padding[1] - s) // stride[1] + 1
    res = _nhwc(n, k, oh, ow, dtype=dtype) if residual else None
    scale = torch.rand(n, c, dtype=dtype) if prologue else None
    affine = torch.randn(2, c) if prologue else None
    return (x, weight, bias, list(stride), list(padding), [1, 1], groups, activation, res,
            scale, affine, "relu" if prologue else "none")


CONFIG = config_list(Conv2dConfig(32, 16, 16, 4, 1))
SPLIT = config_list(Conv2dConfig(32, 16, 16, 4, 1, 8, 3))


# ----------------------------------------------------------------------- the op itself

def test_opcheck_on_the_cpu_implementation():
    args = _conv_args(residual=True, prologue=True)
    torch.library.opcheck(OPS.conv2d_triton.default, args + (CONFIG, False))
    torch.library.opcheck(OPS.conv2d_triton_pooled.default, args + (CONFIG, False))
    out = torch.zeros(3, 15, 7, 9).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.conv2d_triton_into.default, args + (CONFIG, False, out, 2))


def test_cpu_implementation_is_the_conv2d_op():
    args = _conv_args(residual=True, prologue=True)
    want = OPS.conv2d.default(*args)
    assert torch.equal(OPS.conv2d_triton.default(*args, CONFIG, False), want)
    y, pool = OPS.conv2d_triton_pooled.default(*args, CONFIG, False)
    assert torch.equal(y, want)
    assert torch.allclose(pool, want.double().mean((2, 3)).float(), rtol=1e-5, atol=1e-6)


def test_flops_are_counted_as_for_the_ops_they_stand_for():
    from torch.utils.flop_counter import FlopCounterMode
    for op, args in (("conv2d", _conv_args()), ("separable_conv2d", _separable_args()),
                     ("pool_conv2d", _pool_args())):
        counts = []
        for fn, extra in ((getattr(OPS, op).default, ()),
                          (getattr(OPS, f"{op}_triton").default, (CONFIG, False))):
            with FlopCounterMode(display=False) as counter:
                fn(*args, *extra)
            counts.append(counter.get_total_flops())
        assert counts[0] == counts[1] > 0, (op, counts)


@pytest.mark.parametrize("config,message", [
    ([32, 16, 16, 4], "7 positive ints"), ([32, 16, 16, 4, 1, 8, 0], "7 positive ints"),
    ([24, 16, 16, 4, 1, 8, 1], "block_m=24 must be a power of two")])
def test_a_malformed_config_is_refused(config, message):
    with pytest.raises(ValueError, match=message):
        OPS.conv2d_triton.default(*_conv_args(), config, False)


def test_bad_arguments_are_refused_as_by_conv2d():
    x, w, *rest = _conv_args()
    with pytest.raises(ValueError, match="channels"):
        OPS.conv2d_triton.default(x, w[:, :4], *rest, CONFIG, False)


# ------------------------------------------------------- the launch, under the interpreter

def _poisoned_like(y):
    return torch.full_like(y, float("nan"))


@needs_triton
@pytest.mark.parametrize("case,config", [
    (dict(), CONFIG), (dict(residual=True, prologue=True), SPLIT),
    (dict(c=3, k=10, r=5, s=3, padding=(1, 1, 2, 2)), SPLIT),
    (dict(c=8, k=16, stride=(2, 1), padding=(0, 1, 1, 0), groups=4,
          activation="leaky_relu(0.2)"), CONFIG),
    (dict(c=16, k=9, r=1, s=1, padding=(0, 0, 0, 0), dtype=torch.bfloat16), SPLIT)],
    ids=["plain", "residual-prologue-split-k3", "stem-5x3-split-k3", "grouped-stride",
         "1x1-bf16-split-k3"])
def test_the_launch_is_kernels_conv2d_launch(monkeypatch, case, config):
    """Under TRITON_INTERPRET=1 the op launches the kernel itself: the same bits as
    kernels.conv2d's launcher at the same config, and within PyTorch's own error of fp64."""
    from cnnfuse import ref
    from cnnfuse.ops.conv2d import _triton
    from .util import assert_within_torch_error
    monkeypatch.setenv("CNNFUSE_BACKEND", "triton")
    args = _conv_args(**case)
    x, w, b, stride, padding, dilation, groups, act, res, scale, affine, in_act = args
    cfg = Conv2dConfig(*config)
    tf32 = torch.backends.cudnn.allow_tf32  # what _triton passes
    y = OPS.conv2d_triton.default(*args, config, tf32)
    want = _poisoned_like(y)
    _triton(cfg, x, w, b, stride, padding, dilation, groups, act, res, want,
            (scale, affine, in_act))
    assert torch.equal(y, want)
    ref64 = ref.conv2d(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    same = ref.conv2d(*args)
    assert_within_torch_error(y, same, ref64)
    # into a slice of a poisoned buffer: only that slice is written
    out = torch.full((y.shape[0], y.shape[1] + 5, *y.shape[2:]), float("nan"),
                     dtype=y.dtype).contiguous(memory_format=torch.channels_last)
    OPS.conv2d_triton_into.default(*args, config, tf32, out, 3)
    assert torch.equal(out[:, 3:3 + y.shape[1]], y)
    assert out[:, :3].isnan().all() and out[:, 3 + y.shape[1]:].isnan().all()
    if case.get("dtype", torch.float32) == torch.float32:
        y2, pool = OPS.conv2d_triton_pooled.default(*args, config, tf32)
        assert torch.equal(y2, y)
        assert torch.allclose(pool, y.double().mean((2, 3)).float(), rtol=1e-5, atol=1e-6)


def _separable_args(n=2, c=12, h=9, w=7, k=10, dtype=torch.float32):
    x = _nhwc(n, c, h, w, dtype=dtype)
    dw = torch.randn(c, 1, 3, 3, dtype=dtype)
    return (x, dw, torch.randn(c, dtype=dtype), [2, 1], [1, 1, 1, 1], [1, 1], "relu6",
            _nhwc(k, c, 1, 1, dtype=dtype) * 0.3, torch.randn(k, dtype=dtype), "silu", None)


def _pool_args(n=2, c=12, h=9, w=7, k=10, mode="max", dtype=torch.float32):
    x = _nhwc(n, c, h, w, dtype=dtype)
    return (x, mode, [3, 3], [1, 1], [1, 1, 1, 1], _nhwc(k, c, 1, 1, dtype=dtype) * 0.3,
            torch.randn(k, dtype=dtype), "relu", _nhwc(n, k, h, w, dtype=dtype))


def test_opcheck_of_the_window_ops_on_the_cpu_implementation():
    out = torch.zeros(2, 13, 5, 7).contiguous(memory_format=torch.channels_last)
    args = _separable_args()
    torch.library.opcheck(OPS.separable_conv2d_triton.default, args + (CONFIG, False))
    torch.library.opcheck(OPS.separable_conv2d_triton_into.default,
                          args + (CONFIG, False, out, 2))
    assert torch.equal(OPS.separable_conv2d_triton.default(*args, CONFIG, False),
                       OPS.separable_conv2d.default(*args))
    args = _pool_args()
    out = torch.zeros(2, 13, 9, 7).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.pool_conv2d_triton.default, args + (CONFIG, False))
    torch.library.opcheck(OPS.pool_conv2d_triton_into.default, args + (CONFIG, False, out, 3))
    assert torch.equal(OPS.pool_conv2d_triton.default(*args, CONFIG, False),
                       OPS.pool_conv2d.default(*args))
    with pytest.raises(ValueError, match=r"weight has shape \(10, 4, 1, 1\); expected"):
        OPS.pool_conv2d_triton.default(*args[:5], args[5][:, :4], *args[6:], CONFIG, False)


@needs_triton
@pytest.mark.parametrize("op,make,config", [
    ("separable_conv2d", _separable_args, CONFIG),
    ("separable_conv2d", lambda: _separable_args(dtype=torch.bfloat16), SPLIT),
    ("pool_conv2d", _pool_args, SPLIT),
    ("pool_conv2d", lambda: _pool_args(mode="avg_valid"), CONFIG)],
    ids=["separable", "separable-bf16-split-k3", "max-pool-split-k3", "avg-pool"])
def test_the_window_launch_is_the_window_ops_launch(monkeypatch, op, make, config):
    """Under the interpreter: the same bits as the op's own Triton launch at that config,
    into a fresh tensor and into a slice of a poisoned buffer."""
    monkeypatch.setenv("CNNFUSE_BACKEND", "triton")
    module = importlib.import_module(f"cnnfuse.ops.{op}")
    args = make()
    y = getattr(OPS, f"{op}_triton").default(*args, config, torch.backends.cudnn.allow_tf32)
    want = module._triton(Conv2dConfig(*config), *args, _poisoned_like(y))
    assert torch.equal(y, want)
    assert torch.allclose(y.float(), getattr(OPS, op).default(*args).float(), rtol=2e-2,
                          atol=2e-2)
    out = torch.full((y.shape[0], y.shape[1] + 4, *y.shape[2:]), float("nan"),
                     dtype=y.dtype).contiguous(memory_format=torch.channels_last)
    getattr(OPS, f"{op}_triton_into").default(*args, config, torch.backends.cudnn.allow_tf32,
                                              out, 1)
    assert torch.equal(out[:, 1:1 + y.shape[1]], y)
    assert out[:, :1].isnan().all() and out[:, 1 + y.shape[1]:].isnan().all()


# -------------------------------------------------------------------- export on fake CUDA

class Net(nn.Module):
    """An RGB stem with a leaky ReLU, a 3x3 with a residual, a depthwise conv (never Triton),
    and a concat (channel-slice outputs)."""

    def __init__(self):
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.a, self.b = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        x = F.leaky_relu(self.b0(self.stem(x)), 0.2)  # an activation with a parameter
        x = torch.relu(self.b1(self.c1(x)) + x)
        x = self.dw(x)
        return torch.cat([self.a(x), self.b(x)], 1)


class NetW(nn.Module):
    """The window kernels: a separable conv (depthwise 3x3, then 1x1) and an Inception pool
    projection beside a 1x1 branch, both writing their concat slices."""

    def __init__(self):
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.bdw = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.pw, self.bpw = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.a, self.proj = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = torch.relu(self.b0(self.stem(x)))
        x = torch.relu(self.bpw(self.pw(torch.relu(self.bdw(self.dw(x))))))
        return torch.cat([self.a(x), self.proj(F.max_pool2d(x, 3, 1, 1))], 1)


def _fake_cuda(model, *inputs, shape_env=None):
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env)
    with mode:
        model.to("cuda")
        inputs = tuple(t.to("cuda") for t in inputs)
    return mode, inputs


class _AskedKeys(TorchDispatchMode):
    """Calls ops.conv2d._run, as a GPU would, for every cnnfuse conv op and records the key
    it asks the autotuner (with the pick `answer(key, problem)`); the op's result is the fake
    one."""
    SOURCES = {getattr(OPS, name).default: name for name in (
        "conv2d", "conv2d_pooled", "conv2d_into", "separable_conv2d", "separable_conv2d_into",
        "pool_conv2d", "pool_conv2d_into")}

    def __init__(self, answer):
        super().__init__()
        self.answer, self.keys = answer, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SOURCES:
            self._ask(func, args)
        return func(*args, **(kwargs or {}))

    def _ask(self, func, args):
        name = self.SOURCES[func]
        family = name.replace("_into", "").replace("_pooled", "")
        module = importlib.import_module(f"cnnfuse.ops.{family}")  # not the function
        recorded = []

        def pick(tuner, key, candidates, reference, tolerance, default):
            recorded.append((tuner.op, key, [n for n in candidates if n.startswith("triton_")],
                             default))
            raise _Asked

        head = len(args) - 2 if name.endswith("_into") else len(args)
        dest = None
        if name.endswith("_into"):
            weight = args[1] if family == "conv2d" else args[5 if family == "pool_conv2d" else 7]
            dest = args[-2].narrow(1, args[-1], weight.shape[0])
        with pytest.MonkeyPatch.context() as mp:  # this mode is off inside its dispatch
            mp.setattr(autotune.Autotuner, "pick", pick)
            with contextlib.suppress(_Asked):
                if family == "conv2d":
                    x, w = args[:2]
                    pool = x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32) \
                        if name == "conv2d_pooled" else None
                    module._run(*args[:9], tuple(args[9:12]), dest, pool)
                else:
                    module._run(*args[:head], dest)
        if recorded:
            op, key, triton_names, default = recorded[0]
            self.keys.append((op, key, self.answer(key, triton_names, default)))


class _Asked(Exception):
    pass


def _simulated_picks(fused, x, answer):
    """[(key, pick)] as cnnfuse.tune on a GPU would record them for x; autotune.preset then
    holds them ({op: {key: pick}})."""
    asking = _AskedKeys(answer)
    with asking, torch.no_grad():
        fused(x)
    autotune.preset = {}
    for op, key, pick in asking.keys:
        autotune.preset.setdefault(op, {})[key] = pick
    return [(key, pick) for _, key, pick in asking.keys]


def _export_with_picks(tmp_path, answer, batch=3, shape_env=None, model=Net):
    """(program, [(key, pick)], fake mode) of `model` exported on fake CUDA tensors with the
    picks `answer` gives, as if tuned on a GPU."""
    fused = cnnfuse.fuse(randomize_batchnorm(model()).eval())
    mode, (x,) = _fake_cuda(fused, _nhwc(batch, 3, 9, 11), shape_env=shape_env)
    with mode:
        keys = _simulated_picks(fused, x, answer)
    program = cnnfuse.export(fused, x, tmp_path / "m.pt2")
    return program, keys, mode


def _calls(program, target):
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target == target]


def test_export_writes_triton_ops_where_the_picks_are_triton(tmp_path, caplog):
    second = {}

    def answer(key, triton_names, default):  # the first conv keeps cuDNN, the rest Triton
        second.setdefault("n", 0)
        second["n"] += 1
        return "cudnn" if second["n"] == 1 else (triton_names[-1] if triton_names else default)
    with caplog.at_level(logging.INFO, logger="cnnfuse"):
        program, keys, _ = _export_with_picks(tmp_path, answer)
    triton_keys = [k for k, pick in keys if pick.startswith("triton_")]
    assert len(keys) == 5 and len(triton_keys) == 3  # the depthwise conv asks no Triton pick
    rewritten = [n for n in program.graph.nodes if n.op == "call_function"
                 and n.target in triton_conv2d.OPS.values()]
    assert len(rewritten) == 3, program.graph
    assert len(_calls(program, OPS.conv2d.default)) == 2  # the cuDNN pick and the depthwise
    assert len(_calls(program, OPS.conv2d_triton_into.default)) == 2  # the concat's halves
    # each rewritten call carries its own pick's config
    for node, (key, pick) in zip(rewritten, [kp for kp in keys if kp[1].startswith("triton_")]):
        assert Conv2dConfig(*node.args[12]).name == pick, key
    assert "3 of 5 conv calls run the Triton kernel" in caplog.text
    assert (tmp_path / "m.pt2").stat().st_size > 0


def test_export_writes_window_triton_ops_for_separable_and_pool_projection(tmp_path):
    program, keys, _ = _export_with_picks(
        tmp_path, lambda key, names, default: names[-1] if names else default, model=NetW)
    assert len(keys) == 4 and all(p.startswith("triton_") for _, p in keys), keys
    calls = {str(n.target) for n in program.graph.nodes if n.op == "call_function"
             and str(n.target).startswith("cnnfuse.")}
    assert calls == {"cnnfuse.conv2d_triton.default", "cnnfuse.separable_conv2d_triton.default",
                     "cnnfuse.conv2d_triton_into.default",
                     "cnnfuse.pool_conv2d_triton_into.default"}, calls
    by_key = dict(keys)
    (pool,) = _calls(program, OPS.pool_conv2d_triton_into.default)
    assert Conv2dConfig(*pool.args[9]).name == next(p for k, p in keys if "max pool" in k)
    (sep,) = _calls(program, OPS.separable_conv2d_triton.default)
    assert Conv2dConfig(*sep.args[11]).name == next(p for k, p in by_key.items() if "| pw" in k)


def test_a_program_with_triton_ops_saves_loads_and_runs(tmp_path):
    """The ops' schemas serialise: a CPU program whose convs were rewritten as export rewrites
    CUDA ones saves, loads and computes what the fused model does (the CPU implementation)."""
    fused = cnnfuse.fuse(randomize_batchnorm(NetW()).eval())
    x = _nhwc(3, 3, 9, 11)
    program = cnnfuse.export(fused, x, tmp_path / "plain.pt2")
    targets = {**triton_conv2d.OPS, **triton_window_conv2d.OPS}
    rewritten = 0
    for node in program.graph.nodes:
        name = str(node.target).removeprefix("cnnfuse.").removesuffix(".default")
        if node.op == "call_function" and name in targets:
            head = len(node.args) - 2 if name.endswith("_into") else len(node.args)
            node.target = targets[name]
            node.args = node.args[:head] + (CONFIG, False) + node.args[head:]
            rewritten += 1
    assert rewritten == 4
    program.graph_module.recompile()
    with warnings.catch_warnings():  # channels_last weights: see cnnfuse.export
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    assert sum(n.op == "call_function" and n.target in targets.values()
               for n in loaded.graph.nodes) == 4
    with torch.no_grad():
        for b in (3, 5):
            xb = _nhwc(b, 3, 9, 11)
            assert torch.equal(loaded.module()(xb), fused(xb)), b


def test_without_a_triton_pick_the_program_is_unchanged(tmp_path, monkeypatch):
    program, keys, _ = _export_with_picks(tmp_path, lambda key, names, default: "cudnn")
    assert not any(n.target in triton_conv2d.OPS.values() for n in program.graph.nodes
                   if n.op == "call_function")
    # CNNFUSE_BACKEND=triton: the untimed default the op would run
    monkeypatch.setenv("CNNFUSE_BACKEND", "triton")
    autotune.preset = {}
    fused = cnnfuse.fuse(randomize_batchnorm(Net()).eval())
    mode, (x,) = _fake_cuda(fused, _nhwc(3, 3, 9, 11))
    program = cnnfuse.export(fused, x, tmp_path / "m.pt2")
    node = _calls(program, OPS.conv2d_triton.default)[0]  # the stem
    problem = Conv2dProblem.of_conv((3, 3, 9, 11), (16, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert node.args[12] == config_list(default_config(problem, dtype=torch.float32))


def test_a_pick_for_another_batch_is_not_used(tmp_path):
    """Picks are keyed by the call's shape: the example's batch chooses them."""
    fused = cnnfuse.fuse(randomize_batchnorm(Net()).eval())
    mode, (x, x3) = _fake_cuda(fused, _nhwc(4, 3, 9, 11), _nhwc(3, 3, 9, 11))
    with mode:
        _simulated_picks(fused, x, lambda key, names, default: names[0] if names
                         else default)
    program = cnnfuse.export(fused, x3, tmp_path / "m.pt2")
    assert not any(n.target in triton_conv2d.OPS.values() for n in program.graph.nodes
                   if n.op == "call_function")


class _Target:
    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


def test_aot_autograd_traces_the_triton_kernel_with_a_symbolic_batch(tmp_path, monkeypatch,
                                                                    caplog, request):
    """What AOTInductor compiles: the program's triton ops decompose into the Triton kernel
    HOP, batch symbolic in its arguments and grid; Inductor's mutation analysis (it reads
    the kernel's TTIR, for which a target is enough) finds the one output each kernel
    writes. Under TRITON_INTERPRET=1 the kernels are interpreted functions, which wrap_triton
    cannot trace: the test then runs in a process without it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               request.node.nodeid], cwd=request.config.rootpath, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:]
        return
    import triton
    monkeypatch.setattr(triton.runtime.driver, "_active", _Target())
    for model in (Net, NetW):
        hops, keys, constants = _traced_hops(tmp_path, model, caplog)
        names = [c["name"] for c in constants]
        n_triton = sum(pick.startswith("triton_") for _, pick in keys)
        n_split = sum("sk" in pick for _, pick in keys)
        assert names.count("_conv2d_kernel") == n_triton >= 3, (model, names)
        assert names.count("_splitk_reduce_kernel") == n_split
        for n in hops:
            kw = n.kwargs["kwargs"]
            batch = kw["N"] if "N" in kw else kw["M"]
            assert isinstance(batch, torch.fx.Node), "the batch was specialised"
            assert isinstance(n.kwargs["grid"][0][0], torch.fx.Node)
            assert n.kwargs["tensors_to_clone"] in (["y_ptr"], ["ws_ptr"]), n.kwargs
        if model is Net:
            acts = [c["ACT"] for c in constants if "ACT" in c]
            assert (9, 0.2, 0.0) in acts, acts  # the stem's leaky_relu(0.2), parameters and all
        else:  # the windows: a depthwise conv's and a max pool's
            assert {c.get("DW") for c in constants} >= {True} and 1 in {
                c.get("POOL_IN") for c in constants}, constants


def _traced_hops(tmp_path, model, caplog):
    """The Triton kernel HOPs AOTAutograd traces from `model`'s program (exported with
    split-K picks where there are some), the picks, and each HOP's constants and kernel
    name."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    program, keys, mode = _export_with_picks(
        tmp_path, lambda key, names, default: next(
            (n for n in names if "sk" in n), names[0] if names else default),
        shape_env=ShapeEnv(), model=model)
    x = mode.from_tensor(_nhwc(5, 3, 9, 11), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * 3))
    with mode:
        x = x.to("cuda")

    class Tupled(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return (self.m(x),)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        gm, _ = aot_export_module(Tupled(program.module()), (x,), trace_joint=False)
    assert "assuming every input is mutated" not in caplog.text
    assert not any(str(n.target).startswith("cnnfuse.") and "_triton" in str(n.target)
                   for n in gm.graph.nodes if n.op == "call_function")  # all decomposed
    hops = [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    constants = [{**kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"]),
                  **n.kwargs["kwargs"],
                  "name": kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__}
                 for n in hops]
    return hops, keys, constants


def test_64_bit_indexing_is_chosen_for_the_largest_batch_a_program_accepts():
    from cnnfuse.ops.triton_conv2d import _INT32_BATCH, batch_bound
    for upper, want in ((None, _INT32_BATCH), (1 << 20, 1 << 20), (1 << 40, _INT32_BATCH)):
        shape_env = ShapeEnv()
        mode = FakeTensorMode(shape_env=shape_env)
        x = mode.from_tensor(torch.empty(3, 4), symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]))
        n = x.shape[0]
        if upper is not None:
            torch._check(n <= upper)
        assert batch_bound(n) == want
    assert batch_bound(7) == 7


def test_the_keys_export_computes_are_the_keys_the_op_asks(tmp_path):
    """export names each call as ops.conv2d._run names it for the autotuner: a pick for
    every key _run asked (any batch, layout, slice or pool) is found."""
    program, keys, _ = _export_with_picks(tmp_path, lambda key, names, default: names[0]
                                          if names else default, batch=1)
    asked = [k for k, pick in keys if pick.startswith("triton_")]
    rewritten = [n for n in program.graph.nodes if n.op == "call_function"
                 and n.target in triton_conv2d.OPS.values()]
    assert len(asked) == len(rewritten) == len(keys) - 1  # all but the depthwise conv


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.cuda
def test_an_aot_inductor_package_runs_the_tuned_triton_kernels(tmp_path, monkeypatch):
    """Tuned with Triton picks, exported, compiled by AOTInductor: the package holds the conv
    kernel's binary and runs it without the op's Python launcher, at the tuned batch and at
    another, bit for bit as the exported program run eagerly (the same kernel and config)."""
    monkeypatch.setenv("CNNFUSE_BACKEND", "triton")
    # the triton ops run a TMA pick as its pointer twin: the eager model does too, so the
    # two compare bit for bit
    monkeypatch.setenv("CNNFUSE_TMA", "0")
    fused = cnnfuse.fuse(randomize_batchnorm(NetW()).eval(), dtype=torch.float16).cuda()
    x = torch.randn(6, 3, 15, 17, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    report = cnnfuse.tune(fused, x)
    assert set(report.picks) == {"conv2d", "separable_conv2d", "pool_conv2d"}, report
    assert all(p.startswith("triton_") for t in report.picks.values() for p in t.values())
    program = cnnfuse.export(fused, x, tmp_path / "m.pt2")
    rewritten = [n for n in program.graph.nodes if n.op == "call_function" and n.target in
                 {**triton_conv2d.OPS, **triton_window_conv2d.OPS}.values()]
    assert len(rewritten) == 4, program.graph  # stem, separable, 1x1 and pool projection
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "m_aoti.pt2"))
    with zipfile.ZipFile(package) as zf:
        assert any(b"_conv2d_kernel" in zf.read(m) for m in zf.namelist()), zf.namelist()
    runner = torch._inductor.aoti_load_package(package)
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))  # the tuned batch: the tuned kernel
        for b in (6, 2):  # one package serves every batch, with the config tuned at 6
            xb = x[:b].contiguous(memory_format=torch.channels_last)
            want = loaded(xb)

            def no_python_launch(*args, **kwargs):
                raise AssertionError("the package called the op's Python launcher")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(triton_conv2d, "launch", no_python_launch)
                mp.setattr(triton_window_conv2d, "launch", no_python_launch)
                got = runner(xb)
            assert torch.equal(got, want), f"batch {b}"
        assert torch.equal(torch.compile(loaded)(x), fused(x))
