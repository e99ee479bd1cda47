"""TensorFlow "same" padding: the padding of a strided conv computed from each call's input
size (timm's Conv2dSame, `padding='same'` at stride > 1), asymmetric when the size is odd.

`fuse` first turns such a conv into `same_pad` (one graph call, so the model traces) then a
plain zero-padding conv, which every pass handles like any other; the last pass merges the two
back into one FusedConv2dSame that pads inside the kernel (`passes/same_padding.py`)."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ... import ops
from ...ops import _eager
from ...ops.conv2d import output_hw
from ...backend import warn_once
from ...ref import apply_activation
from .fused_conv import FusedConv2d


def same_padding(h: int, w: int, kernel, stride, dilation) -> tuple:
    """(left, right, top, bottom) that TensorFlow's 'SAME' pads an h x w input by: the output
    is ceil(size / stride), the extra row or column going to the bottom or right."""
    def total(size, k, s, d):
        return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    th, tw = (total(h, kernel[0], stride[0], dilation[0]),
              total(w, kernel[1], stride[1], dilation[1]))
    return tw // 2, tw - tw // 2, th // 2, th - th // 2


def is_static(kernel, stride, dilation) -> bool:
    """Whether the 'SAME' padding is the same for every input size (stride 1, or a kernel
    that spans one pixel)."""
    return all(s == 1 or d * (k - 1) == 0 for k, s, d in zip(kernel, stride, dilation))


@fx.wrap
def same_pad(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> torch.Tensor:
    """x zero-padded as TensorFlow's 'SAME' pads it for a conv of this geometry."""
    pads = same_padding(x.shape[2], x.shape[3], kernel, stride, dilation)
    return F.pad(x, pads) if any(pads) else x


class SamePad(nn.Module):
    """same_pad as a module: what a Conv2dSame becomes before the trace, followed by a plain
    nn.Conv2d with padding 0."""

    def __init__(self, kernel_size, stride, dilation):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = (tuple(kernel_size), tuple(stride),
                                                        tuple(dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_pad(x, self.kernel_size, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


class FusedConv2dSame(FusedConv2d):
    """A FusedConv2d whose zero padding is TensorFlow's 'SAME' for each call's input size
    (`padding` stays (0, 0, 0, 0)). x: (N, C_in, H, W) in the weight's dtype; returns
    (N, C_out, ceil(H / stride_h), ceil(W / stride_w)). Raises ValueError for a non-4-D x or
    a residual / input_scale that does not match how the module was built."""

    @classmethod
    def from_fused(cls, conv: FusedConv2d) -> "FusedConv2dSame":
        """The same conv (parameters, epilogue and prologue shared) with 'SAME' padding."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in conv.__dict__.items()
                             if k not in ("_parameters", "_buffers", "_modules")})
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        new.padding = (0, 0, 0, 0)
        return new

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                input_scale: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None):
        self._check_inputs(residual, input_scale)
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        if _eager.wider_weight(self.weight, x):  # weights kept float32 (x's range)
            return self._in_weight_dtype(self.forward, x, residual, input_scale, out)
        pads = same_padding(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.dilation)
        args = (x, self.weight, self.bias, self.stride, list(pads), self.dilation, self.groups)
        prologue = dict(input_scale=input_scale, input_affine=self.input_affine,
                        input_activation=self.input_activation)
        oh, ow = output_hw(x.shape[2], x.shape[3], self.kernel_size, self.stride, pads,
                           self.dilation)
        if residual is not None and not (isinstance(residual, torch.Tensor)
                                         and residual.dtype == x.dtype and tuple(residual.shape)
                                         == (x.shape[0], self.out_channels, oh, ow)):
            warn_once(f"{type(self).__name__}: residual {tuple(residual.shape)} "
                      f"{residual.dtype} does not match the conv output; adding it outside the "
                      "kernel")
            y = apply_activation(ops.conv2d(*args, **prologue) + residual, self.activation)
            y = y if out is None else out.copy_(y)
            return (y, y.mean((2, 3), dtype=torch.float32)) if self.returns_pooled else y
        return ops.conv2d(*args, activation=self.activation, residual=residual, out=out,
                          return_pooled=self.returns_pooled, **prologue)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(f"padding={self.padding}", "padding=tf_same")
