"""cnnfuse::conv2d — y = act(conv2d(prologue(x), w) + bias + residual), optionally into a channel
slice.

The prologue runs in the kernel's load stage instead of as passes of their own: an optional
per-channel affine + activation (a pre-activation BatchNorm and its ReLU, as DenseNet puts
them before each conv), then an optional per-image, per-channel scale (N, C) (a
squeeze-and-excitation gate).

Three schemas share one implementation: `conv2d` returns a new channels_last tensor;
`conv2d_into` writes into channels [offset, offset + K) of a wider buffer, which is how
concatenated branch outputs are produced without `torch.cat`; `conv2d_pooled` also returns
y's mean over height and width (N, K) in float32, summed in the epilogue from the values it
stores: the squeeze of a squeeze-and-excitation block without a pass over y.
"""
import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .. import autotune, ref
from .._ext import has_cudnn_frontend, relaxed_capture
from ..backend import ran, requested_backend, triton_interpreting, warn_once
from . import _check, _eager
from .bias_act import bias_act_into
from .depthwise_conv2d import depthwise_conv2d_into, is_depthwise

_tuner = autotune.Autotuner("conv2d")
# The activations the cuDNN frontend graph of csrc/conv2d/cudnn_fused.cpp builds (none to
# gelu_tanh); a conv with any other runs on the other backends.
CUDNN_FUSED_CODES = frozenset(range(ref.ACTIVATIONS.index("gelu_tanh") + 1))

torch.library.define(
    "cnnfuse::conv2d_cudnn",
    "(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
    "int groups, int activation, Tensor? residual) -> Tensor")


