"""cnnfuse::bias_act — out = act(x · scale + bias + residual): the epilogue as a pass of its own.

It completes convolutions that a library computes (cuDNN for grouped convs, or where it wins
the autotuning), and with `scale` (an (N, C) squeeze-and-excitation gate) it is the whole tail
of an SE residual block, gate, add and activation, in one pass where eager takes three. It is
the first CUDA C++ op of `cnnfuse._C` (csrc/bias_act/).
"""
from typing import Optional

import torch

from .. import ref
from ..backend import ran
from .._ext import _C
from . import _check

torch.library.define(
    "cnnfuse::bias_act",
    "(Tensor x, Tensor? bias, Tensor? residual, int activation, Tensor(a!) out, "
    "Tensor? scale=None, float act_p0=0.0, float act_p1=0.0) -> ()")


@torch.library.register_fake("cnnfuse::bias_act")
def _(x, bias, residual, activation, out, scale=None, act_p0=0.0, act_p1=0.0):
    return None


def _reference_impl(x, bias, residual, activation, out, scale=None, act_p0=0.0, act_p1=0.0):
    ran("bias_act", "reference")
    out.copy_(ref.bias_act(x, bias, residual, ref.activation_name(activation, act_p0, act_p1),
                           scale))


# `_C` registers CPU and (when built with CUDA) CUDA kernels; the reference fills any gap.
for _key in ("CPU", "CUDA"):
    if _C is None or not torch._C._dispatch_has_kernel_for_dispatch_key("cnnfuse::bias_act", _key):
        torch.library.impl("cnnfuse::bias_act", _key)(_reference_impl)


def bias_act_into(x, bias, residual, activation: str, dest: torch.Tensor, scale=None) -> None:
    """Internal entry for already-checked tensors; dest may be a channel-slice view, scale a
    float32 (N, C) tensor."""
    code, p0, p1 = ref.activation_args(activation)
    torch.ops.cnnfuse.bias_act(x, bias, residual, code, dest, scale, p0, p1)


def bias_act(x: torch.Tensor, bias: Optional[torch.Tensor] = None,
             residual: Optional[torch.Tensor] = None, *, activation: str = "none",
             scale: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
             out_channel_offset: int = 0) -> torch.Tensor:
    """act(x · scale[:, :, None, None] + bias[None, :, None, None] + residual) for an
    (N, C, H, W) x, the product rounded to x's dtype; into `out`'s channels
    [out_channel_offset, +C) when given (then `out` is returned). scale: (N, C) in float32 or
    x's dtype. activation: any cnnfuse.ref.activation spelling ("relu", "leaky_relu(0.2)", ...).

    Raises TypeError / ValueError naming the argument at fault."""
    _check.tensor("x", x, 4)
    _check.floating("x", x)
    _check.activation("activation", activation)
    _check.epilogue(x, bias, residual, x.shape)
    if scale is not None:
        _check.tensor("scale", scale, 2)
        _check.same_dtype("scale", scale, x, also=(torch.float32,))
        _check.same_device("scale", scale, x)
        if tuple(scale.shape) != tuple(x.shape[:2]):
            raise ValueError(f"scale has shape {tuple(scale.shape)}; x needs "
                             f"{tuple(x.shape[:2])}")
        scale = scale.float()  # exact for a gate in x's dtype
    if out is None:
        dest = result = torch.empty_like(x, memory_format=torch.channels_last)
    else:
        dest, result = _check.out_slice(out, x, x.shape, out_channel_offset), out
    bias_act_into(x, bias, residual, activation, dest, scale)
    return result
