"""cnnfuse::separable_conv2d_triton and cnnfuse::pool_conv2d_triton — the Triton conv with a
load-stage window (a depthwise conv, a pool) and one tile config fixed, as torch.library
triton_ops: what cnnfuse.export writes for cnnfuse::separable_conv2d(_into) and
cnnfuse::pool_conv2d(_into) calls on CUDA tensors whose pick is a Triton config, so that
torch.compile and AOTInductor compile the kernel itself (see ops/triton_conv2d.py, which holds
the launch they share).

The schemas are those ops' with `config` and `allow_tf32` after the call's own arguments (before
`out`, `out_channel_offset` in the _into forms), as in cnnfuse::conv2d_triton. On CPU tensors
the ops compute the reference, or under TRITON_INTERPRET=1 with CNNFUSE_BACKEND=triton run
the kernel in Triton's interpreter.
"""
from typing import Optional

import torch
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from .. import ref
from ..kernels.conv2d_configs import Conv2dProblem, Window
from .pool_conv2d import pool_conv2d_flops
from .separable_conv2d import separable_flops
from .triton_conv2d import batch_bound, config_of, launch, launching, runs_kernel


def _strides(t):
    return None if t is None else tuple(int(s) for s in t.stride())


def _concrete(x) -> bool:
    return not any(isinstance(d, torch.SymInt) for d in x.shape[1:])


def _nhwc(x):
    """x as the window ops read it (ops.conv2d.run_pair): channels_last."""
    if x.stride(1) != 1 and x.shape[1] > 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _problem(x, weight, bias, residual, y, activation, window, allow_tf32) -> Conv2dProblem:
    n, c, h, w = x.shape
    return Conv2dProblem(batch_bound(n), c, h, w, weight.shape[0], bias=bias is not None,
                         residual=residual is not None,
                         activation=ref.activation_args(activation), window=window,
                         x_strides=_strides(x), y_strides=_strides(y),
                         w_strides=_strides(weight), residual_strides=_strides(residual),
                         allow_tf32=allow_tf32, out_size=tuple(y.shape[2:]))


def _destination(x, shape, out, out_channel_offset):
    """Where the op writes its (N, K, OH, OW) result: channels [offset, + K) of out (checked),
    or a new channels_last tensor."""
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)
    from . import _check
    _check.out_slice(out, x, shape, out_channel_offset)
    return out.narrow(1, out_channel_offset, shape[1])


# ------------------------------------------------------------------- separable conv

def _separable(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight,
               bias, activation, residual, config, allow_tf32, out, out_channel_offset):
    from .conv2d import output_hw
    from .separable_conv2d import check_args
    if _concrete(x):  # (a trace may make the channel count symbolic, which the checks refuse)
        check_args(x, dw_weight, dw_bias, weight, bias, dw_stride, dw_padding, dw_dilation,
                   dw_activation, activation, residual)
    shape = (x.shape[0], weight.shape[0],
             *output_hw(x.shape[2], x.shape[3], dw_weight.shape[2:], dw_stride, dw_padding,
                        dw_dilation))
    cfg = config_of(config)
    y = _destination(x, shape, out, out_channel_offset)
    if not runs_kernel(x):  # cnnfuse::separable_conv2d's CPU implementation, bit for bit
        from .separable_conv2d import _reference
        return _reference(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation,
                          dw_activation, weight, bias, activation, residual, y)
    x = _nhwc(x)
    win = Window("dw", tuple(dw_weight.shape[2:]), tuple(dw_stride), tuple(dw_padding),
                 tuple(dw_dilation), dw_bias is not None, ref.activation_args(dw_activation),
                 (int(dw_weight.stride(0)), int(dw_weight.stride(2)), int(dw_weight.stride(3))))
    p = _problem(x, weight, bias, residual, y, activation, win, allow_tf32)
    with launching(x):
        launch(p, cfg, dict(x=x, w=weight, bias=bias, res=residual, y=y, dw=dw_weight,
                            dwb=dw_bias), x.shape[0])
    return y


@triton_op("cnnfuse::separable_conv2d_triton", mutates_args=())
def separable_conv2d_triton(x: torch.Tensor, dw_weight: torch.Tensor,
                            dw_bias: Optional[torch.Tensor], dw_stride: list[int],
                            dw_padding: list[int], dw_dilation: list[int], dw_activation: str,
                            weight: torch.Tensor, bias: Optional[torch.Tensor],
                            activation: str, residual: Optional[torch.Tensor],
                            config: list[int], allow_tf32: bool) -> torch.Tensor:
    """cnnfuse::separable_conv2d by the Triton conv at one tile config: a new channels_last
    (N, K, OH, OW) tensor. Raises ValueError as cnnfuse::separable_conv2d does, and for a
    malformed config."""
    return _separable(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation,
                      weight, bias, activation, residual, config, allow_tf32, None, 0)


