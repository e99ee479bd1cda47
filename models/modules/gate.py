"""The attention product (1 + M) · T of Residual Attention Networks (Wang et al., "Residual
Attention Network for Image Classification", CVPR 2017, Eq. 3: H = (1 + M(x)) · F(x)) as one
elementwise pass, T + M · T, instead of eager's two (1 + M, then the product)."""
import torch
from torch import fx


@fx.wrap
def one_plus_gate(trunk, mask):
    """(1 + mask) · trunk. For two tensors of one dtype and device: torch.addcmul(trunk,
    mask, trunk), one pass, broadcast as the product is; anything else (a number, mixed
    dtypes) as written, so the result is always what eager computes up to one rounding."""
    if (isinstance(trunk, torch.Tensor) and isinstance(mask, torch.Tensor)
            and trunk.dtype == mask.dtype and trunk.device == mask.device
            and trunk.is_floating_point()):
        return torch.addcmul(trunk, mask, trunk)
    return (1 + mask) * trunk
