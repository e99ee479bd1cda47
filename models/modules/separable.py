"""FusedSeparableConv2d: a depthwise conv and the 1x1 conv that reads it, through
`cnnfuse.ops.separable_conv2d` (one kernel where that measures faster)."""
import functools
from typing import Optional

import torch
from torch import nn

from ... import ops
from ...ops import _eager
from ...ops._eager import signature
from .fused_conv import FusedConv2d, _fits, with_epilogue


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
        if _eager.active(x):
            key = (signature(x), signature(residual), signature(out), dw.weight.dtype,
                   dw.weight.device, pw.weight.dtype, _eager.environment(), dw.activation,
                   pw.activation, dw.stride, dw.padding, dw.dilation, pw.has_residual)
            plan = _eager.cached(self, key, lambda: self._eager_plan(x, residual, out))
            if plan is not None:
                return plan(x, dw.weight, dw.bias, pw.weight, pw.bias, residual=residual,
                            dest=out)
        if dw.weight.dtype != x.dtype or pw.weight.dtype != x.dtype:
            # a weight kept wider than x (so it does not overflow): each conv on its own,
            # in its weight's dtype
            return pw(dw(x), residual, out=out)
        op = functools.partial(ops.separable_conv2d, x, dw.weight, dw.bias, pw.weight, pw.bias,
                               dw.stride, list(dw.padding), dw.dilation,
                               dw_activation=dw.activation)
        return with_epilogue(self, op, x, residual, out, pw.activation)

    def _eager_plan(self, x, residual, out):
        """The cached plan for calls like this, or None for the op path (a residual it adds
        outside the kernel, weights in another dtype than x, an argument it reports)."""
        dw, pw = self.depthwise, self.pointwise
        if (self.has_residual != (residual is not None) or dw.weight.dtype != x.dtype
                or pw.weight.dtype != x.dtype
                or (residual is not None and not _fits(residual, x, self))):
            return None
        return _eager.plan_separable(x, dw.weight, dw.bias, pw.weight, pw.bias, dw.stride,
                                     list(dw.padding), dw.dilation, dw.activation,
                                     pw.activation, residual, out)