@triton_op("cnnfuse::separable_conv2d_triton_into", mutates_args=("out",))
def separable_conv2d_triton_into(x: torch.Tensor, dw_weight: torch.Tensor,
                                 dw_bias: Optional[torch.Tensor], dw_stride: list[int],
                                 dw_padding: list[int], dw_dilation: list[int],
                                 dw_activation: str, weight: torch.Tensor,
                                 bias: Optional[torch.Tensor], activation: str,
                                 residual: Optional[torch.Tensor], config: list[int],
                                 allow_tf32: bool, out: torch.Tensor,
                                 out_channel_offset: int) -> None:
    """cnnfuse::separable_conv2d_into by the Triton conv: channels [out_channel_offset, + K)
    of out (N, C_total, OH, OW)."""
    _separable(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation,
               weight, bias, activation, residual, config, allow_tf32, out, out_channel_offset)


# ------------------------------------------------------------------ pool projection

def _pool(x, pool_mode, kernel_size, stride, padding, weight, bias, activation, residual,
          config, allow_tf32, out, out_channel_offset):
    from .pool_conv2d import check_args
    if len(padding) != 4:
        raise ValueError(f"padding must be (left, right, top, bottom), got {list(padding)!r}")
    from .conv2d import output_hw
    if _concrete(x):
        check_args(x, weight, bias, pool_mode, kernel_size, stride, padding, activation,
                   residual)
    shape = (x.shape[0], weight.shape[0],
             *output_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, (1, 1)))
    cfg = config_of(config)
    y = _destination(x, shape, out, out_channel_offset)
    if not runs_kernel(x):  # cnnfuse::pool_conv2d's CPU implementation, bit for bit
        from .pool_conv2d import _reference
        return _reference(x, pool_mode, kernel_size, stride, padding, weight, bias, activation,
                          residual, y)
    x = _nhwc(x)
    win = Window(pool_mode, tuple(kernel_size), tuple(stride), tuple(padding))
    p = _problem(x, weight, bias, residual, y, activation, win, allow_tf32)
    with launching(x):
        launch(p, cfg, dict(x=x, w=weight, bias=bias, res=residual, y=y), x.shape[0])
    return y


@triton_op("cnnfuse::pool_conv2d_triton", mutates_args=())
def pool_conv2d_triton(x: torch.Tensor, pool_mode: str, kernel_size: list[int],
                       stride: list[int], padding: list[int], weight: torch.Tensor,
                       bias: Optional[torch.Tensor], activation: str,
                       residual: Optional[torch.Tensor], config: list[int],
                       allow_tf32: bool) -> torch.Tensor:
    """cnnfuse::pool_conv2d by the Triton conv at one tile config: a new channels_last
    (N, K, OH, OW) tensor; padding (left, right, top, bottom). Raises ValueError as
    cnnfuse::pool_conv2d does, and for a malformed config."""
    return _pool(x, pool_mode, kernel_size, stride, padding, weight, bias, activation,
                 residual, config, allow_tf32, None, 0)


@triton_op("cnnfuse::pool_conv2d_triton_into", mutates_args=("out",))
def pool_conv2d_triton_into(x: torch.Tensor, pool_mode: str, kernel_size: list[int],
                            stride: list[int], padding: list[int], weight: torch.Tensor,
                            bias: Optional[torch.Tensor], activation: str,
                            residual: Optional[torch.Tensor], config: list[int],
                            allow_tf32: bool, out: torch.Tensor,
                            out_channel_offset: int) -> None:
    """cnnfuse::pool_conv2d_into by the Triton conv: channels [out_channel_offset, + K) of
    out (N, C_total, OH, OW)."""
    _pool(x, pool_mode, kernel_size, stride, padding, weight, bias, activation, residual,
          config, allow_tf32, out, out_channel_offset)


# FLOPs as for the ops they stand for (their formulas, already taking shapes: raw)
register_flop_formula([torch.ops.cnnfuse.separable_conv2d_triton,
                       torch.ops.cnnfuse.separable_conv2d_triton_into],
                      get_raw=True)(separable_flops)
register_flop_formula([torch.ops.cnnfuse.pool_conv2d_triton,
                       torch.ops.cnnfuse.pool_conv2d_triton_into], get_raw=True)(pool_conv2d_flops)


# cnnfuse op -> the triton op cnnfuse.export writes for it
OPS = {"separable_conv2d": torch.ops.cnnfuse.separable_conv2d_triton.default,
       "separable_conv2d_into": torch.ops.cnnfuse.separable_conv2d_triton_into.default,
       "pool_conv2d": torch.ops.cnnfuse.pool_conv2d_triton.default,
       "pool_conv2d_into": torch.ops.cnnfuse.pool_conv2d_triton_into.default}

__all__ = ["OPS", "pool_conv2d_triton", "pool_conv2d_triton_into", "separable_conv2d_triton",
           "separable_conv2d_triton_into"]
