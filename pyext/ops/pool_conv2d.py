"""cnnfuse::pool_conv2d — a max or average pool and the 1x1 conv that reads it, in one kernel.

    y = act(conv1x1(pool(x), weight) + bias + residual)

Inception's pool projection (GoogLeNet's 3x3 max pool, Inception-v3's and v4's 3x3 average
pool, each followed by a 1x1 conv), and in ceil mode BN-Inception's stem pool and the
stride-2 average pool of ResNet-D's downsampling shortcut: the pooled tile is computed as the
conv's input loads (kernels/conv2d.py, `POOL_IN`), so the pooled tensor never goes to memory.
The autotuner times that against the pool and the conv run one after the other and keeps the
faster. The schema takes the pool's padding as (left, right, top, bottom): PyTorch's
symmetric padding, with ceil mode as extra right and bottom padding (ref/pool_conv2d.py).
"""
from typing import Optional, Sequence, Union

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import autotune, ref
from ..ref.pool_conv2d import pool_padding, torch_padding
from . import _check, _eager
from .conv2d import _key, conv_flops, output_hw, run_pair

_tuner = autotune.Autotuner("pool_conv2d")
MODES = ("max", "avg", "avg_valid")


def pool_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                mode: str = "max", kernel_size: Union[int, Sequence[int]] = 3,
                stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
                ceil_mode: bool = False, activation: str = "none",
                residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                out_channel_offset: int = 0) -> torch.Tensor:
    """conv1x1(pool(x)) with the conv's epilogue, x (N, C, H, W) float16, bfloat16 or float32.
    mode: "max", "avg" (padding counted in the divisor, PyTorch's count_include_pad=True) or
    "avg_valid" (not counted); kernel_size, stride, padding and ceil_mode as in F.max_pool2d /
    F.avg_pool2d (padding (h, w), at most half the window; ceil mode's output size
    ceil((H + 2p - k) / s) + 1, less one where the last window would start in the right
    padding). padding may also be the schema's (left, right, top, bottom)
    (ref.pool_conv2d.pool_padding), which says ceil mode itself. weight (K, C, 1, 1), bias
    (K,), residual (N, K, OH, OW). With `out` (N, C_total, OH, OW) the result lands in
    channels [out_channel_offset, +K). Raises ValueError / TypeError naming the argument."""
    args, shape = check_args(x, weight, bias, mode, kernel_size, stride, padding, activation,
                             residual, ceil_mode)
    if out is not None:
        _check.out_slice(out, x, shape, out_channel_offset)
    return _eager.call(x, _run, torch.ops.cnnfuse.pool_conv2d,
                       torch.ops.cnnfuse.pool_conv2d_into, args, shape[1], out,
                       out_channel_offset)


def check_args(x, weight, bias, mode, kernel_size, stride, padding, activation, residual,
               ceil_mode: bool = False):
    """The checks of `pool_conv2d` (errors name the argument); returns the op's arguments
    (padding as (left, right, top, bottom), ceil mode in it) and the output shape."""
    _check.tensor("x", x, 4)
    _check.floating("x", x)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    kernel = _check.pair("kernel_size", kernel_size, 1)
    stride = _check.pair("stride", stride, 1)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    if not isinstance(padding, int) and len(padding) == 4:  # the schema's form
        if ceil_mode:
            raise ValueError("ceil_mode=True with padding (left, right, top, bottom): that "
                             "padding already says whether the pool is in ceil mode")
        if not all(isinstance(i, int) for i in padding):
            raise ValueError(f"padding must hold ints, got {padding!r}")
        pad_hw, ceil_mode = torch_padding(kernel, stride, padding)
    else:
        pad_hw = _check.pair("padding", padding, 0)
    if pad_hw[0] > kernel[0] // 2 or pad_hw[1] > kernel[1] // 2:
        raise ValueError(f"padding {pad_hw} exceeds half the pool window {kernel} "
                         "(as F.max_pool2d requires)")
    pads = pool_padding(kernel, stride, pad_hw, ceil_mode)
    n, c, h, w = x.shape
    oh, ow = output_hw(h, w, kernel, stride, pads, (1, 1))
    if oh < 1 or ow < 1:
        raise ValueError(f"the pool's output would be {oh}x{ow}: input {h}x{w} is too small "
                         f"for window {kernel} with padding {pad_hw}"
                         + (" in ceil mode" if ceil_mode else ""))
    _check.tensor("weight", weight, 4)
    _check.same_dtype("weight", weight, x)
    _check.same_device("weight", weight, x)
    if tuple(weight.shape[1:]) != (c, 1, 1):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (K, {c}, 1, 1)")
    _check.activation("activation", activation)
    shape = (n, weight.shape[0], oh, ow)
    _check.epilogue(x, bias, residual, shape)
    return (x, mode, kernel, stride, pads, weight, bias, activation, residual), shape


