"""FusedSeparableConv2d: a depthwise conv and the 1x1 conv that reads it, through
`cnnfuse.ops.separable_conv2d` (one kernel where that measures faster)."""
import functools
from typing import Optional

import torch
from torch import nn

from ... import ops
from .fused_conv import FusedConv2d, with_epilogue


def can_pair(dw: FusedConv2d, pw: FusedConv2d) -> bool:
    """A depthwise conv (multiplier 1, nothing fused before it) and a 1x1 stride-1 conv over
    all its channels with no prologue of its own."""
    return (dw.depthwise and dw.out_channels == dw.in_channels and not dw.has_residual
            and not dw.has_input_scale and dw.input_affine is None
            and pw.kernel_size == (1, 1) and pw.stride == (1, 1) and not any(pw.padding)
            and pw.groups == 1 and pw.in_channels == dw.out_channels
            and not pw.has_input_scale and pw.input_affine is None
            and not dw.returns_pooled and not pw.returns_pooled  # one output each
            and dw.weight.dtype == pw.weight.dtype)


class FusedSeparableConv2d(nn.Module):
    """act(conv1x1(dw_act(depthwise(x)))) + residual; the two convs keep their parameters as
    `depthwise` and `pointwise`."""

    def __init__(self, depthwise: FusedConv2d, pointwise: FusedConv2d):
        super().__init__()
        if not can_pair(depthwise, pointwise):
            raise ValueError("FusedSeparableConv2d needs a depthwise conv and a 1x1 conv that "
                             "reads all its channels")
        self.depthwise, self.pointwise = depthwise, pointwise

    # The geometry of the pair, as a concatenation sizes its parts.
    in_channels = property(lambda self: self.depthwise.in_channels)
    out_channels = property(lambda self: self.pointwise.out_channels)
    kernel_size = property(lambda self: self.depthwise.kernel_size)
    stride = property(lambda self: self.depthwise.stride)
    padding = property(lambda self: self.depthwise.padding)
    dilation = property(lambda self: self.depthwise.dilation)
    has_residual = property(lambda self: self.pointwise.has_residual)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        dw, pw = self.depthwise, self.pointwise
        op = functools.partial(ops.separable_conv2d, x, dw.weight, dw.bias, pw.weight, pw.bias,
                               dw.stride, list(dw.padding), dw.dilation,
                               dw_activation=dw.activation)
        return with_epilogue(self, op, x, residual, out, pw.activation)
