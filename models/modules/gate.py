"""The attention product (1 + M) · T of Residual Attention Networks (Wang et al., "Residual
Attention Network for Image Classification", CVPR 2017, Eq. 3: H = (1 + M(x)) · F(x)), with
eager's rounding: 1 + M rounded first, then the product, written into the sum's own buffer
(no second temporary). T + M · T in one pass (torch.addcmul) would round differently and
give NaN where eager gives inf (T = inf, M in (-1, 0]: inf + M · inf)."""
import torch
from torch import fx


@fx.wrap
def one_plus_gate(trunk, mask):
    """(1 + mask) · trunk, bit for bit as eager computes it. trunk and mask: tensors (any
    shape that broadcasts, any dtype) or numbers. For two tensors of one floating dtype and
    device where the product has the mask's shape, the product is written into the buffer
    of 1 + mask; anything else (mask broadcast up, mixed dtypes, numbers) as written."""
    if (isinstance(trunk, torch.Tensor) and isinstance(mask, torch.Tensor)
            and trunk.dtype == mask.dtype and trunk.device == mask.device
            and mask.is_floating_point()
            and torch.broadcast_shapes(trunk.shape, mask.shape) == mask.shape):
        return torch.add(mask, 1).mul_(trunk)
    return (1 + mask) * trunk
