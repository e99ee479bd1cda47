"""A channel gate computed from the global mean of a feature map, fused around its own
function: x · g(mean_hw(x)) where g is any small computation on the (N, C) means (ECA-Net's
1-D convolution across channels, Wang et al., "ECA-Net: Efficient Channel Attention for Deep
Convolutional Neural Networks", CVPR 2020; the effective SE of VoVNet-v2 / CenterMask, Lee &
Park 2020; CBAM's channel attention, Woo et al. 2018, whose max-pooled branch is computed here).
The mean is summed by the conv that produces x (`return_pooled`) and the product is taken by
the conv that consumes it (`input_scale`), as for squeeze-and-excitation; g itself runs as the
model wrote it, on N·C values, never on the feature map."""
from typing import Optional

import torch
from torch import fx, nn

from ...backend import warn_once


class ChannelGate(nn.Module):
    """The (N, C) gate g(mean_hw(x)) of a channel-attention block.

    `body` is an fx.GraphModule forward(x, mean) -> (N, C, 1, 1): the model's own gate
    computation, reading x only for its shape and for global max pools (which no conv
    epilogue sums; they stay eager), and the mean as mean_hw(x) in x's dtype, (N, C).

    forward(x) takes the (N, C, H, W) feature map and computes the mean itself; with
    `takes_pooled`, forward(x, pooled) takes the mean the producing conv summed, (N, C)
    float32 (rounded to x's dtype, as eager's x.mean returns it). Returns the gate as (N, C)
    in x's dtype. Raises ValueError if `pooled` is given where it is not expected (or missing
    where it is), or if the body's result is not (N, C, 1, 1)."""

    def __init__(self, body: fx.GraphModule, channels: int):
        super().__init__()
        self.body, self.channels = body, channels
        self.takes_pooled = False

    def forward(self, x: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.takes_pooled != (pooled is not None):
            raise ValueError(f"ChannelGate(takes_pooled={self.takes_pooled}) got pooled="
                             f"{'a tensor' if pooled is not None else 'None'}")
        n, c = x.shape[:2]
        if pooled is None:
            mean = x.mean((2, 3))
        else:
            if tuple(pooled.shape) != (n, c):
                raise ValueError(f"ChannelGate: pooled has shape {tuple(pooled.shape)}; x "
                                 f"needs ({n}, {c})")
            mean = pooled.to(x.dtype)
        gate = self.body(x, mean)
        if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (n, c, 1, 1):
            shape = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise ValueError(f"ChannelGate: the gate has shape {shape}; the product with x "
                             f"{tuple(x.shape)} was fused as a per-channel scale ({n}, {c}, 1, 1)")
        if gate.dtype != x.dtype:
            # eager would have promoted the product to the gate's dtype
            warn_once(f"ChannelGate: a {gate.dtype} gate for a {x.dtype} feature map; the "
                      f"product is taken in {x.dtype}")
            gate = gate.to(x.dtype)
        return gate.reshape(n, c)

    def extra_repr(self) -> str:
        return f"{self.channels}" + (", takes_pooled" if self.takes_pooled else "")
