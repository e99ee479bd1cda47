"""Reference of cnnfuse::depthwise_conv2d: conv2d with one group per input channel."""
from typing import Optional, Sequence

import torch

from .conv2d import conv2d


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     activation: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """weight is (mult·C, 1, KH, KW); output channel k reads input channel k // mult."""
    return conv2d(x, weight, bias, stride, padding, dilation, x.shape[1], activation, residual)
