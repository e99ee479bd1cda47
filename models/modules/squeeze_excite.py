"""Squeeze-and-excitation, fused: the squeeze (the mean over height and width) is summed by the
conv that produces the block's input, in its epilogue (`conv2d(..., return_pooled=True)`);
both FC layers run in one kernel (`cnnfuse.ops.se_gate`); the gate is applied by the consuming
conv as it loads its input (`conv2d(..., input_scale=gate)`). Where no conv produces the input
the mean is a pass of its own, and where none consumes it so is the scale (`channel_scale`),
which then also takes the residual add and activation after it."""
import torch
from torch import fx, nn

from ... import ops
from ...ops import _eager
from ...ops._eager import signature
from ...backend import warn_once
from ...ref import apply_activation
from .fused_conv import FusedConv2d


class FusedSqueezeExcite(nn.Module):
    """(N, C, H, W) -> the (N, C) gate act2(W2 · act1(W1 · mean_hw(x) + b1) + b2); with
    `takes_pooled`, forward takes mean_hw(x) itself, (N, C) float32."""

    def __init__(self, channels: int, reduced: int, activation: str, gate_activation: str,
                 bias: bool = True):
        super().__init__()
        self.activation, self.gate_activation = activation, gate_activation
        self.takes_pooled = False
        self.w1 = nn.Parameter(torch.empty(reduced, channels), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(channels, reduced), requires_grad=False)
        self.b1 = nn.Parameter(torch.zeros(reduced), requires_grad=False) if bias else None
        self.b2 = nn.Parameter(torch.zeros(channels), requires_grad=False) if bias else None

    @classmethod
    def from_convs(cls, fc1: FusedConv2d, fc2: FusedConv2d) -> "FusedSqueezeExcite":
        se = cls(fc1.in_channels, fc1.out_channels, fc1.activation, fc2.activation)
        se.w1.data = fc1.weight.detach().reshape(fc1.out_channels, fc1.in_channels).contiguous()
        se.w2.data = fc2.weight.detach().reshape(fc2.out_channels, fc2.in_channels).contiguous()
        for mine, conv in ((se.b1, fc1), (se.b2, fc2)):
            if conv.bias is not None:
                mine.data = conv.bias.detach().clone()
            else:
                mine.data = conv.weight.new_zeros(conv.out_channels)
        return se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_pooled != (x.dim() == 2):
            raise ValueError(f"FusedSqueezeExcite(takes_pooled={self.takes_pooled}) got a "
                             f"{x.dim()}-d input; expected "
                             f"{'(N, C) means' if self.takes_pooled else '(N, C, H, W)'}")
        pooled = x if self.takes_pooled else x.mean((2, 3), dtype=torch.float32)
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if _eager.active(pooled):
            key = (signature(pooled), w1.dtype, w1.device, None if b1 is None else b1.dtype,
                   None if b2 is None else b2.dtype, _eager.environment(), self.activation,
                   self.gate_activation)
            plan = _eager.cached(self, key, lambda: _eager.plan_se_gate(
                pooled, w1, b1, w2, b2, self.activation, self.gate_activation))
            return plan(pooled, w1, b1, w2, b2)
        return ops.se_gate(pooled, w1, b1, w2, b2, activation=self.activation,
                           gate_activation=self.gate_activation)

    def extra_repr(self) -> str:
        return (f"{self.w2.shape[0]} -> {self.w1.shape[0]} -> {self.w2.shape[0]}, "
                f"activation={self.activation}, gate={self.gate_activation}"
                + (", takes_pooled" if self.takes_pooled else ""))


@fx.wrap
def channel_scale(x: torch.Tensor, gate: torch.Tensor, residual=None,
                  activation: str = "none") -> torch.Tensor:
    """act(x · gate[n, c] + residual): the SE scale where no conv can take it in its load
    stage, with the residual add and activation that follow it in an SE residual block, in one
    pass (`ops.bias_act`)."""
    if residual is not None and not (isinstance(residual, torch.Tensor)
                                     and residual.shape == x.shape
                                     and residual.dtype == x.dtype):
        warn_once("channel_scale: a broadcast or mixed-dtype residual; adding it outside the "
                  "kernel")
        return apply_activation(x * gate.to(x.dtype)[:, :, None, None] + residual, activation)
    # in x's layout, as `x * gate` was: a `.view` after it must still work
    return ops.bias_act(x, None, residual, activation=activation, scale=gate,
                        out=torch.empty_like(x))
