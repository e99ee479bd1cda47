"""The fused modules' fast eager path: decide once per input signature, then only run.

`cnnfuse.ops.*` checks every argument on each call, then (traced, compiled or captured)
enters torch.library, the one schema that FX, torch.compile, torch.export and CUDA graphs see,
or (plain eager) calls the op's implementation directly. A fused module instead keeps a plan
per call signature (shapes, strides, dtypes, devices and 16-byte alignment of every tensor
argument, the module's own settings, CNNFUSE_BACKEND and TRITON_INTERPRET): the arguments
checked, the padding normalised and the backend chosen on the first call; later calls with the
same signature only run it. A call that is not plain eager (FX or jit tracing, torch.compile,
a CUDA graph capture, an active dispatch mode such as FakeTensorMode or FlopCounterMode, a
tensor subclass) takes the op.

Plans are small picklable objects holding geometry only, never tensors, so a copied or
re-loaded module stays right.

A plan on any backend but the reference resolves once: on the CPU builds (the C++ kernels
under CNNFUSE_BACKEND=cuda, the Triton interpreter) at its first call, a copied or unpickled
plan at its own first call too; on CUDA as soon as the autotuner's pick for it is final
(`autotune.Pick`). From then on the plan calls the picked backend with its config directly,
without the op implementation's backend lookup, candidate list and autotuner key; until then,
and again whenever the picks could change (another `autotune.preset`, `cnnfuse.tune`
recording, torch.backends.cudnn.allow_tf32 flipped), it calls the op's implementation and
asks again.
"""
import os

import torch
import torch.nn.functional as F

from .. import autotune, ref
from ..ref.activation import activate_
from ..backend import ran
from ._direct import DirectConv, DirectPair, op_module

# The environment os.environ writes through (bytes keys on POSIX): read per call for a few
# hundred ns where os.environ.get costs µs.
_ENV = getattr(os.environ, "_data", None)
if _ENV is not None and not all(isinstance(k, bytes) for k in list(_ENV)[:1]):
    _ENV = None
_KEYS = (b"CNNFUSE_BACKEND", b"TRITON_INTERPRET", b"CNNFUSE_AUTOTUNE")


def environment() -> tuple:
    """The settings a plan was chosen under."""
    if _ENV is None:
        return tuple(os.environ.get(k.decode()) for k in _KEYS)
    return _ENV.get(_KEYS[0]), _ENV.get(_KEYS[1]), _ENV.get(_KEYS[2])


_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_dispatch_modes = torch._C._len_torch_dispatch_stack


def active(x) -> bool:
    """True for a plain eager call on a plain tensor: the fast path may run."""
    if _is_compiling() or type(x) is not torch.Tensor or _is_tracing() or _dispatch_modes():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def call(x, run, op, op_into, args: tuple, out_channels: int, out, offset: int):
    """A functional op's dispatch once its arguments are checked: plain eager runs `run(*args,
    dest)` (the implementation, without torch.library's wrapper), anything else the op, or
    `op_into` with `out` (channels [offset, +out_channels) of it)."""
    if active(x):
        dest = None if out is None else out.narrow(1, offset, out_channels)
        y = run(*args, dest)
        return y if out is None else out
    if out is None:
        return op(*args)
    op_into(*args, out, offset)
    return out