def normalize_padding(padding, kernel: Sequence[int], stride: Sequence[int],
                      dilation: Sequence[int]) -> list[int]:
    """(left, right, top, bottom) from an int, an (h, w) pair, a 4-tuple, 'valid' or 'same'."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        if stride != [1, 1]:
            raise ValueError("padding='same' needs stride 1 (as in torch.nn.functional.conv2d)")
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    if isinstance(padding, int):
        padding = [padding, padding]
    pads = list(padding)
    if len(pads) == 2:
        pads = [pads[1], pads[1], pads[0], pads[0]]
    if len(pads) != 4 or not all(isinstance(p, int) and p >= 0 for p in pads):
        raise ValueError(f"padding must be an int >= 0, an (h, w) pair, a (left, right, top, "
                         f"bottom) 4-tuple, 'same' or 'valid'; got {padding!r}")
    return pads


def output_hw(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    left, right, top, bottom = padding
    oh = (h + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def plan(x, weight, bias, stride, padding, dilation, groups, activation, residual,
         input_scale=None, input_affine=None, input_activation="none"):
    """Checks the arguments of a convolution; returns (stride, padding as (left, right, top,
    bottom), dilation, output shape)."""
    _check.tensor("x", x, 4)
    _check.tensor("weight", weight, 4)
    _check.floating("x", x)
    _check.same_dtype("weight", weight, x)
    _check.same_device("weight", weight, x)
    _check.activation("activation", activation)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    if c != cg * groups:
        raise ValueError(f"x has {c} channels but weight expects {cg} x groups={groups} = {cg * groups}")
    if k % groups:
        raise ValueError(f"weight has {k} output channels, not divisible by groups={groups}")
    stride = _check.pair("stride", stride, 1)
    dilation = _check.pair("dilation", dilation, 1)
    pads = normalize_padding(padding, (r, s), stride, dilation)
    oh, ow = output_hw(h, w, (r, s), stride, pads, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(f"the output would be {oh}x{ow}: input {h}x{w} is too small for kernel "
                         f"{r}x{s} with padding {pads}, dilation {dilation}")
    _check.epilogue(x, bias, residual, (n, k, oh, ow))
    if input_scale is not None:
        _check.tensor("input_scale", input_scale, 2)
        _check.same_dtype("input_scale", input_scale, x, also=(torch.float32,))
        _check.same_device("input_scale", input_scale, x)
        if tuple(input_scale.shape) != (n, c):
            raise ValueError(f"input_scale has shape {tuple(input_scale.shape)}; x needs "
                             f"({n}, {c})")
    _check.activation("input_activation", input_activation)
    if input_affine is not None:
        _check.tensor("input_affine", input_affine, 2)
        _check.same_dtype("input_affine", input_affine, x, also=(torch.float32,))
        _check.same_device("input_affine", input_affine, x)
        if tuple(input_affine.shape) != (2, c):
            raise ValueError(f"input_affine has shape {tuple(input_affine.shape)}; x needs "
                             f"(2, {c}) (scale row, shift row)")
    elif input_activation != "none":
        raise ValueError("input_activation needs input_affine (the activation follows it)")
    return stride, pads, dilation, (n, k, oh, ow)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: Union[int, Sequence[int]] = 1, padding=0,
           dilation: Union[int, Sequence[int]] = 1, groups: int = 1, *,
           activation: str = "none", residual: Optional[torch.Tensor] = None,
           input_scale: Optional[torch.Tensor] = None,
           input_affine: Optional[torch.Tensor] = None, input_activation: str = "none",
           out: Optional[torch.Tensor] = None, out_channel_offset: int = 0,
           return_pooled: bool = False):
    """y = act(conv2d(x', weight, stride, padding, dilation, groups) + bias + residual), with
    x' = input_act(x · input_affine[0] + input_affine[1]) · input_scale.

    padding: int, (h, w), (left, right, top, bottom), 'same' or 'valid'. input_affine: (2, C)
    in float32 or x's dtype, a per-channel scale and shift (an eval-mode BatchNorm before the conv), followed
    by input_activation. input_scale: (N, C) multiplies input channels per image (an SE gate).
    Each prologue step is rounded to x's dtype, as PyTorch's own ops would round it, and
    padding stays zero. With `out` (N, C_total, OH, OW), y lands in channels
    [out_channel_offset, +C_out) and `out` is returned. With return_pooled, returns
    (y, pooled): pooled (N, C_out) float32 is y's mean over its height and width. Inference
    only: no autograd.
    """
    stride, pads, dilation, shape = plan(x, weight, bias, stride, padding, dilation, groups,
                                         activation, residual, input_scale, input_affine,
                                         input_activation)
    if return_pooled and out is not None:
        raise ValueError("return_pooled does not combine with out= (pool the slice instead)")
    if out is not None:
        _check.out_slice(out, x, shape, out_channel_offset)
    if _eager.active(x):  # plain eager: the op's implementation, without torch.library's wrapper
        prologue = (input_scale, input_affine, input_activation)
        if return_pooled:
            pool = x.new_empty(shape[:2], dtype=torch.float32)
            return _run(x, weight, bias, stride, pads, dilation, groups, activation, residual,
                        prologue, None, pool), pool
        dest = None if out is None else out.narrow(1, out_channel_offset, shape[1])
        y = _run(x, weight, bias, stride, pads, dilation, groups, activation, residual,
                 prologue, dest)
        return y if out is None else out
    if return_pooled:
        return torch.ops.cnnfuse.conv2d_pooled(x, weight, bias, stride, pads, dilation, groups,
                                               activation, residual, input_scale,
                                               input_affine, input_activation)
    if out is None:
        return torch.ops.cnnfuse.conv2d(x, weight, bias, stride, pads, dilation, groups,
                                        activation, residual, input_scale, input_affine,
                                        input_activation)
    torch.ops.cnnfuse.conv2d_into(x, weight, bias, stride, pads, dilation, groups, activation,
                                  residual, input_scale, input_affine, input_activation, out,
                                  out_channel_offset)
    return out


@torch.library.custom_op("cnnfuse::conv2d", mutates_args=())
def _conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               stride: list[int], padding: list[int], dilation: list[int], groups: int,
               activation: str, residual: Optional[torch.Tensor],
               input_scale: Optional[torch.Tensor], input_affine: Optional[torch.Tensor],
               input_activation: str) -> torch.Tensor:
    return _run(x, weight, bias, stride, padding, dilation, groups, activation, residual,
                (input_scale, input_affine, input_activation), None)


@torch.library.custom_op("cnnfuse::conv2d_pooled", mutates_args=())
def _conv2d_pooled_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      stride: list[int], padding: list[int], dilation: list[int], groups: int,
                      activation: str, residual: Optional[torch.Tensor],
                      input_scale: Optional[torch.Tensor], input_affine: Optional[torch.Tensor],
                      input_activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    pool = x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
    y = _run(x, weight, bias, stride, padding, dilation, groups, activation, residual,
             (input_scale, input_affine, input_activation), None, pool)
    return y, pool


@torch.library.custom_op("cnnfuse::conv2d_into", mutates_args=("out",))
def _conv2d_into_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    stride: list[int], padding: list[int], dilation: list[int], groups: int,
                    activation: str, residual: Optional[torch.Tensor],
                    input_scale: Optional[torch.Tensor], input_affine: Optional[torch.Tensor],
                    input_activation: str, out: torch.Tensor, out_channel_offset: int) -> None:
    dest = out.narrow(1, out_channel_offset, weight.shape[0])
    _run(x, weight, bias, stride, padding, dilation, groups, activation, residual,
         (input_scale, input_affine, input_activation), dest)


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, residual, input_scale,
      input_affine, input_activation):
    return _empty_out(x, weight, stride, padding, dilation)


@_conv2d_pooled_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, residual, input_scale,
      input_affine, input_activation):
    return (_empty_out(x, weight, stride, padding, dilation),
            x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32))


@_conv2d_into_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, residual, input_scale,
      input_affine, input_activation, out, offset):
    return None


@torch.library.register_fake("cnnfuse::conv2d_cudnn")
def _(x, weight, bias, stride, padding, dilation, groups, activation, residual):
    return _empty_out(x, weight, stride, padding, dilation)


def conv_flops(x_shape, w_shape, stride, padding, dilation) -> int:
    """Multiply-adds × 2, as torch.utils.flop_counter counts aten.convolution."""
    oh, ow = output_hw(x_shape[2], x_shape[3], w_shape[2:], stride, padding, dilation)
    k, cg, r, s = w_shape
    return 2 * x_shape[0] * oh * ow * k * cg * r * s


# So that FlopCounterMode (and the profiler's floors) count fused models as it counts eager ones.
@register_flop_formula([torch.ops.cnnfuse.conv2d, torch.ops.cnnfuse.conv2d_into,
                        torch.ops.cnnfuse.conv2d_pooled, torch.ops.cnnfuse.conv2d_cudnn])
def _(x, weight, bias, stride, padding, dilation, *rest, out_shape=None, **kwargs):
    return conv_flops(x, weight, stride, padding, dilation)


# ---------------------------------------------------------------------------------------------
# Implementation: every backend writes into `dest` (a view) when given, else allocates.

def _empty_out(x, weight, stride, padding, dilation):
    oh, ow = output_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _deliver(y, dest):
    if dest is None:
        return y
    dest.copy_(y)
    return dest


def _reference(x, weight, bias, stride, padding, dilation, groups, activation, residual, dest):
    if x.device.type == "cpu" and x.dtype == torch.float32:
        # PyTorch's conv with the bias inside, the rest in place: what the fused modules'
        # eager plans run, so both paths give the same bits
        from ._eager import CpuConv
        return CpuConv(stride, padding, dilation, groups, activation).compute(
            x, weight, bias, residual, dest=dest)
    y = ref.conv2d(x, weight, bias, stride, padding, dilation, groups, activation, residual)
    return _deliver(y, dest)


def _library_conv(x, weight, bias, stride, padding, dilation, groups, activation, residual, dest):
    """PyTorch's conv (cuDNN on CUDA), then cnnfuse's fused epilogue in one pass."""
    left, right, top, bottom = padding
    if left != right or top != bottom:
        x, pad_hw = F.pad(x, (left, right, top, bottom)), (0, 0)
    else:
        pad_hw = (top, left)
    y = F.conv2d(x, weight, None, stride, pad_hw, dilation, groups)
    dest = dest if dest is not None else torch.empty_like(y, memory_format=torch.channels_last)
    bias_act_into(y, bias, residual, activation, dest)
    return dest


def _depthwise(x, weight, bias, stride, padding, dilation, groups, activation, residual, dest,
               pool=None):
    dest = dest if dest is not None else _empty_out(x, weight, stride, padding, dilation)
    return depthwise_conv2d_into(x, weight, bias, stride, padding, dilation, activation,
                                 residual, dest, pool)


def _cudnn_fused(x, weight, bias, stride, padding, dilation, groups, activation, residual, dest):
    x = x.contiguous(memory_format=torch.channels_last)  # its plans describe dense NHWC only
    y = torch.ops.cnnfuse.conv2d_cudnn(x, weight, bias, stride, padding, dilation, groups,
                                       ref.activation_code(activation), residual)
    return _deliver(y, dest)


def _triton(config, x, weight, bias, stride, padding, dilation, groups, activation, residual,
            dest, prologue=(None, None, "none"), pool=None):
    from ..kernels import conv2d as kernel
    y = dest if dest is not None else _empty_out(x, weight, stride, padding, dilation)
    allow_tf32 = torch.backends.cudnn.allow_tf32
    return kernel.conv2d(x, weight, bias, residual, y, stride, padding, dilation,
                         ref.activation_args(activation), config, allow_tf32, prologue[0],
                         prologue[1], ref.activation_args(prologue[2]), pool)


_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2}


def _with_prologue(fn, prologue):
    """A backend without a load stage: the prologue first, as its own pass (inside the timed
    call, so the autotuner compares like with like)."""
    if prologue[0] is None and prologue[1] is None:
        return fn

    def run(x, *rest):
        return fn(ref.prologue(x, *prologue), *rest)
    return run


def _pooled(fn, pool):
    """A backend without a pooling epilogue: the mean as a pass of its own (inside the timed
    call, like the prologue)."""
    if pool is None:
        return fn

    def run(*args):
        y = fn(*args)
        torch.mean(y, (2, 3), dtype=torch.float32, out=pool)
        return y
    return run


def _run(x, weight, bias, stride, padding, dilation, groups, activation, residual, prologue,
         dest, pool=None):
    """y into dest (or a new tensor), and mean_hw(y) into pool ((N, K) float32) if given."""
    backend = requested_backend()
    depthwise = is_depthwise(x, weight, groups)
    if x.device.type == "cuda" and backend != "reference":
        # Every kernel addresses x through its strides: a channel slice of an NHWC buffer (a
        # ShuffleNet split, a branch of a concatenation) is read in place.
        if x.stride(1) != 1 and x.shape[1] > 1:
            warn_once("conv2d: input is not channels_last; converting it costs a copy per call "
                      "(pass channels_last tensors, or use cnnfuse.fuse which does)")
            x = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        if not depthwise:  # depthwise weights keep their (possibly tap-major) layout
            weight = weight.contiguous(memory_format=torch.channels_last)
    args = (x, weight, bias, stride, padding, dilation, groups, activation, residual, dest)
    triton_args = args + (prologue, pool)

    def native(fn):  # a backend that pools in its own epilogue
        return functools.partial(_with_prologue(fn, prologue), *args, pool)

    def separate(fn):  # one that leaves the prologue and the pool to passes of their own
        return functools.partial(_pooled(_with_prologue(fn, prologue), pool), *args)

    if x.device.type != "cuda":
        if backend == "triton":
            if triton_interpreting():
                from ..kernels import conv2d as kernel
                ran("conv2d", "Triton (interpreter)")
                return _triton(kernel.INTERPRETER_CONFIG if groups == 1
                               else kernel.INTERPRETER_GROUPED_CONFIG, *triton_args)
            warn_once("conv2d: the Triton kernel runs on CPU tensors only under "
                      "TRITON_INTERPRET=1; using the reference")
        elif backend == "cuda":
            # The CPU build of the CUDA C++ kernels: the same code paths the GPU runs.
            ran("conv2d", ("CUDA C++ depthwise" if depthwise else "PyTorch conv + bias_act")
                + " (CPU build)")
            return native(_depthwise)() if depthwise else separate(_library_conv)()
        ran("conv2d", "reference")
        return separate(_reference)()
    if backend == "reference":
        ran("conv2d", "reference")
        return separate(_reference)()

    candidates = {}
    if depthwise and backend in ("auto", "cuda"):
        candidates["depthwise"] = native(_depthwise)
        default = "depthwise"
    elif backend in ("auto", "triton"):
        from ..kernels import conv2d as kernel
        problem = kernel.Conv2dProblem.of_conv(x.shape, weight.shape, stride, padding,
                                               dilation, groups)
        for cfg in kernel.candidate_configs(problem, dtype=x.dtype):
            candidates[cfg.name] = functools.partial(_triton, cfg, *triton_args)
        default = kernel.default_config(problem, dtype=x.dtype).name
    else:
        default = "cudnn"
    if backend in ("auto", "cuda"):
        if has_cudnn_frontend() and ref.activation_code(activation) in CUDNN_FUSED_CODES:
            candidates["cudnn_fused"] = separate(_cudnn_fused)
        candidates["cudnn"] = separate(_library_conv)
        if backend == "cuda" and not depthwise:
            default = "cudnn"
    input_scale, input_affine, input_activation = prologue
    key = _key(*args) + (f" scale={input_scale is not None} "
                         f"affine={input_activation if input_affine is not None else None}"
                         + (" pool" if pool is not None else ""))

    def reference():
        y = ref.conv2d(x, weight, bias, stride, padding, dilation, groups, activation, residual,
                       *prologue)
        return y if pool is None else (y, y.to(x.dtype).float().mean((2, 3)))
    if pool is not None:  # the autotuner checks (and times) the pool too
        candidates = {name: functools.partial(_with_pool_result, fn, pool)
                      for name, fn in candidates.items()}
        return run_tuned(_tuner, key, candidates, reference, x.dtype, default)[0]
    return run_tuned(_tuner, key, candidates, reference, x.dtype, default)


def _with_pool_result(fn, pool):
    return fn(), pool


def run_pair(tuner: autotune.Autotuner, args: tuple, out_hw: tuple, out_channels: int, key_of,
             triton, two_ops, reference, taps: int = 1):
    """Dispatch of an op that feeds a 1x1 conv from a window of x (separable_conv2d,
    pool_conv2d): one Triton kernel per tile config, or `two_ops`, whichever the autotuner
    measures faster. args = (x, ..., dest) is what triton (after its config), two_ops and
    reference take; key_of(args) names the shape for the autotuner, once x is channels_last;
    taps: the window's size (the Triton configs stage each tap's tile)."""
    op, backend, x = tuner.op, requested_backend(), args[0]
    if x.device.type == "cuda" and x.stride(1) != 1 and x.shape[1] > 1:
        warn_once(f"{op}: input is not channels_last; converting it costs a copy")
        args = (x.contiguous(memory_format=torch.channels_last),) + args[1:]
        x = args[0]
    if x.device.type != "cuda":
        if backend == "triton" and triton_interpreting():
            from ..kernels import conv2d as kernel
            ran(op, "Triton (interpreter)")
            return triton(kernel.INTERPRETER_CONFIG, *args)
        if backend == "cuda":
            ran(op, "two ops (CPU build)")
            return two_ops(*args)
        backend = "reference"
    if backend == "reference":
        ran(op, "reference")
        return reference(*args)
    candidates = {}
    if backend in ("auto", "triton"):
        from ..kernels import conv2d as kernel
        m, k, c = x.shape[0] * out_hw[0] * out_hw[1], out_channels, x.shape[1]
        for cfg in kernel.candidate_configs(m, k, c, dtype=x.dtype, taps=taps):
            candidates[cfg.name] = functools.partial(triton, cfg, *args)
        default = kernel.default_config(m, k, c, dtype=x.dtype, taps=taps).name
    if backend in ("auto", "cuda"):
        candidates["two_ops"] = functools.partial(two_ops, *args)
        default = "two_ops" if backend == "cuda" else default
    return run_tuned(tuner, key_of(args), candidates, lambda: reference(*args[:-1], None),
                     x.dtype, default)


def run_tuned(tuner: autotune.Autotuner, key: str, candidates: dict, reference, dtype,
              default: str):
    """Run the candidate the autotuner picks (timed once per key, checked against
    `reference`) and say which ran; a Triton kernel compiled inside a graph capture is
    loaded in relaxed mode."""
    name = tuner.pick(key, candidates, reference=reference, tolerance=_TOLERANCE[dtype],
                      default=default)
    ran(tuner.op, backend_label(name))
    if name.startswith("triton_"):
        with relaxed_capture():
            return candidates[name]()
    return candidates[name]()


def backend_label(candidate: str) -> str:
    """A readable name for an autotuner candidate (what the profiler prints)."""
    if candidate.startswith("triton_"):
        return f"Triton {candidate[7:]}"
    return {"depthwise": "CUDA C++ depthwise", "cudnn_fused": "cuDNN fused (frontend)",
            "cudnn": "cuDNN + CUDA C++ bias_act", "two_ops": "two ops"}.get(candidate, candidate)


def _key(x, weight, bias, stride, padding, dilation, groups, activation, residual, dest) -> str:
    def layout(t):  # dense, or the strides of a slice (the fastest kernel may differ)
        dense = t is None or t.is_contiguous(memory_format=torch.channels_last)
        return "dense" if dense else "x".join(map(str, t.stride()))
    return (f"{str(x.dtype)[6:]} x{list(x.shape)} w{list(weight.shape)} s{stride} p{padding} "
            f"d{dilation} g{groups} {activation} bias={bias is not None} "
            f"res={residual is not None} in={layout(x)} out={layout(dest)} "
            f"tf32={torch.backends.cudnn.allow_tf32}")
