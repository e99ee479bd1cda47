"""FusedPoolConv2d: a max or average pool and the 1x1 conv that reads it (Inception's pool
projection), through `cnnfuse.ops.pool_conv2d` (one kernel where that measures faster)."""
import functools
from typing import Optional

import torch
from torch import nn

from ... import ops
from .fused_conv import FusedConv2d, with_epilogue


def can_take(conv: FusedConv2d) -> bool:
    """A 1x1 stride-1 conv with no prologue of its own and one output."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and not any(conv.padding)
            and conv.groups == 1 and not conv.has_input_scale and conv.input_affine is None
            and not conv.returns_pooled)


class FusedPoolConv2d(nn.Module):
    """act(conv1x1(pool(x)) + residual); the conv keeps its parameters as `conv`."""

    def __init__(self, mode: str, kernel_size, stride, padding, conv: FusedConv2d):
        super().__init__()
        if not can_take(conv):
            raise ValueError("FusedPoolConv2d needs a 1x1 stride-1 conv without a prologue")
        self.mode, self.pool_kernel, self.pool_stride = mode, tuple(kernel_size), tuple(stride)
        self.pool_padding = tuple(padding)  # (h, w), as the pool takes it
        self.conv = conv

    # The geometry of the pair, as a concatenation sizes its parts.
    in_channels = property(lambda self: self.conv.in_channels)
    out_channels = property(lambda self: self.conv.out_channels)
    kernel_size = property(lambda self: self.pool_kernel)
    stride = property(lambda self: self.pool_stride)
    padding = property(lambda self: (self.pool_padding[1],) * 2 + (self.pool_padding[0],) * 2)
    dilation = property(lambda self: (1, 1))
    has_residual = property(lambda self: self.conv.has_residual)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        conv = self.conv
        op = functools.partial(ops.pool_conv2d, x, conv.weight, conv.bias, mode=self.mode,
                               kernel_size=self.pool_kernel, stride=self.pool_stride,
                               padding=self.pool_padding)
        return with_epilogue(self, op, x, residual, out, conv.activation)

    def extra_repr(self) -> str:
        return (f"{self.mode} pool {self.pool_kernel}, stride={self.pool_stride}, "
                f"padding={self.pool_padding}")
