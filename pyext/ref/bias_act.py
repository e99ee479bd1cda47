"""Reference of cnnfuse::bias_act: y = act(x · scale + bias + residual), in fp32, the product
rounded to x's dtype as eager's multiply rounds it."""
from typing import Optional

import torch

from .activation import apply_activation


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             activation: str, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc)
    if scale is not None:
        y = (y * scale.to(acc)[:, :, None, None]).to(x.dtype).to(acc)
    if bias is not None:
        y = y + bias.to(acc).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(acc)
    return apply_activation(y, activation).to(x.dtype)