def signature(t) -> tuple:
    """What a plan depends on in one tensor argument (None stays None)."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


_UNPLANNED = object()
_MAX_PLANS = 64  # per module: a program that feeds ever new shapes starts over, not grows


def cached(module, key, build):
    """module's plan for `key`, made by build() the first time (None: the module's op path)."""
    plans = module.__dict__.get("_eager_plans")
    if plans is None:
        plans = module.__dict__["_eager_plans"] = {}
    plan = plans.get(key, _UNPLANNED)
    if plan is _UNPLANNED:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[key] = build()
    return plan


def _finish(y, dest, pool):
    if dest is not None:
        dest.copy_(y)
        y = dest
    elif not y.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)  # the op's result layout
    if pool is not None:
        torch.mean(y, (2, 3), dtype=torch.float32, out=pool)
    return y


class CpuConv:
    """fp32 on the CPU: PyTorch's own conv with the bias inside it (oneDNN adds it for free),
    then the residual and the activation in place on the fresh result. No dtype conversions,
    no layout conversion for channels_last input: what eager conv + activation would run."""
    __slots__ = ("stride", "pad_hw", "pads", "dilation", "groups", "activation",
                 "input_activation")

    def __init__(self, stride, pads, dilation, groups, activation, input_activation="none"):
        left, right, top, bottom = pads
        symmetric = left == right and top == bottom
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), groups
        self.pad_hw = (top, left) if symmetric else (0, 0)
        self.pads = None if symmetric else (left, right, top, bottom)
        self.activation, self.input_activation = activation, input_activation

    def __call__(self, x, weight, bias, residual=None, input_scale=None, input_affine=None,
                 dest=None, pool=None):
        ran("conv2d", "reference")
        return self.compute(x, weight, bias, residual, input_scale, input_affine, dest, pool)

    def compute(self, x, weight, bias, residual=None, input_scale=None, input_affine=None,
                dest=None, pool=None):
        """The plan's result, without saying which backend ran (the op's reference says it)."""
        if input_affine is not None or input_scale is not None:
            x = ref.prologue(x, input_scale, input_affine, self.input_activation)
        return _finish(self.conv(x, weight, bias, residual), dest, pool)

    def conv(self, x, weight, bias, residual=None):
        """act(conv(x) + bias + residual), PyTorch's layout for x's."""
        if self.pads is not None:
            x = F.pad(x, self.pads)
        y = F.conv2d(x, weight, bias, self.stride, self.pad_hw, self.dilation, self.groups)
        if residual is not None:
            y.add_(residual)
        return activate_(y, self.activation)


class _ConvGeometry:
    """A conv plan's constant arguments."""
    __slots__ = ("args",)

    def __init__(self, stride, pads, dilation, groups, activation, input_activation="none"):
        self.args = (list(stride), list(pads), list(dilation), groups, activation,
                     input_activation)


class ReferenceConv(_ConvGeometry):
    """Other dtypes on the CPU: the reference itself (fp32 accumulation), no op wrapper."""
    __slots__ = ()

    def __call__(self, x, weight, bias, residual=None, input_scale=None, input_affine=None,
                 dest=None, pool=None):
        stride, pads, dilation, groups, activation, input_activation = self.args
        ran("conv2d", "reference")
        y = ref.conv2d(x, weight, bias, stride, pads, dilation, groups, activation, residual,
                       input_scale, input_affine, input_activation)
        return _finish(y, dest, pool)


class OpImplConv(_ConvGeometry):
    """Every other backend: the op's implementation (`conv2d._run`: the autotuned pick, the
    Triton kernel, the C++ kernels) called directly, without the torch.library wrapper or the
    argument checks the plan already made; once the backend is known for good, that backend
    itself (`direct`)."""
    __slots__ = ("direct",)

    def __init__(self, *geometry):
        super().__init__(*geometry)
        self.direct = None

    def __getstate__(self):  # geometry only: a copy resolves again
        return self.args

    def __setstate__(self, args):
        self.args, self.direct = args, None

    def __call__(self, x, weight, bias, residual=None, input_scale=None, input_affine=None,
                 dest=None, pool=None):
        direct = self.direct
        if direct is None and x.device.type == "cpu":  # a CPU build: known from the start
            direct = self.direct = DirectConv.for_cpu(x, weight, self.args)
        if direct is not None and direct.valid():
            return direct(x, weight, bias, residual, input_scale, input_affine, dest, pool)
        from .conv2d import _run
        stride, pads, dilation, groups, activation, input_activation = self.args
        with autotune.observing() as picks:
            y = _run(x, weight, bias, stride, pads, dilation, groups, activation, residual,
                     (input_scale, input_affine, input_activation), dest, pool)
        self.direct = DirectConv.from_pick(picks, x, weight, residual, self.args)
        return y


def conv_backend(x: torch.Tensor, weight: torch.Tensor, *geometry):
    """The plan that computes a conv for inputs like x on the backend CNNFUSE_BACKEND asks for;
    geometry = (stride, padding (left, right, top, bottom), dilation, groups, activation,
    input_activation)."""
    from ..backend import requested_backend
    if x.device.type == "cpu" and requested_backend() in ("auto", "reference"):
        return (CpuConv if x.dtype == torch.float32 else ReferenceConv)(*geometry)
    return OpImplConv(*geometry)  # a CPU build resolves on the first call


class InWeightDtype:
    """A conv whose weight is kept in another dtype than x (a folded weight that would overflow
    x's): computed in the weight's dtype, the result cast back to x's (then written to dest and
    pooled from the stored values)."""
    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, weight, bias, residual=None, input_scale=None, input_affine=None,
                 dest=None, pool=None):
        dtype = weight.dtype
        y = self.inner(x.to(dtype), weight, bias,
                       None if residual is None else residual.to(dtype),
                       None if input_scale is None else input_scale.to(dtype), input_affine)
        return _finish(y.to(x.dtype), dest, pool)


