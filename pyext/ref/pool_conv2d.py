"""Reference of cnnfuse::pool_conv2d: a max or average pool, then a 1x1 conv with its epilogue."""
from typing import Optional

import torch
import torch.nn.functional as F

from .conv2d import conv2d


def pool2d(x: torch.Tensor, mode: str, kernel_size, stride, padding) -> torch.Tensor:
    """PyTorch's own pool in x's dtype; padding (h, w). mode: max, avg (the padding counted in
    the divisor) or avg_valid (not counted)."""
    if mode == "max":
        return F.max_pool2d(x, kernel_size, stride, padding)
    return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=mode == "avg")


def pool_conv2d(x: torch.Tensor, mode: str, kernel_size, stride, padding, weight: torch.Tensor,
                bias: Optional[torch.Tensor], activation: str,
                residual: Optional[torch.Tensor]) -> torch.Tensor:
    pooled = pool2d(x, mode, kernel_size, stride, padding)
    return conv2d(pooled, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, activation, residual)
