"""FusedBatchNormAct: an eval-mode BatchNorm that no conv could take, with the activation after
it, as one pass over memory: a depthwise 1x1 conv whose weight is the BatchNorm's scale and
whose bias is its shift (accumulated in fp32 and rounded once, as eager BatchNorm rounds)."""
import torch
from torch import nn

from ... import ops
from ...ref import activation_code
from .fused_conv import bn_affine


class FusedBatchNormAct(nn.Module):
    """act(x · scale + shift) per channel for an (N, C, H, W) x in the parameters' dtype;
    returns a tensor of x's shape and dtype (channels_last)."""

    def __init__(self, channels: int, activation: str = "none"):
        super().__init__()
        activation_code(activation)
        self.channels, self.activation = channels, activation
        self.weight = nn.Parameter(torch.ones(channels, 1, 1, 1), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_bn(cls, bn: nn.BatchNorm2d, activation: str = "none") -> "FusedBatchNormAct":
        scale, shift = bn_affine(bn)
        dtype = bn.weight.dtype if bn.weight is not None else bn.running_mean.dtype
        m = cls(bn.num_features, activation).to(device=bn.running_mean.device)
        m.weight.data = scale.view(-1, 1, 1, 1).to(dtype)
        m.bias.data = shift.to(dtype)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return ops.conv2d(x, self.weight, self.bias, 1, 0, 1, self.channels,
                          activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.channels}, activation={self.activation}"
