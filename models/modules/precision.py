"""Whether folded weights survive a cast: folding a BatchNorm with a tiny running variance
multiplies a conv's weights by 1 / sqrt(var + eps), which can leave float16's range (±65504)
or, for huge variances, fall into its subnormals (below 6.1e-5, fewer significant bits). Eager
PyTorch never holds that product in the low-precision dtype, so neither may the fold."""
import torch


def fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a cast of `t` (any float dtype) to `dtype` keeps it finite and, for a weight
    (2-d or more, output channels first), each output channel's largest magnitude a normal
    number: values small against their channel's largest lose only what eager's own rounding
    of the dot loses, but a channel wholly in the subnormals loses its precision. A bias
    (1-d) only must not overflow."""
    if not (t.is_floating_point() and dtype.is_floating_point):
        return True
    info = torch.finfo(dtype)
    a = t.detach().abs().double()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    if a.dim() < 2:
        return bool((a <= info.max).all())
    peak = a.reshape(a.shape[0], -1).amax(1)
    return bool(((peak <= info.max) & ((peak == 0) | (peak >= info.tiny))).all())