def wider_weight(weight, x) -> bool:
    """A float32 weight for a float16 or bfloat16 x: the conv computes in float32."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))


def plan_conv2d(x, weight, bias, stride, padding, dilation, groups, activation, residual,
                input_scale, input_affine, input_activation, out, return_pooled):
    """Check a conv2d call once, as `cnnfuse.ops.conv2d` does (same errors), and return the
    plan for calls like it: plan(x, weight, bias, residual, input_scale, input_affine, dest,
    pool) with dest the (N, K, OH, OW) view to write (or None), pool an (N, K) float32 tensor
    for mean_hw(y) (or None)."""
    from . import _check
    from .conv2d import plan
    if return_pooled and out is not None:
        raise ValueError("return_pooled does not combine with out= (pool the slice instead)")
    cast = wider_weight(weight, x)
    xc = x.to(weight.dtype) if cast else x
    stride, pads, dilation, shape = plan(
        xc, weight, bias, stride, padding, dilation, groups, activation,
        residual if residual is None or not cast else residual.to(weight.dtype),
        input_scale if input_scale is None or not cast else input_scale.to(weight.dtype),
        input_affine, input_activation)
    if out is not None:
        _check.out_slice(out, x, shape, 0)
    run = conv_backend(xc, weight, stride, pads, dilation, groups, activation, input_activation)
    return InWeightDtype(run) if cast else run


class CpuSeparable:
    """fp32 on the CPU: the depthwise conv and the 1x1 conv as PyTorch's own convs (oneDNN
    runs both well in channels_last), biases inside them, activations in place."""
    __slots__ = ("dw", "activation")

    def __init__(self, stride, pads, dilation, channels, dw_activation, activation):
        self.dw = CpuConv(stride, pads, dilation, channels, dw_activation)
        self.activation = activation

    def __call__(self, x, dw_weight, dw_bias, weight, bias, residual=None, dest=None):
        ran("separable_conv2d", "reference")
        return self.compute(x, dw_weight, dw_bias, weight, bias, residual, dest)

    def compute(self, x, dw_weight, dw_bias, weight, bias, residual=None, dest=None):
        mid = self.dw.conv(x, dw_weight, dw_bias)
        y = F.conv2d(mid, weight, bias)
        if residual is not None:
            y.add_(residual)
        return _finish(activate_(y, self.activation), dest, None)


class OpImplPair:
    """separable_conv2d / pool_conv2d on any other backend: the op's implementation (`_run`)
    with the checked arguments, no torch.library wrapper; once the backend is known for good
    (as for OpImplConv), that backend itself."""
    __slots__ = ("op", "args", "direct")

    def __init__(self, op: str, args: tuple):
        self.op, self.args, self.direct = op, args, None

    def __getstate__(self):  # geometry only: a copy resolves again
        return self.op, self.args

    def __setstate__(self, state):
        (self.op, self.args), self.direct = state, None

    def _module(self):
        return op_module(self.op)

    def run_args(self, x, tensors, residual, dest) -> tuple:
        """The arguments of the op's `_run` (and of its backends, after the config)."""
        if self.op == "separable_conv2d":  # dw_weight, dw_bias, weight, bias
            dw_w, dw_b, w, b = tensors
            stride, pads, dilation, dw_act, act = self.args
            return x, dw_w, dw_b, stride, pads, dilation, dw_act, w, b, act, residual, dest
        w, b = tensors
        mode, kernel, stride, pads, act = self.args
        return x, mode, kernel, stride, pads, w, b, act, residual, dest

    def __call__(self, x, *tensors, residual=None, dest=None):
        args = self.run_args(x, tensors, residual, dest)
        direct = self.direct
        if direct is None and x.device.type == "cpu":  # a CPU build: known from the start
            direct = self.direct = DirectPair.for_cpu(self.op, x)
        if direct is not None and direct.valid():
            return direct(args)
        with autotune.observing() as picks:
            y = self._module()._run(*args)
        self.direct = DirectPair.from_pick(picks, self.op, x)
        return y


def _cpu_fp32(x) -> bool:
    from ..backend import requested_backend
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and requested_backend() in ("auto", "reference"))


