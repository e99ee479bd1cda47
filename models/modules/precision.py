"""Whether folded weights survive a cast: folding a BatchNorm with a tiny running variance
multiplies a conv's weights by 1 / sqrt(var + eps), which can leave float16's range (±65504)
or, for huge variances, fall into its subnormals (below 6.1e-5, fewer significant bits). Eager
PyTorch never holds that product in the low-precision dtype, so neither may the fold."""
import torch


def fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every finite value of `t` (any float dtype) is a finite normal number or zero
    once cast to `dtype`, so the cast keeps the dtype's relative precision."""
    if not (t.is_floating_point() and dtype.is_floating_point):
        return True
    info = torch.finfo(dtype)
    a = t.detach().abs()
    finite = torch.isfinite(a)
    a = a[finite]
    return bool(((a <= info.max) & ((a == 0) | (a >= info.tiny))).all())
