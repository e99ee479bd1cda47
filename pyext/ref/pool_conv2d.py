"""Reference of cnnfuse::pool_conv2d: a max or average pool, then a 1x1 conv with its epilogue.

The op takes a pool's padding as (left, right, top, bottom). PyTorch's pools pad symmetrically,
(pad_h, pad_w); in ceil mode their output size is ceil((H + 2p - k) / s) + 1, less one when
the last window would start in the right padding (torch's pooling_output_shape), so the last
window may overhang the padded input. That is the floor-mode size of the input padded by p on
the left and p + e on the right, e = min(s - 1, k - p - 1), whatever H is: with the rounding
slack d = s * ceil((H + 2p - k) / s) - (H + 2p - k) in [0, s - 1], the last window starts in
the padding exactly when d >= k - p, and floor((H + 2p - k + e) / s) drops that window exactly
when e < d. So ceil mode is this extra right and bottom padding (`pool_padding`), plus the
divisor rule of count_include_pad=True: the window clipped to [-p, H + p), the overhang not
counted (PyTorch's avg_pool2d; the Triton kernel's "avg" window computes the same).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .conv2d import conv2d


def pool_padding(kernel_size, stride, padding, ceil_mode: bool = False) -> list[int]:
    """(left, right, top, bottom) of a PyTorch pool with `padding` (pad_h, pad_w): symmetric,
    or in ceil mode min(s - 1, k - p - 1) more on the right and bottom (see the module
    docstring). kernel_size, stride: (h, w) pairs; padding at most half the window."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    eh, ew = (min(sh - 1, kh - ph - 1), min(sw - 1, kw - pw - 1)) if ceil_mode else (0, 0)
    return [pw, pw + ew, ph, ph + eh]


def torch_padding(kernel_size, stride, padding) -> tuple[tuple[int, int], bool]:
    """((pad_h, pad_w), ceil_mode) of the PyTorch pool whose (left, right, top, bottom) padding
    is `padding` (the inverse of `pool_padding`). Raises ValueError for a padding no PyTorch
    pool has."""
    left, right, top, bottom = padding
    hw, ceil = (top, left), right != left or bottom != top
    if (min(padding) < 0 or top > kernel_size[0] // 2 or left > kernel_size[1] // 2
            or list(padding) != pool_padding(kernel_size, stride, hw, ceil)):
        raise ValueError(
            f"pool padding {list(padding)} (left, right, top, bottom) is no PyTorch pool's "
            f"for window {list(kernel_size)}, stride {list(stride)}: expected "
            f"{pool_padding(kernel_size, stride, hw)} or, in ceil mode, "
            f"{pool_padding(kernel_size, stride, hw, True)}")
    return hw, ceil


def pool2d(x: torch.Tensor, mode: str, kernel_size, stride, padding,
           ceil_mode: bool = False) -> torch.Tensor:
    """PyTorch's own pool in x's dtype; padding (pad_h, pad_w). mode: max, avg (the padding
    counted in the divisor) or avg_valid (not counted)."""
    if mode == "max":
        return F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode,
                        count_include_pad=mode == "avg")


def pool_conv2d(x: torch.Tensor, mode: str, kernel_size, stride, padding, weight: torch.Tensor,
                bias: Optional[torch.Tensor], activation: str,
                residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The op's specification: padding (left, right, top, bottom), as the op takes it."""
    pooled = pool2d(x, mode, kernel_size, stride, *torch_padding(kernel_size, stride, padding))
    return conv2d(pooled, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, activation, residual)
