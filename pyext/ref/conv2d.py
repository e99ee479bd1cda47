"""Reference of cnnfuse::conv2d: y = act(conv2d(x, w) + bias + residual), computed in fp32."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .bias_act import bias_act


def scale_channels(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x · scale[n, c], computed in fp32 and rounded to x's dtype (PyTorch's own multiply)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) * scale.to(acc)[:, :, None, None]
    return y.to(x.dtype)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
           activation: str, residual: Optional[torch.Tensor],
           input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """padding is (left, right, top, bottom); the result is channels_last, in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    left, right, top, bottom = padding
    if input_scale is not None:
        x = scale_channels(x, input_scale)
    xf = x.to(acc)
    if left == right and top == bottom:
        y = F.conv2d(xf, weight.to(acc), None, tuple(stride), (top, left), tuple(dilation), groups)
    else:
        xf = F.pad(xf, (left, right, top, bottom))
        y = F.conv2d(xf, weight.to(acc), None, tuple(stride), 0, tuple(dilation), groups)
    y = bias_act(y, bias, residual, activation)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)
