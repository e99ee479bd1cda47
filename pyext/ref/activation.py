"""Activations every fused op understands: names, integer codes, fp32 references.

The integer code is what crosses into kernels (Triton constexpr, C++ switch), so the order
of ACTIVATIONS is part of the ABI: append, never reorder.
"""
import math

import torch
import torch.nn.functional as F

ACTIVATIONS = (
    "none", "relu", "relu6", "silu", "hardswish", "hardsigmoid", "sigmoid", "gelu", "gelu_tanh",
)


def activation_code(name: str) -> int:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; choose one of {ACTIVATIONS}")
    return ACTIVATIONS.index(name)


def apply_activation(y: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return y
    if name == "relu":
        return torch.relu(y)
    if name == "relu6":
        return y.clamp(0.0, 6.0)
    if name == "silu":
        return y * torch.sigmoid(y)
    if name == "hardswish":
        return y * (y + 3.0).clamp(0.0, 6.0) / 6.0
    if name == "hardsigmoid":
        return (y + 3.0).clamp(0.0, 6.0) / 6.0
    if name == "sigmoid":
        return torch.sigmoid(y)
    if name == "gelu":
        return 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    raise ValueError(f"activation={name!r} is not supported; choose one of {ACTIVATIONS}")


# In-place forms on a fresh fp32 result (eager's own functions, so a fused model's CPU plans
# round as the original does); gelu has no in-place form.
_INPLACE = {
    "none": None,
    "relu": torch.relu_,
    "relu6": lambda y: y.clamp_(0.0, 6.0),
    "silu": lambda y: F.silu(y, inplace=True),
    "hardswish": lambda y: F.hardswish(y, inplace=True),
    "hardsigmoid": lambda y: F.hardsigmoid(y, inplace=True),
    "sigmoid": torch.sigmoid_,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def activate_(y: torch.Tensor, name: str) -> torch.Tensor:
    """apply_activation(y, name), in place where eager has an in-place form."""
    fn = _INPLACE[name]
    return y if fn is None else fn(y)
