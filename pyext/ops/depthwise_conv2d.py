"""cnnfuse::depthwise_conv2d — y = act(depthwise_conv(x, w) + bias + residual), CUDA C++.

The kernel behind `conv2d` when groups == in_channels (csrc/depthwise_conv2d/): NHWC,
16-byte channel vectors, any kernel size, stride, dilation and channel multiplier. It can also
write pool = mean_hw(y) (float32, (N, K)) from the values it stores, which is the squeeze of a
squeeze-and-excitation block without a pass over y. The same C++ runs on CPU tensors (the CPU
build of `_C`), which is how CI tests it.
"""
from typing import Optional, Sequence, Union

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import ref
from ..backend import ran
from .._ext import _C
from . import _check

torch.library.define(
    "cnnfuse::depthwise_conv2d",
    "(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
    "int activation, Tensor? residual, Tensor(a!) out, Tensor(b!)? pool=None, "
    "float act_p0=0.0, float act_p1=0.0) -> ()")


@torch.library.register_fake("cnnfuse::depthwise_conv2d")
def _(x, weight, bias, stride, padding, dilation, activation, residual, out, pool=None,
      act_p0=0.0, act_p1=0.0):
    return None


@register_flop_formula(torch.ops.cnnfuse.depthwise_conv2d)
def _(x, weight, bias, stride, padding, dilation, *rest, out_shape=None, **kwargs):
    from .conv2d import conv_flops
    return conv_flops(x, weight, stride, padding, dilation)


def _reference_impl(x, weight, bias, stride, padding, dilation, activation, residual, out,
                    pool=None, act_p0=0.0, act_p1=0.0):
    ran("depthwise_conv2d", "reference")
    out.copy_(ref.depthwise_conv2d(x, weight, bias, stride, padding, dilation,
                                   ref.activation_name(activation, act_p0, act_p1), residual))
    if pool is not None:
        torch.mean(out, (2, 3), dtype=torch.float32, out=pool)


for _key in ("CPU", "CUDA"):
    if _C is None or not torch._C._dispatch_has_kernel_for_dispatch_key(
            "cnnfuse::depthwise_conv2d", _key):
        torch.library.impl("cnnfuse::depthwise_conv2d", _key)(_reference_impl)


def is_depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    return groups == x.shape[1] and weight.shape[1] == 1


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (K, 1, KH, KW) weight stored tap-major (channels fastest), so the kernel reads one
    16-byte vector of channels per tap; same shape and values, other strides."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def depthwise_conv2d_into(x, weight, bias, stride, padding, dilation, activation: str,
                          residual, dest: torch.Tensor, pool=None) -> torch.Tensor:
    """Internal entry for already-checked tensors; dest may be a channel-slice view, pool a
    contiguous (N, K) float32 tensor for mean_hw(dest)."""
    code, p0, p1 = ref.activation_args(activation)
    torch.ops.cnnfuse.depthwise_conv2d(x, weight, bias, stride, padding, dilation, code,
                                       residual, dest, pool, p0, p1)
    return dest


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride: Union[int, Sequence[int]] = 1, padding=0,
                     dilation: Union[int, Sequence[int]] = 1, *, activation: str = "none",
                     residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                     out_channel_offset: int = 0, return_pooled: bool = False):
    """`conv2d(..., groups=x.shape[1])` on the depthwise kernel itself, skipping autotuning.

    weight is (mult·C, 1, KH, KW); `pack_weight` gives it the layout the kernel reads fastest.
    With return_pooled, returns (y, pooled): pooled (N, K) float32 is y's mean over its
    height and width, summed from the values the kernel stores.
    """
    from .conv2d import plan
    stride, pads, dilation, shape = plan(x, weight, bias, stride, padding, dilation,
                                         _check.tensor("x", x, 4).shape[1], activation, residual)
    if out is None:
        dest = result = torch.empty(shape, dtype=x.dtype, device=x.device,
                                    memory_format=torch.channels_last)
    else:
        dest, result = _check.out_slice(out, x, shape, out_channel_offset), out
    pool = x.new_empty(shape[:2], dtype=torch.float32) if return_pooled else None
    depthwise_conv2d_into(x, weight, bias, stride, pads, dilation, activation, residual, dest,
                          pool)
    return (result, pool) if return_pooled else result
