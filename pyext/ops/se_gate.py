"""cnnfuse::se_gate — the gate of a squeeze-and-excitation block from its pooled input:
g = gate_act(act(pooled · w1ᵀ + b1) · w2ᵀ + b2), (N, C) in the weights' dtype.

Both FC layers run in one small Triton kernel (kernels/se_gate.py); the consumer conv then
applies g as it loads its input (`conv2d(..., input_scale=g)`), so the block costs no pass
over the activation beyond the pooling read.
"""
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import ref
from .._ext import relaxed_capture
from ..backend import ran, requested_backend, triton_interpreting, warn_once
from . import _check, _eager


@torch.library.custom_op("cnnfuse::se_gate", mutates_args=())
def _se_gate_op(pooled: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                w2: torch.Tensor, b2: Optional[torch.Tensor], activation: str,
                gate_activation: str) -> torch.Tensor:
    return _run(pooled, w1, b1, w2, b2, activation, gate_activation)


def _run(pooled, w1, b1, w2, b2, activation: str, gate_activation: str) -> torch.Tensor:
    """The op's implementation for checked arguments: the Triton kernel or the reference."""
    backend = requested_backend()
    use_triton = backend in ("auto", "triton") if pooled.device.type == "cuda" else (
        backend == "triton" and triton_interpreting())
    if not use_triton:
        if backend == "triton":
            warn_once("se_gate: the Triton kernel runs on CPU tensors only under "
                      "TRITON_INTERPRET=1; using the reference")
        ran("se_gate", "reference")
        if pooled.device.type == "cpu" and all(
                t is None or t.dtype == torch.float32 for t in (pooled, w1, b1, w2, b2)):
            from ._eager import CpuSeGate  # as the eager plan computes it
            return CpuSeGate(activation, gate_activation).compute(pooled, w1, b1, w2, b2)
        return ref.se_gate(pooled, w1, b1, w2, b2, activation, gate_activation)
    from ..kernels.se_gate import se_gate as kernel
    ran("se_gate", "Triton" if pooled.device.type == "cuda" else "Triton (interpreter)")
    gate = torch.empty(pooled.shape, dtype=w1.dtype, device=pooled.device)
    with relaxed_capture():
        return kernel(pooled, w1, b1, w2, b2, ref.activation_args(activation),
                      ref.activation_args(gate_activation), gate)


@_se_gate_op.register_fake
def _(pooled, w1, b1, w2, b2, activation, gate_activation):
    return pooled.new_empty(pooled.shape, dtype=w1.dtype)


@register_flop_formula(torch.ops.cnnfuse.se_gate)
def _(pooled, w1, *rest, out_shape=None, **kwargs):
    return 2 * 2 * pooled[0] * w1[0] * w1[1]  # two FC layers, N·R·C multiply-adds each


def se_gate(pooled: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
            w2: torch.Tensor, b2: Optional[torch.Tensor], *, activation: str = "relu",
            gate_activation: str = "sigmoid") -> torch.Tensor:
    """pooled (N, C) (float32 or the weights' dtype), w1 (R, C), b1 (R,), w2 (C, R), b2 (C,)."""
    check_args(pooled, w1, b1, w2, b2, activation, gate_activation)
    if _eager.active(pooled):  # plain eager: the op's implementation, without the wrapper
        return _run(pooled, w1, b1, w2, b2, activation, gate_activation)
    return torch.ops.cnnfuse.se_gate(pooled, w1, b1, w2, b2, activation, gate_activation)


def check_args(pooled, w1, b1, w2, b2, activation: str, gate_activation: str) -> None:
    """The checks of `se_gate`; every error names the argument."""
    _check.tensor("pooled", pooled, 2)
    _check.tensor("w1", w1, 2)
    _check.tensor("w2", w2, 2)
    _check.floating("w1", w1)
    _check.same_dtype("w2", w2, w1, like_name="w1")
    if pooled.dtype not in (w1.dtype, torch.float32):
        raise TypeError(f"pooled has dtype {pooled.dtype}; expected float32 or w1's {w1.dtype}")
    n, c = pooled.shape
    r = w1.shape[0]
    if w1.shape[1] != c:
        raise ValueError(f"w1 has shape {tuple(w1.shape)}; pooled has {c} channels")
    if tuple(w2.shape) != (c, r):
        raise ValueError(f"w2 has shape {tuple(w2.shape)}; expected ({c}, {r})")
    for name, b, size in (("b1", b1, r), ("b2", b2, c)):
        if b is not None:
            _check.tensor(name, b, 1)
            _check.same_dtype(name, b, w1, also=(torch.float32,), like_name="w1")
            if b.shape[0] != size:
                raise ValueError(f"{name} has {b.shape[0]} elements; expected {size}")
    for name, t in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
        if t is not None:
            _check.same_device(name, t, pooled, "pooled")
    _check.activation("activation", activation)
    _check.activation("gate_activation", gate_activation)