def plan_separable(x, dw_weight, dw_bias, weight, bias, dw_stride, dw_padding, dw_dilation,
                   dw_activation, activation, residual, out):
    """Check a separable_conv2d call once (the op's errors); the plan for calls like it:
    plan(x, dw_weight, dw_bias, weight, bias, residual=, dest=)."""
    from . import _check
    from .separable_conv2d import check_args
    args, shape = check_args(x, dw_weight, dw_bias, weight, bias, dw_stride, dw_padding,
                             dw_dilation, dw_activation, activation, residual)
    if out is not None:
        _check.out_slice(out, x, shape, 0)
    _, _, _, stride, pads, dilation, dw_act, _, _, act, _ = args
    if _cpu_fp32(x):
        return CpuSeparable(stride, pads, dilation, x.shape[1], dw_act, act)
    return OpImplPair("separable_conv2d", (stride, pads, dilation, dw_act, act))


class CpuPoolConv:
    """fp32 on the CPU: PyTorch's pool, then its 1x1 conv with the bias inside."""
    __slots__ = ("mode", "kernel", "stride", "pad_hw", "ceil_mode", "activation")

    def __init__(self, mode, kernel, stride, pads, activation):
        from ..ref.pool_conv2d import torch_padding
        self.mode, self.kernel, self.stride = mode, tuple(kernel), tuple(stride)
        self.pad_hw, self.ceil_mode = torch_padding(self.kernel, self.stride, pads)
        self.activation = activation

    def __call__(self, x, weight, bias, residual=None, dest=None):
        ran("pool_conv2d", "reference")
        return self.compute(x, weight, bias, residual, dest)

    def compute(self, x, weight, bias, residual=None, dest=None):
        if self.mode == "max":
            p = F.max_pool2d(x, self.kernel, self.stride, self.pad_hw, ceil_mode=self.ceil_mode)
        else:
            p = F.avg_pool2d(x, self.kernel, self.stride, self.pad_hw, ceil_mode=self.ceil_mode,
                             count_include_pad=self.mode == "avg")
        y = F.conv2d(p, weight, bias)
        if residual is not None:
            y.add_(residual)
        return _finish(activate_(y, self.activation), dest, None)


def plan_pool_conv2d(x, weight, bias, mode, kernel_size, stride, padding, activation, residual,
                     out):
    """Check a pool_conv2d call once (the op's errors); the plan for calls like it:
    plan(x, weight, bias, residual=, dest=)."""
    from . import _check
    from .pool_conv2d import check_args
    args, shape = check_args(x, weight, bias, mode, kernel_size, stride, padding, activation,
                             residual)
    if out is not None:
        _check.out_slice(out, x, shape, 0)
    _, mode, kernel, stride, pads, _, _, act, _ = args
    if _cpu_fp32(x):
        return CpuPoolConv(mode, kernel, stride, pads, act)
    return OpImplPair("pool_conv2d", (mode, kernel, stride, pads, act))


class CpuSeGate:
    """fp32 on the CPU: the two FC layers as F.linear, activations in place."""
    __slots__ = ("activation", "gate_activation")

    def __init__(self, activation, gate_activation):
        self.activation, self.gate_activation = activation, gate_activation

    def __call__(self, pooled, w1, b1, w2, b2):
        ran("se_gate", "reference")
        return self.compute(pooled, w1, b1, w2, b2)

    def compute(self, pooled, w1, b1, w2, b2):
        h = activate_(F.linear(pooled, w1, b1), self.activation)
        return activate_(F.linear(h, w2, b2), self.gate_activation)


class OpImplSeGate:
    """se_gate on any other backend or dtype: the op's implementation, no wrapper."""
    __slots__ = ("activation", "gate_activation")

    def __init__(self, activation, gate_activation):
        self.activation, self.gate_activation = activation, gate_activation

    def __call__(self, pooled, w1, b1, w2, b2):
        from .se_gate import _run
        return _run(pooled, w1, b1, w2, b2, self.activation, self.gate_activation)


def plan_se_gate(pooled, w1, b1, w2, b2, activation, gate_activation):
    """Check an se_gate call once (the op's errors); the plan: plan(pooled, w1, b1, w2, b2)."""
    from .se_gate import check_args
    check_args(pooled, w1, b1, w2, b2, activation, gate_activation)
    fp32 = all(t is None or t.dtype == torch.float32 for t in (pooled, w1, b1, w2, b2))
    if fp32 and _cpu_fp32(pooled):
        return CpuSeGate(activation, gate_activation)
    return OpImplSeGate(activation, gate_activation)
