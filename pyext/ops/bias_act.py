"""cnnfuse::bias_act — out = act(x + bias + residual): the epilogue as a pass of its own.

It completes convolutions that a library computes (cuDNN for grouped convs, or where it wins
the autotuning), and it is the first CUDA C++ op of `cnnfuse._C` (csrc/bias_act/).
"""
from typing import Optional

import torch

from .. import ref
from ..backend import ran
from .._ext import _C
from . import _check

torch.library.define(
    "cnnfuse::bias_act",
    "(Tensor x, Tensor? bias, Tensor? residual, int activation, Tensor(a!) out) -> ()")


@torch.library.register_fake("cnnfuse::bias_act")
def _(x, bias, residual, activation, out):
    return None


def _reference_impl(x, bias, residual, activation, out):
    ran("bias_act", "reference")
    out.copy_(ref.bias_act(x, bias, residual, ref.ACTIVATIONS[activation]))


# `_C` registers CPU and (when built with CUDA) CUDA kernels; the reference fills any gap.
for _key in ("CPU", "CUDA"):
    if _C is None or not torch._C._dispatch_has_kernel_for_dispatch_key("cnnfuse::bias_act", _key):
        torch.library.impl("cnnfuse::bias_act", _key)(_reference_impl)


def bias_act_into(x, bias, residual, activation: str, dest: torch.Tensor) -> None:
    """Internal entry for already-checked tensors; dest may be a channel-slice view."""
    torch.ops.cnnfuse.bias_act(x, bias, residual, ref.activation_code(activation), dest)


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor] = None,
             residual: Optional[torch.Tensor] = None, *, activation: str = "none",
             out: Optional[torch.Tensor] = None, out_channel_offset: int = 0) -> torch.Tensor:
    """act(x + bias[None, :, None, None] + residual) for an (N, C, H, W) x; into `out`'s
    channels [out_channel_offset, +C) when given (then `out` is returned)."""
    _check.tensor("x", x, 4)
    _check.floating("x", x)
    ref.activation_code(activation)
    _check.epilogue(x, bias, residual, x.shape)
    if out is None:
        dest = result = torch.empty_like(x, memory_format=torch.channels_last)
    else:
        dest, result = _check.out_slice(out, x, x.shape, out_channel_offset), out
    bias_act_into(x, bias, residual, activation, dest)
    return result
