"""Reference of cnnfuse::conv2d: y = act(conv2d(prologue(x), w) + bias + residual), in fp32."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .activation import apply_activation
from .bias_act import bias_act


def scale_channels(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x · scale[n, c], computed in fp32 and rounded to x's dtype (PyTorch's own multiply)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) * scale.to(acc)[:, :, None, None]
    return y.to(x.dtype)


def affine_act(x: torch.Tensor, affine: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x · affine[0, c] + affine[1, c]) in fp32, rounded to x's dtype: an eval-mode
    BatchNorm and the activation after it, as PyTorch computes them."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = affine.to(acc)
    y = x.to(acc) * a[0].view(1, -1, 1, 1) + a[1].view(1, -1, 1, 1)
    return apply_activation(y, activation).to(x.dtype)


def prologue(x: torch.Tensor, input_scale: Optional[torch.Tensor],
             input_affine: Optional[torch.Tensor], input_activation: str) -> torch.Tensor:
    """What the conv's load stage does to x: the affine + activation, then the SE scale."""
    if input_affine is not None:
        x = affine_act(x, input_affine, input_activation)
    if input_scale is not None:
        x = scale_channels(x, input_scale)
    return x


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
           activation: str, residual: Optional[torch.Tensor],
           input_scale: Optional[torch.Tensor] = None,
           input_affine: Optional[torch.Tensor] = None,
           input_activation: str = "none") -> torch.Tensor:
    """padding is (left, right, top, bottom); the result is channels_last, in x's dtype. The
    prologue applies to x itself, so padding stays zero."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    left, right, top, bottom = padding
    x = prologue(x, input_scale, input_affine, input_activation)
    xf = x.to(acc)
    if left == right and top == bottom:
        y = F.conv2d(xf, weight.to(acc), None, tuple(stride), (top, left), tuple(dilation), groups)
    else:
        xf = F.pad(xf, (left, right, top, bottom))
        y = F.conv2d(xf, weight.to(acc), None, tuple(stride), 0, tuple(dilation), groups)
    y = bias_act(y, bias, residual, activation)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)
