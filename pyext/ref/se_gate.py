"""Reference of cnnfuse::se_gate: the two FC layers of a squeeze-and-excitation block."""
from typing import Optional

import torch

from .activation import apply_activation


def se_gate(pooled: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
            w2: torch.Tensor, b2: Optional[torch.Tensor], act1: str, act2: str) -> torch.Tensor:
    """act2(act1(pooled · w1ᵀ + b1) · w2ᵀ + b2) in fp32 (fp64 for fp64 input), in w1's dtype."""
    acc = torch.float64 if pooled.dtype == torch.float64 else torch.float32
    h = pooled.to(acc) @ w1.to(acc).t()
    if b1 is not None:
        h = h + b1.to(acc)
    h = apply_activation(h, act1)
    g = h @ w2.to(acc).t()
    if b2 is not None:
        g = g + b2.to(acc)
    return apply_activation(g, act2).to(w1.dtype)
