"""cnnfuse::separable_conv2d — a depthwise conv and the 1x1 conv that reads it, in one kernel.

    y = act(conv1x1(dw_act(depthwise(x) + dw_bias), weight) + bias + residual)

The depthwise output (MobileNet's and MnasNet's expanded activation, Xception's separable
convs) is computed tile by tile as the 1x1 conv's input loads (kernels/conv2d.py, `DW`), so
it never goes to memory. The autotuner times that against the two ops run one after the
other and keeps the fused kernel only where it is faster.
"""
from typing import Optional, Sequence, Union

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import autotune, ref
from . import _check, _eager
from .conv2d import _key, conv_flops, output_hw, plan, run_pair

_tuner = autotune.Autotuner("separable_conv2d")

def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor,
                     dw_bias: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None,
                     dw_stride: Union[int, Sequence[int]] = 1, dw_padding=0,
                     dw_dilation: Union[int, Sequence[int]] = 1, *, dw_activation: str = "none",
                     activation: str = "none", residual: Optional[torch.Tensor] = None,
                     out: Optional[torch.Tensor] = None,
                     out_channel_offset: int = 0) -> torch.Tensor:
    """dw_weight (C, 1, KH, KW), weight (K, C, 1, 1); dw_padding as in `conv2d`. With `out`
    (N, C_total, OH, OW) the result lands in channels [out_channel_offset, +K)."""
    args, shape = check_args(x, dw_weight, dw_bias, weight, bias, dw_stride, dw_padding,
                             dw_dilation, dw_activation, activation, residual)
    if out is not None:
        _check.out_slice(out, x, shape, out_channel_offset)
    return _eager.call(x, _run, torch.ops.cnnfuse.separable_conv2d, torch.ops.cnnfuse.separable_conv2d_into, args,
                       shape[1], out, out_channel_offset)


def check_args(x, dw_weight, dw_bias, weight, bias, dw_stride, dw_padding, dw_dilation,
               dw_activation, activation, residual):
    """The checks of `separable_conv2d` (errors name the argument); returns the op's
    arguments (dw_padding as (left, right, top, bottom)) and the output shape."""
    _check.tensor("x", x, 4)
    _check.activation("dw_activation", dw_activation)
    stride, pads, dilation, (n, c, oh, ow) = plan(x, dw_weight, dw_bias, dw_stride, dw_padding,
                                                  dw_dilation, x.shape[1], dw_activation, None)
    if dw_weight.shape[0] != x.shape[1]:
        raise ValueError(f"dw_weight has {dw_weight.shape[0]} output channels; a separable conv "
                         f"needs one per input channel ({x.shape[1]})")
    _check.tensor("weight", weight, 4)
    _check.same_dtype("weight", weight, x)
    _check.same_device("weight", weight, x)
    if tuple(weight.shape[1:]) != (c, 1, 1):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (K, {c}, 1, 1)")
    _check.activation("activation", activation)
    shape = (n, weight.shape[0], oh, ow)
    _check.epilogue(x, bias, residual, shape)
    return (x, dw_weight, dw_bias, stride, pads, dilation, dw_activation, weight, bias,
            activation, residual), shape


@torch.library.custom_op("cnnfuse::separable_conv2d", mutates_args=())
def _separable_op(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                  dw_stride: list[int], dw_padding: list[int], dw_dilation: list[int],
                  dw_activation: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return _run(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation,
                weight, bias, activation, residual, None)


@torch.library.custom_op("cnnfuse::separable_conv2d_into", mutates_args=("out",))
def _separable_into_op(x: torch.Tensor, dw_weight: torch.Tensor,
                       dw_bias: Optional[torch.Tensor], dw_stride: list[int],
                       dw_padding: list[int], dw_dilation: list[int], dw_activation: str,
                       weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                       residual: Optional[torch.Tensor], out: torch.Tensor,
                       out_channel_offset: int) -> None:
    dest = out.narrow(1, out_channel_offset, weight.shape[0])
    _run(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight, bias,
         activation, residual, dest)


def _empty_out(x, dw_weight, dw_stride, dw_padding, dw_dilation, weight):
    oh, ow = output_hw(x.shape[2], x.shape[3], dw_weight.shape[2:], dw_stride, dw_padding,
                       dw_dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@_separable_op.register_fake
def _(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight, bias,
      activation, residual):
    return _empty_out(x, dw_weight, dw_stride, dw_padding, dw_dilation, weight)


@_separable_into_op.register_fake
def _(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight, bias,
      activation, residual, out, out_channel_offset):
    return None


@register_flop_formula([torch.ops.cnnfuse.separable_conv2d,
                        torch.ops.cnnfuse.separable_conv2d_into])
def separable_flops(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation,
                    weight, *rest, out_shape=None, **kwargs):
    oh, ow = output_hw(x[2], x[3], dw_weight[2:], dw_stride, dw_padding, dw_dilation)
    return (conv_flops(x, dw_weight, dw_stride, dw_padding, dw_dilation)
            + conv_flops((x[0], x[1], oh, ow), weight, (1, 1), (0, 0, 0, 0), (1, 1)))


# ---------------------------------------------------------------------------------------------

def _two_ops(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight,
             bias, activation, residual, dest):
    """The depthwise conv, then the 1x1 conv, each on its own fastest backend."""
    from .conv2d import conv2d
    mid = conv2d(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, x.shape[1],
                 activation=dw_activation)
    return conv2d(mid, weight, bias, activation=activation, residual=residual,
                  **({} if dest is None else dict(out=dest)))


def _reference(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight,
               bias, activation, residual, dest):
    if x.device.type == "cpu" and x.dtype == torch.float32:  # as the eager plan computes it
        from ._eager import CpuSeparable
        return CpuSeparable(dw_stride, dw_padding, dw_dilation, x.shape[1], dw_activation,
                            activation).compute(x, dw_weight, dw_bias, weight, bias,
                                                residual, dest)
    mid = ref.conv2d(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, x.shape[1],
                     dw_activation, None)
    y = ref.conv2d(mid, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, activation, residual)
    return y if dest is None else dest.copy_(y)


def _triton(config, x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation,
            weight, bias, activation, residual, dest):
    from ..kernels import conv2d as kernel
    y = dest if dest is not None else _empty_out(x, dw_weight, dw_stride, dw_padding,
                                                 dw_dilation, weight)
    return kernel.separable_conv2d(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation,
                                   ref.activation_args(dw_activation), weight, bias, residual,
                                   y, ref.activation_args(activation), config,
                                   torch.backends.cudnn.allow_tf32)


def _run(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight, bias,
         activation, residual, dest):
    def key(args):
        x, dest = args[0], args[-1]
        return (_key(x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, x.shape[1],
                     dw_activation, None, dest)
                + f" | pw w{list(weight.shape)} {activation} bias={bias is not None} "
                  f"res={residual is not None}")
    args = (x, dw_weight, dw_bias, dw_stride, dw_padding, dw_dilation, dw_activation, weight,
            bias, activation, residual, dest)
    out_hw = output_hw(x.shape[2], x.shape[3], dw_weight.shape[2:], dw_stride, dw_padding,
                       dw_dilation)
    return run_pair(_tuner, args, out_hw, weight.shape[0], key, _triton, _two_ops, _reference,
                    taps=dw_weight.shape[2] * dw_weight.shape[3])
