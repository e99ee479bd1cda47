"""FusedPoolConv2d: a max or average pool and the 1x1 conv that reads it (Inception's pool
projection), through `cnnfuse.ops.pool_conv2d` (one kernel where that measures faster)."""
import functools
from typing import Optional

import torch
from torch import nn

from ... import ops, ref
from ...ops import _eager
from ...ops._eager import signature
from ...ref.pool_conv2d import pool_padding
from .fused_conv import FusedConv2d, _fits, with_epilogue


def can_take(conv: FusedConv2d) -> bool:
    """A 1x1 stride-1 conv with no prologue of its own and one output."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and not any(conv.padding)
            and conv.groups == 1 and not conv.has_input_scale and conv.input_affine is None
            and not conv.returns_pooled)


class FusedPoolConv2d(nn.Module):
    """act(conv1x1(pool(x)) + residual); the conv keeps its parameters as `conv`. mode "max",
    "avg" or "avg_valid"; kernel_size, stride, padding (h, w) and ceil_mode as the pool
    (nn.MaxPool2d / nn.AvgPool2d) takes them."""
    ceil_mode = False  # (instances pickled before ceil mode was paired have none of their own)

    def __init__(self, mode: str, kernel_size, stride, padding, conv: FusedConv2d,
                 ceil_mode: bool = False):
        super().__init__()
        if not can_take(conv):
            raise ValueError("FusedPoolConv2d needs a 1x1 stride-1 conv without a prologue")
        self.mode, self.pool_kernel, self.pool_stride = mode, tuple(kernel_size), tuple(stride)
        self.pool_padding = tuple(padding)  # (h, w), as the pool takes it
        self.ceil_mode = bool(ceil_mode)
        self.conv = conv

    # The geometry of the pair, as a concatenation sizes its parts.
    in_channels = property(lambda self: self.conv.in_channels)
    out_channels = property(lambda self: self.conv.out_channels)
    kernel_size = property(lambda self: self.pool_kernel)
    stride = property(lambda self: self.pool_stride)
    # (left, right, top, bottom): a ceil-mode window's overhang as right and bottom padding,
    # so the floor-mode output size of this padding is the pool's
    padding = property(lambda self: tuple(pool_padding(self.pool_kernel, self.pool_stride,
                                                       self.pool_padding, self.ceil_mode)))
    dilation = property(lambda self: (1, 1))
    has_residual = property(lambda self: self.conv.has_residual)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        conv = self.conv
        if _eager.active(x):
            key = (signature(x), signature(residual), signature(out), conv.weight.dtype,
                   conv.weight.device, _eager.environment(), conv.activation,
                   conv.has_residual, self.mode, self.pool_kernel, self.pool_stride,
                   self.pool_padding, self.ceil_mode)
            plan = _eager.cached(self, key, lambda: self._eager_plan(x, residual, out))
            if plan is not None:
                return plan(x, conv.weight, conv.bias, residual=residual, dest=out)
        if conv.weight.dtype != x.dtype:
            # a weight kept wider than x (so it does not overflow): the pool, then the conv in
            # its weight's dtype
            return conv(ref.pool2d(x, self.mode, self.pool_kernel, self.pool_stride,
                                   self.pool_padding, self.ceil_mode), residual, out=out)
        op = functools.partial(ops.pool_conv2d, x, conv.weight, conv.bias, mode=self.mode,
                               kernel_size=self.pool_kernel, stride=self.pool_stride,
                               padding=self.pool_padding, ceil_mode=self.ceil_mode)
        return with_epilogue(self, op, x, residual, out, conv.activation)

    def _eager_plan(self, x, residual, out):
        """The cached plan for calls like this, or None for the op path (a residual it adds
        outside the kernel, a weight in another dtype than x, an argument it reports)."""
        conv = self.conv
        if (self.has_residual != (residual is not None) or conv.weight.dtype != x.dtype
                or (residual is not None and not _fits(residual, x, self))):
            return None
        return _eager.plan_pool_conv2d(x, conv.weight, conv.bias, self.mode, self.pool_kernel,
                                       self.pool_stride, self.padding, conv.activation,
                                       residual, out)

    def extra_repr(self) -> str:
        return (f"{self.mode} pool {self.pool_kernel}, stride={self.pool_stride}, "
                f"padding={self.pool_padding}" + (", ceil_mode=True" if self.ceil_mode else ""))
