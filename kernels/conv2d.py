"""Implicit-GEMM convolution on NHWC with a fused bias / residual / activation epilogue.

GEMM view: rows are output pixels (M = N·OH·OW), columns output channels (K), and the
reduction runs over (r, s, c). One loop covers all R·S·⌈C/BLOCK_K⌉ steps, so Triton
software-pipelines the whole reduction (copies of the next steps in flight across kernel-tap
boundaries, never drained per (r, s)). The tap counters r, s and the channel offset c0 are
advanced with compares and selects: no div/mod per step. Every tensor is addressed through its
strides, so the output may be a channel slice of a wider buffer (concat-free outputs) and the
weight is read in its stored layout (channels_last keeps c contiguous). Strides and channel
counts are passed divided by the widest vector of up to 16 bytes that divides them all (XVEC,
YVEC) and multiplied back in the kernel, so Triton knows the alignment and loads 16 bytes at a
time even where they are not multiples of 16 elements (24, 40, 72 channels), and 8 bytes for
ResNeXt's 4-channel groups.

Grouped convolution (GROUPED): a tile of output channels reads only the input channels of the
groups it spans, and the weight tile is masked to its block diagonal. Narrow groups (ResNeXt's
4 to 32 channels) are thus packed several to a tile: every loaded byte is useful and the
tensor cores still run, at the price of multiplying zeros, which a memory-bound layer affords.

Few input channels (STEM): x and the weight are padded with zeros to STEM_CHANNELS channels,
and each kernel row's (s, c) taps, adjacent in memory, form one contiguous reduction range:
the 7x7 RGB stem runs 7·⌈56/BLOCK_K⌉ steps of 16-byte loads instead of 49 steps of 2-byte ones.

Window in the load stage (DW, POOL_IN): the input tile is computed from a window of x, as a
depthwise conv's weighted sum (DW) or a pool's max or average (POOL_IN), so that op and the
1x1 conv after it (a separable conv, Inception's pool projection) are one kernel. The window
is unrolled, so the reduction loop stays a single pipelined loop.

Split-K (SPLIT_K > 1): layers with fewer than about two waves of tiles split the reduction
steps over SPLIT_K programs (uneven splits allowed); each writes its fp32 partial tile to a
workspace and a second kernel sums them in a fixed order (deterministic, no float atomics)
before the one epilogue.

Pooling (POOL): the epilogue also adds the tile's stored values, divided by OH·OW, to a
float32 (N, K) buffer: the squeeze of a squeeze-and-excitation block, without a pass over y.
A row tile spans one image or a few (small maps), each summed apart and added atomically.

TMA (W_TMA, X_TMA): where the config asks for it and the geometry allows, operands are boxes
of host-side tensor descriptors, loaded by the tensor memory accelerator into shared memory
and zero-filled out of bounds, so no mask or per-element address is computed. The weight
(weight_tma_fits: dense convs, the stem's padded weight, grouped tiles inside one group,
16-byte aligned strides) as a (tap, K, channel) view in (1, BLOCK_N, BLOCK_K) boxes: zero past
each tap's channels, so no box straddles two taps. The activation (activation_tma_fits) only
for a dense 1x1 stride-1 unpadded conv, whose GEMM rows are x's pixels: one (BLOCK_M,
BLOCK_K) box per step, zero past M and C (a 128x64 tile: 156 -> 96 registers, 17% fewer
instructions). Elsewhere x stays on the pointer path: with stride, padding or several taps a
tile of BLOCK_M output pixels spanning several output rows (and images) is not one box of x.
Triton's pipeliner on sm_90 keeps descriptor loads in the one pipelined loop beside cp.async
copies. A Triton without descriptors, a GPU older than sm_90 or CNNFUSE_TMA=0 take the
pointer path. Triton's automatic warp specialisation on sm_90 (tl.range(...,
warp_specialize=True), in 3.8; 3.6 runs the same Hopper pass) fails to compile this loop at
4 warps and leaves it unchanged at 8, so it is not used.
"""
import functools
import logging

import torch
import triton
import triton.language as tl

from .activation import apply_activation
from .aot import compile_specialised
from .launch import launch
from .conv2d_args import (POOL_MODES, arguments, descriptors_supported,  # noqa: F401
                          stand_ins, tma_allowed)