@torch.library.custom_op("cnnfuse::pool_conv2d", mutates_args=())
def _pool_conv2d_op(x: torch.Tensor, pool_mode: str, kernel_size: list[int],
                    stride: list[int], padding: list[int], weight: torch.Tensor,
                    bias: Optional[torch.Tensor], activation: str,
                    residual: Optional[torch.Tensor]) -> torch.Tensor:
    return _run(x, pool_mode, kernel_size, stride, padding, weight, bias, activation, residual,
                None)


@torch.library.custom_op("cnnfuse::pool_conv2d_into", mutates_args=("out",))
def _pool_conv2d_into_op(x: torch.Tensor, pool_mode: str, kernel_size: list[int],
                         stride: list[int], padding: list[int], weight: torch.Tensor,
                         bias: Optional[torch.Tensor], activation: str,
                         residual: Optional[torch.Tensor], out: torch.Tensor,
                         out_channel_offset: int) -> None:
    dest = out.narrow(1, out_channel_offset, weight.shape[0])
    _run(x, pool_mode, kernel_size, stride, padding, weight, bias, activation, residual, dest)


def _empty_out(x, kernel_size, stride, padding, weight):
    oh, ow = output_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, (1, 1))
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@_pool_conv2d_op.register_fake
def _(x, pool_mode, kernel_size, stride, padding, weight, bias, activation, residual):
    return _empty_out(x, kernel_size, stride, padding, weight)


@_pool_conv2d_into_op.register_fake
def _(x, pool_mode, kernel_size, stride, padding, weight, bias, activation, residual, out,
      out_channel_offset):
    return None


@register_flop_formula([torch.ops.cnnfuse.pool_conv2d, torch.ops.cnnfuse.pool_conv2d_into])
def pool_conv2d_flops(x, pool_mode, kernel_size, stride, padding, weight, *rest, out_shape=None,
                      **kwargs):
    oh, ow = output_hw(x[2], x[3], kernel_size, stride, padding, (1, 1))
    return conv_flops((x[0], x[1], oh, ow), weight, (1, 1), (0, 0, 0, 0), (1, 1))


# ---------------------------------------------------------------------------------------------

def _two_ops(x, mode, kernel_size, stride, padding, weight, bias, activation, residual, dest):
    """PyTorch's pool, then the 1x1 conv on its own fastest backend."""
    from .conv2d import conv2d
    pooled = ref.pool2d(x, mode, kernel_size, stride, *torch_padding(kernel_size, stride,
                                                                     padding))
    return conv2d(pooled, weight, bias, activation=activation, residual=residual,
                  **({} if dest is None else dict(out=dest)))


def _reference(x, mode, kernel_size, stride, padding, weight, bias, activation, residual, dest):
    # as the eager plan computes it
    if x.device.type == "cpu" and x.dtype == torch.float32:
        from ._eager import CpuPoolConv
        return CpuPoolConv(mode, kernel_size, stride, padding, activation).compute(
            x, weight, bias, residual, dest)
    y = ref.pool_conv2d(x, mode, kernel_size, stride, padding, weight, bias, activation,
                        residual)
    return y if dest is None else dest.copy_(y)


def _triton(config, x, mode, kernel_size, stride, padding, weight, bias, activation, residual,
            dest):
    from ..kernels import conv2d as kernel
    y = dest if dest is not None else _empty_out(x, kernel_size, stride, padding, weight)
    return kernel.pool_conv2d(x, mode, kernel_size, stride, padding, weight, bias, residual, y,
                              ref.activation_args(activation), config,
                              torch.backends.cudnn.allow_tf32)


def _run(x, mode, kernel_size, stride, padding, weight, bias, activation, residual, dest):
    def key(args):
        x, dest = args[0], args[-1]
        return (_key(x, weight, bias, stride, padding, (1, 1), 1, activation, residual, dest)
                + f" | {mode} pool {list(kernel_size)}")
    args = (x, mode, kernel_size, stride, padding, weight, bias, activation, residual, dest)
    out_hw = output_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, (1, 1))
    return run_pair(_tuner, args, out_hw, weight.shape[0], key, _triton, _two_ops, _reference,
                    taps=kernel_size[0] * kernel_size[1])
