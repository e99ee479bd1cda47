"""Squeeze-and-excitation gate: g = act2(act1(p · W1ᵀ + b1) · W2ᵀ + b2) for pooled (N, C) rows.

One program takes BLOCK_N images through both FC layers; the hidden (BLOCK_N, R) activations
stay in registers, so the two layers, their biases and activations are one launch. The layers
are a few MFLOP, so fp32 dots (exact, and what the interpreter runs too) cost nothing that
matters.
"""
import torch
import triton
import triton.language as tl

from .activation import apply_activation
from .aot import compile_for
from .launch import launch


@triton.jit
def _se_gate_kernel(
    p_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, g_ptr,
    N, C, R,
    spn, spc, sw1r, sw1c, sw2c, sw2r, sgn, sgc,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_r = offs_r < R

    h = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + offs_c
        c_ok = cs < C
        p = tl.load(p_ptr + offs_n[:, None] * spn + cs[None, :] * spc,
                    mask=mask_n[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        w1 = tl.load(w1_ptr + offs_r[None, :] * sw1r + cs[:, None] * sw1c,
                     mask=c_ok[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        h = tl.dot(p, w1, h, input_precision="ieee")
    if HAS_B1:
        h += tl.load(b1_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    h = apply_activation(h, ACT1)

    for c0 in range(0, C, BLOCK_C):
        cs = c0 + offs_c
        c_ok = cs < C
        w2 = tl.load(w2_ptr + cs[None, :] * sw2c + offs_r[:, None] * sw2r,
                     mask=mask_r[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        g = tl.dot(h, w2, input_precision="ieee")
        if HAS_B2:
            g += tl.load(b2_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        g = apply_activation(g, ACT2)
        tl.store(g_ptr + offs_n[:, None] * sgn + cs[None, :] * sgc, g.to(g_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & c_ok[None, :])


def _tiles(reduced: int) -> dict:
    """16 images a program; the hidden width padded to a power of two, and channel blocks
    small enough that a (BLOCK_C, BLOCK_R) weight tile stays within 8192 fp32 registers."""
    block_r = max(16, triton.next_power_of_2(reduced))
    return dict(BLOCK_N=16, BLOCK_C=max(16, min(128, 8192 // block_r)), BLOCK_R=block_r)


def se_gate(pooled: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2, act1: int,
            act2: int, gate: torch.Tensor) -> torch.Tensor:
    """Launch on validated tensors: pooled (N, C), w1 (R, C), w2 (C, R), gate (N, C)."""
    n, c = pooled.shape
    r = w1.shape[0]
    tiles = _tiles(r)
    # Triton's CPU interpreter truncates fp32 -> bf16; torch rounds instead.
    dest, out = gate, gate
    if gate.device.type == "cpu" and gate.dtype == torch.bfloat16:
        out = torch.empty(gate.shape, dtype=torch.float32)
    grid = (triton.cdiv(n, tiles["BLOCK_N"]),)
    launch(_se_gate_kernel, grid,
           (pooled, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out,
            n, c, r, *pooled.stride(), *w1.stride(), *w2.stride(), *out.stride()),
           dict(HAS_B1=b1 is not None, HAS_B2=b2 is not None, ACT1=act1, ACT2=act2,
                **tiles, num_warps=4, num_stages=1))
    if out is not dest:
        dest.copy_(out)
    return dest


def compile_ahead(dtype: torch.dtype, reduced: int = 48, capability: int = 90):
    """The kernel compiled for `capability` without a GPU (see kernels/aot.py)."""
    constexprs = dict(HAS_B1=True, HAS_B2=True, ACT1=3, ACT2=6, **_tiles(reduced))
    pointers = dict(p_ptr=torch.float32, w1_ptr=dtype, b1_ptr=dtype, w2_ptr=dtype, b2_ptr=dtype,
                    g_ptr=dtype)
    return compile_for(_se_gate_kernel, constexprs, pointers, num_warps=4, num_stages=1,
                       capability=capability)