from .conv2d_configs import (CONFIGS, GROUPED_CONFIGS, INTERPRETER_CONFIG,  # noqa: F401
                             INTERPRETER_GROUPED_CONFIG, SHARED_BYTES, STEM_CHANNELS,
                             Conv2dConfig, Conv2dProblem, Window, candidate_configs,
                             default_config)



@triton.jit
def _round_to_bf16(v):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN


@triton.jit
def _epilogue(acc, row0, offs_m, offs_n, M, K, OH, OW, bias_ptr, res_ptr, y_ptr, pool_ptr,
              pool_scale, srn, src, srh, srw, syn, syc, syh, syw,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
              POOL: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """bias, residual, activation, the (slice) store and the pooled sums of one tile."""
    mask_m = offs_m < M
    mask_n = offs_n < K
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = offs_m // (OW * OH)
    if INT64:
        n = n.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r_ptrs = res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
        acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    acc = apply_activation(acc, ACT)
    y_ptrs = y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + offs_n[None, :] * syc
    # DOT_FP32 (the interpreter's bf16): y is a float32 buffer; round to bf16 here, as the GPU
    # would, so the pool sums the values torch's later copy to bf16 keeps exactly
    y = _round_to_bf16(acc) if DOT_FP32 else acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, y, mask=out_mask)
    if POOL:  # the mean of what was stored, per image and channel
        y = tl.where(out_mask, y.to(tl.float32), 0.0)
        hw = OH * OW
        for img in range(row0 // hw, (tl.minimum(row0 + BLOCK_M, M) - 1) // hw + 1):
            part = tl.sum(tl.where((n == img)[:, None], y, 0.0), axis=0) * pool_scale
            tl.atomic_add(pool_ptr + img * K + offs_n, part, mask=mask_n, sem="relaxed")


@triton.jit
def _conv2d_kernel(
    bias_ptr, res_ptr, y_ptr, scale_ptr, affine_ptr, dw_ptr, dwb_ptr, pool_ptr, ws_ptr,
    N, C, H, W, K, OH, OW, XH, XW,
    sxn, sxc, sxh, sxw, swk, swc, swr, sws, srn, src, srh, srw, syn, syc, syh, syw,
    ssn, ssc, sar, sac, sdc, sdr, sds,
    stride_h, stride_w, pad_t, pad_l, dil_h, dil_w,
    dw_sh, dw_sw, dw_pt, dw_pl, dw_dh, dw_dw,
    CG, KG, pool_scale,
    x_ptr, w_ptr,  # last: as descriptors they expand to several parameters (see conv2d_args)
    R: tl.constexpr, S: tl.constexpr, GROUPED: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_AFFINE: tl.constexpr, IN_ACT: tl.constexpr,
    DW: tl.constexpr, POOL_IN: tl.constexpr, RD: tl.constexpr, SD: tl.constexpr,
    DW_BIAS: tl.constexpr, DW_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    STEM: tl.constexpr, XVEC: tl.constexpr, YVEC: tl.constexpr, SPLIT_K: tl.constexpr,
    W_TMA: tl.constexpr, X_TMA: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Multiples of a 16-byte vector arrive divided by it (see the module docstring).
    C = C * XVEC
    CG = CG * XVEC
    sxn = sxn * XVEC
    sxh = sxh * XVEC
    sxw = sxw * XVEC
    swk = swk * XVEC
    swr = swr * XVEC
    sws = sws * XVEC
    K = K * YVEC
    srn = srn * YVEC
    srh = srh * YVEC
    srw = srw * YVEC
    syn = syn * YVEC
    syh = syh * YVEC
    syw = syw * YVEC

    # Grouped launch order: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    M = N * OH * OW
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(K, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < K

    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = offs_m // (OW * OH)
    cols = offs_n
    if INT64:
        n = n.to(tl.int64)
        cols = cols.to(tl.int64)
    ih0 = oh * stride_h - pad_t
    iw0 = ow * stride_w - pad_l

    if GROUPED:
        # input channels [c_lo, c_hi) of the groups that output channels n0 .. n1 belong to
        n1 = tl.minimum(pid_n * BLOCK_N + BLOCK_N, K) - 1
        c_lo = (pid_n * BLOCK_N // KG) * CG
        c_hi = (n1 // KG + 1) * CG
        group_lo = (offs_n // KG) * CG  # the first input channel of each column's group
        if not W_TMA:
            w_cols = w_ptr + cols * swk - group_lo * swc
    else:
        c_lo = 0
        c_hi = C
        if not W_TMA:
            w_cols = w_ptr + cols * swk

    # The reduction steps of this program: all of them, or its share of a split.
    if STEM:
        SC: tl.constexpr = S * 8  # the (s, c) range of one kernel row, channels padded to 8
        NJ: tl.constexpr = (SC + BLOCK_K - 1) // BLOCK_K
        total = R * NJ
        nc = NJ
    else:
        nc = tl.cdiv(c_hi - c_lo, BLOCK_K)
        total = R * S * nc
    if SPLIT_K > 1:
        pid_k = tl.program_id(1)
        step_lo = pid_k * total // SPLIT_K
        step_hi = (pid_k + 1) * total // SPLIT_K
    else:
        step_lo = 0
        step_hi = total
    # counters at the first step: the only div/mod of the loop, once per program
    c0 = c_lo + (step_lo % nc) * BLOCK_K + tl.zeros((), tl.int32)
    rs = step_lo // nc
    s_i = rs % S + tl.zeros((), tl.int32)
    r_i = rs // S + tl.zeros((), tl.int32)
    if STEM:
        r_i = rs + tl.zeros((), tl.int32)
        # taps s with iw0 + s inside the image: j = s * 8 + c in [j_lo, j_hi)
        j_lo = tl.maximum(-iw0, 0) * 8
        j_hi = tl.minimum(W - iw0, S) * 8
        x_rows = x_ptr + ((n * H + ih0) * W + iw0) * 8
        if not W_TMA:
            w_cols = w_ptr + cols * (R * SC)
    elif DW or POOL_IN != 0:
        x_rows = x_ptr + n * sxn + (oh * dw_sh - dw_pt) * sxh + (ow * dw_sw - dw_pl) * sxw
        ihd0 = oh * dw_sh - dw_pt
        iwd0 = ow * dw_sw - dw_pl
    elif not X_TMA:
        x_rows = x_ptr + n * sxn + ih0 * sxh + iw0 * sxw
    ok0 = mask_m & (ih0 >= 0) & (ih0 < H) & (iw0 >= 0) & (iw0 < W)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(step_lo, step_hi):
        cs = c0 + offs_k
        if STEM:
            ih = ih0 + r_i * dil_h
            ok = mask_m & (ih >= 0) & (ih < H)
            a_ok = (ok[:, None] & (cs[None, :] >= j_lo[:, None])
                    & (cs[None, :] < j_hi[:, None]))
            a = tl.load(x_rows[:, None] + (r_i * dil_h * W * 8) + cs[None, :], mask=a_ok,
                        other=0.0)
            if W_TMA:  # kernel row r_i's (s, c) range; zero past S * 8 and past K
                b = w_ptr.load([r_i, pid_n * BLOCK_N, c0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                b = tl.load(w_cols[None, :] + r_i * SC + cs[:, None],
                            mask=(cs < SC)[:, None] & mask_n[None, :], other=0.0)
        else:
            if R * S == 1:
                ok = ok0
                tap_x = 0
                tap_w = 0
            else:
                dh = r_i * dil_h
                dw = s_i * dil_w
                ih = ih0 + dh
                iw = iw0 + dw
                ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                tap_x = dh * sxh + dw * sxw
                if not W_TMA:
                    tap_w = r_i * swr + s_i * sws
            c_ok = cs < c_hi
            a_ok = ok[:, None] & c_ok[None, :]
            if DW or POOL_IN != 0:  # x is the input of a depthwise conv, or of a pool
                # (max 1, average with the padding counted 2 or not 3, counted with a
                # ceil-mode overhang 4), whose output this 1x1 conv reads: compute that
                # output's tile here, so it never goes to memory
                empty = float("-inf") if POOL_IN == 1 else 0.0
                d = tl.full((BLOCK_M, BLOCK_K), empty, tl.float32)
                taps = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for rd in tl.static_range(RD):
                    ihd = ihd0 + rd * dw_dh
                    for sd in tl.static_range(SD):
                        iwd = iwd0 + sd * dw_dw
                        okd = mask_m & (ihd >= 0) & (ihd < XH) & (iwd >= 0) & (iwd < XW)
                        xd = tl.load(x_rows[:, None] + (rd * dw_dh * sxh + sd * dw_dw * sxw)
                                     + cs[None, :] * sxc, mask=okd[:, None] & c_ok[None, :],
                                     other=empty).to(tl.float32)
                        if DW:
                            wd = tl.load(dw_ptr + cs * sdc + rd * sdr + sd * sds, mask=c_ok,
                                         other=0.0)
                            d += xd * wd.to(tl.float32)[None, :]
                        elif POOL_IN == 1:  # NaN wins, as in PyTorch's max pool
                            d = tl.maximum(d, xd, propagate_nan=tl.PropagateNan.ALL)
                        else:
                            d += xd
                        if POOL_IN == 3:
                            taps += okd.to(tl.float32)
                if DW:
                    if DW_BIAS:
                        d += tl.load(dwb_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                    d = apply_activation(d, DW_ACT)
                elif POOL_IN == 1:  # rows and channels past the edge: 0, not -inf, in the
                    # dot (every window has a real tap: padding <= half of it, and a ceil-mode
                    # window starts inside the input)
                    d = tl.where(mask_m[:, None] & c_ok[None, :], d, 0.0)
                elif POOL_IN == 2:
                    d = d / (RD * SD)
                elif POOL_IN == 4:  # ceil mode: PyTorch's divisor, the window clipped to
                    # [-pad, H + pad), the overhang past it (right and bottom padding beyond
                    # left and top) not counted
                    div = ((tl.minimum(ihd0 + RD, XH + dw_pt) - ihd0)
                           * (tl.minimum(iwd0 + SD, XW + dw_pl) - iwd0))
                    d = d / div.to(tl.float32)[:, None]
                else:
                    d = d / tl.maximum(taps, 1.0)[:, None]
                a = d if DOT_FP32 else d.to(x_ptr.dtype.element_ty)  # as eager rounds it
            elif X_TMA:  # a 1x1 stride-1 conv: rows are pixels, one box of x per step
                a = x_ptr.load([pid_m * BLOCK_M, c0])
            else:
                a = tl.load(x_rows[:, None] + tap_x + cs[None, :] * sxc, mask=a_ok, other=0.0)
            if HAS_AFFINE:  # pre-activation BatchNorm + activation, as the tile loads
                sc = tl.load(affine_ptr + cs * sac, mask=c_ok, other=0.0).to(tl.float32)
                sh = tl.load(affine_ptr + sar + cs * sac, mask=c_ok, other=0.0).to(tl.float32)
                v = apply_activation(a.to(tl.float32) * sc[None, :] + sh[None, :], IN_ACT)
                v = tl.where(a_ok, v, 0.0)  # padding is zero after the prologue too
                a = v if DOT_FP32 else v.to(x_ptr.dtype.element_ty)
            if HAS_SCALE:  # squeeze-excitation gate, applied as the input tile loads
                g = tl.load(scale_ptr + n[:, None] * ssn + cs[None, :] * ssc,
                            mask=mask_m[:, None] & c_ok[None, :], other=0.0)
                a = a.to(tl.float32) * g.to(tl.float32)
                if not DOT_FP32:  # rounded as PyTorch's own multiply would
                    a = a.to(x_ptr.dtype.element_ty)
            if W_TMA:  # tap (r, s), channels c0 - c_lo.. of the tile's one group (grouped
                # tiles take TMA only inside one group); zero past the group and past K
                b = w_ptr.load([r_i * S + s_i, pid_n * BLOCK_N, c0 - c_lo]).reshape(
                    BLOCK_N, BLOCK_K).T
            else:
                w_ok = c_ok[:, None] & mask_n[None, :]
                if GROUPED:  # block diagonal: channel c feeds output n only within one group
                    # (as a range test, so the mask is constant over vectors of XVEC channels)
                    w_ok = (w_ok & (cs[:, None] >= group_lo[None, :])
                            & (cs[:, None] < group_lo[None, :] + CG))
                b = tl.load(w_cols[None, :] + tap_w + cs[:, None] * swc, mask=w_ok, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

        # next step: channel block, then tap s, then kernel row r
        c0 += BLOCK_K
        if STEM:
            wrap = c0 >= SC
            c0 = tl.where(wrap, 0, c0)
            r_i = tl.where(wrap, r_i + 1, r_i)
        elif R * S > 1:
            wrap = c0 >= c_hi
            c0 = tl.where(wrap, c_lo, c0)
            s_i = tl.where(wrap, s_i + 1, s_i)
            wrap_s = s_i >= S
            s_i = tl.where(wrap_s, 0, s_i)
            r_i = tl.where(wrap_s, r_i + 1, r_i)

    if SPLIT_K > 1:  # the partial tile, summed by _splitk_reduce_kernel
        rows = offs_m
        if INT64:
            rows = rows.to(tl.int64)
        part = ws_ptr + (pid_k * M + rows)[:, None] * K + offs_n[None, :]
        tl.store(part, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        _epilogue(acc, pid_m * BLOCK_M, offs_m, offs_n, M, K, OH, OW, bias_ptr, res_ptr, y_ptr,
                  pool_ptr, pool_scale, srn, src, srh, srw, syn, syc, syh, syw,
                  HAS_BIAS, HAS_RES, ACT, POOL, DOT_FP32, INT64, BLOCK_M)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, bias_ptr, res_ptr, y_ptr, pool_ptr, M, K, OH, OW,
    srn, src, srh, srw, syn, syc, syh, syw, pool_scale,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    POOL: tl.constexpr, DOT_FP32: tl.constexpr, INT64: tl.constexpr, YVEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = epilogue(sum of the SPLIT_K partial tiles), added in split order."""
    K = K * YVEC
    srn = srn * YVEC
    srh = srh * YVEC
    srw = srw * YVEC
    syn = syn * YVEC
    syh = syh * YVEC
    syw = syw * YVEC
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m
    if INT64:
        rows = rows.to(tl.int64)
    mask = (offs_m < M)[:, None] & (offs_n < K)[None, :]
    idx = rows[:, None] * K + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + idx, mask=mask, other=0.0)
        idx += M * K
    _epilogue(acc, pid_m * BLOCK_M, offs_m, offs_n, M, K, OH, OW, bias_ptr, res_ptr, y_ptr,
              pool_ptr, pool_scale, srn, src, srh, srw, syn, syc, syh, syw,
              HAS_BIAS, HAS_RES, ACT, POOL, DOT_FP32, INT64, BLOCK_M)


def compile_for_shape(problem: Conv2dProblem, config: Conv2dConfig, dtype: torch.dtype,
                      capability: int = 90, reduction: bool = False):
    """The conv kernel compiled for `capability` (no GPU needed) exactly as a launch of
    `problem` in `dtype` specialises it: the same launch arguments, specialised by Triton's
    own rules (ints divisible by 16 marked so, ints equal to 1 made constants, pointers
    16-byte aligned unless the problem says otherwise). Returns Triton's CompiledKernel
    (.asm["ttgir"], ["ptx"], ["cubin"]); with reduction=True that of the split-K sum instead
    (config.split_k > 1). Raises RuntimeError under TRITON_INTERPRET."""
    if problem.window is not None:  # as _run launches it
        config = _fitted(config, problem.window.kernel[0] * problem.window.kernel[1],
                         torch.empty((), dtype=dtype).element_size())
    args, constexprs, _, reduce = arguments(problem, config, dtype,
                                            stand_ins(problem, dtype, config.split_k),
                                            tma=descriptors_supported() and capability >= 90)
    if reduction:
        if reduce is None:
            raise ValueError("reduction=True needs a config with split_k > 1")
        return compile_specialised(_splitk_reduce_kernel, reduce[0], reduce[1], capability)
    return compile_specialised(_conv2d_kernel, args, constexprs, capability)


# ---------------------------------------------------------------------------------------------
# Runtime launchers (tensors already validated by cnnfuse.ops).

def _padded_weight(w: torch.Tensor) -> torch.Tensor:
    """w (K, C < 8, R, S) zero-padded to STEM_CHANNELS channels, channels_last. Made per call:
    a cache keyed on the tensor would miss `weight.data = ...` and in-place writes through
    `.data`, which bump no version counter, and the stem's weight is a few thousand values."""
    k, c, r, s = w.shape
    buf = w.new_zeros((k, r, s, STEM_CHANNELS))
    buf[..., :c] = w.permute(0, 2, 3, 1)
    return buf.permute(0, 3, 1, 2)


def pad_channels(x: torch.Tensor) -> torch.Tensor:
    """x (N, C < 8, H, W) as a dense channels_last (N, 8, H, W) tensor, zeros past C: the
    layout the stem reads 16 bytes at a time."""
    n, c, h, w = x.shape
    buf = x.new_empty((n, h, w, STEM_CHANNELS))
    buf[..., :c] = x.permute(0, 2, 3, 1)
    buf[..., c:] = 0
    return buf.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _fitted(cfg: Conv2dConfig, taps: int, element_size: int) -> Conv2dConfig:
    """cfg with fewer stages if its operand buffers would not fit in shared memory (a config
    chosen without knowing the window), said once."""
    stages = cfg.num_stages
    while stages > 1 and _stages(cfg, stages).shared_bytes(element_size, taps) > SHARED_BYTES:
        stages -= 1
    if stages != cfg.num_stages:
        logging.getLogger("cnnfuse").warning(
            "cnnfuse: conv2d config %s does not fit in shared memory with a %d-tap window; "
            "running it with %d stages", cfg.name, taps, stages)
    return _stages(cfg, stages)


def _stages(cfg, stages):
    from dataclasses import replace
    return replace(cfg, num_stages=stages)


def prepare(p: Conv2dProblem, cfg: Conv2dConfig, tensors: dict, m=None) -> tuple:
    """(p, cfg, t, dot_fp32): what every launch of `p` at `cfg` on `tensors` (as `_run` takes
    them) needs before the kernel: fewer stages where a window needs it, the interpreter's
    float32 stand-in for a bf16 y, the stem's padded x and weight, the split-K workspace for
    m output rows (default p.m; a symbolic size where the batch is)."""
    x, y = tensors["x"], tensors["y"]
    if p.window is not None:
        cfg = _fitted(cfg, p.window.kernel[0] * p.window.kernel[1], x.element_size())
    # Triton's CPU interpreter multiplies bf16 tiles wrongly and truncates fp32 -> bf16. bf16
    # products are exact in fp32, so an fp32 dot and an fp32 store rounded by torch give
    # what the GPU computes.
    dot_fp32 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    t = dict(tensors)
    if dot_fp32:
        t["y"] = torch.empty(y.shape, dtype=torch.float32).contiguous(
            memory_format=torch.channels_last)
        p = _replace(p, y_strides=tuple(t["y"].stride()))
    if p.stem:
        t["x"], t["w"] = pad_channels(x), _padded_weight(t["w"])
    if cfg.split_k > 1:
        rows = p.m if m is None else m
        t["ws"] = torch.empty(cfg.split_k * rows * p.k, dtype=torch.float32, device=x.device)
    return p, cfg, t, dot_fp32


def _run(p: Conv2dProblem, cfg: Conv2dConfig, tensors: dict) -> torch.Tensor:
    """Launch the problem into tensors["y"] (and the pooled means into tensors["pool"])."""
    x, y, pool = tensors["x"], tensors["y"], tensors.get("pool")
    p, cfg, t, dot_fp32 = prepare(p, cfg, tensors)
    if pool is not None:
        pool.zero_()  # the tiles add into it
    args, constexprs, grid, reduce = arguments(p, cfg, x.dtype, t, dot_fp32,
                                               tma_allowed(x.device))
    launch(_conv2d_kernel, grid, args, constexprs)
    if reduce is not None:
        launch(_splitk_reduce_kernel, reduce[2], reduce[0], reduce[1])
    return y.copy_(t["y"]) if dot_fp32 else y


def _replace(p, **changes):
    from dataclasses import replace
    return replace(p, **changes)


def _strides(t):
    return None if t is None else tuple(t.stride())


def _aligned(t) -> bool:
    return t.data_ptr() % 16 == 0


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, residual, y: torch.Tensor,
           stride, padding, dilation, act_code, config: Conv2dConfig,
           allow_tf32: bool = True, input_scale=None, input_affine=None,
           input_act_code=0, pool=None) -> torch.Tensor:
    """Launch on already-validated tensors; padding = (left, right, top, bottom); y is the
    (N, K, OH, OW) destination view, possibly a channel slice of a wider buffer. As x loads:
    input_affine (2, C) fp32 scale and shift rows with activation input_act_code, then
    input_scale (N, C), a per-image channel scale. pool: (N, K) float32 for mean_hw(y).
    Activation codes: the (code, p0, p1) of cnnfuse.ref.activation_args."""
    groups = x.shape[1] // weight.shape[1]
    if input_scale is not None:
        input_scale = input_scale.contiguous()
    if input_affine is not None:
        input_affine = input_affine.contiguous()
    p = Conv2dProblem.of_conv(
        x.shape, weight.shape, stride, padding, dilation, groups, bias=bias is not None,
        residual=residual is not None, activation=act_code,
        input_scale=None if input_scale is None else input_scale.dtype,
        input_affine=None if input_affine is None else input_affine.dtype,
        input_activation=input_act_code, pooled=pool is not None, x_strides=_strides(x),
        y_strides=_strides(y), w_strides=_strides(weight), residual_strides=_strides(residual),
        x_aligned=_aligned(x), w_aligned=_aligned(weight), allow_tf32=allow_tf32)
    return _run(p, config, dict(x=x, w=weight, bias=bias, res=residual, y=y, scale=input_scale,
                                affine=input_affine, pool=pool))


def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias, dw_stride, dw_padding,
                     dw_dilation, dw_act_code, weight: torch.Tensor, bias, residual,
                     y: torch.Tensor, act_code, config: Conv2dConfig,
                     allow_tf32: bool = True) -> torch.Tensor:
    """A depthwise conv (C channels, any kernel, stride, padding, dilation) and the 1x1 conv
    that reads it, as one kernel: the depthwise output is computed tile by tile as the 1x1's
    input loads and never goes to memory. dw_weight is (C, 1, KH, KW) in any layout."""
    n, c, xh, xw = x.shape
    win = Window("dw", tuple(dw_weight.shape[2:]), tuple(dw_stride), tuple(dw_padding),
                 tuple(dw_dilation), dw_bias is not None, dw_act_code,
                 (dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3)))
    p = Conv2dProblem(n, c, xh, xw, weight.shape[0], bias=bias is not None,
                      residual=residual is not None, activation=act_code, window=win,
                      x_strides=_strides(x), y_strides=_strides(y), w_strides=_strides(weight),
                      residual_strides=_strides(residual), allow_tf32=allow_tf32,
                      w_aligned=_aligned(weight), out_size=tuple(y.shape[2:]))
    return _run(p, config, dict(x=x, w=weight, bias=bias, res=residual, y=y, dw=dw_weight,
                                dwb=dw_bias))


def pool_conv2d(x: torch.Tensor, mode: str, kernel_size, stride, padding, weight: torch.Tensor,
                bias, residual, y: torch.Tensor, act_code, config: Conv2dConfig,
                allow_tf32: bool = True) -> torch.Tensor:
    """A max or average pool (any window, stride, zero or -inf padding; padding =
    (left, right, top, bottom), right and bottom past left and top being a ceil-mode window's
    overhang, which an "avg" divisor does not count: see Window) and the 1x1 conv that reads
    it, as one kernel: the pooled tile is computed as the conv's input loads and never goes to
    memory. y (N, K, OH, OW) gives the output size."""
    n, c, xh, xw = x.shape
    win = Window(mode, tuple(kernel_size), tuple(stride), tuple(padding))
    p = Conv2dProblem(n, c, xh, xw, weight.shape[0], bias=bias is not None,
                      residual=residual is not None, activation=act_code, window=win,
                      x_strides=_strides(x), y_strides=_strides(y), w_strides=_strides(weight),
                      residual_strides=_strides(residual), allow_tf32=allow_tf32,
                      w_aligned=_aligned(weight), out_size=tuple(y.shape[2:]))
    return _run(p, config, dict(x=x, w=weight, bias=bias, res=residual, y=y))
