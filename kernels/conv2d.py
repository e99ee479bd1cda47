"""Implicit-GEMM convolution on NHWC with a fused bias / residual / activation epilogue.

GEMM view: rows are output pixels (M = N·OH·OW), columns output channels (K), and the
reduction runs over (r, s, c). The (r, s) loops stay outside the channel loop so the inner
loop is a plain strided GEMM that Triton software-pipelines; flattening (r, s, c) into one
loop costs a div/mod per step and measured slower. Every tensor is addressed through its
strides, so the output may be a channel slice of a wider buffer (concat-free outputs) at no
extra cost, and the weight is read in its stored layout (channels_last keeps c contiguous).

Grouped convolution (GROUPED): a tile of output channels reads only the input channels of the
groups it spans, and the weight tile is masked to its block diagonal. Narrow groups (ResNeXt's
4 to 32 channels) are thus packed several to a tile: every loaded byte is useful and the
tensor cores still run, at the price of multiplying zeros, which a memory-bound layer affords.

Window in the load stage (DW, POOL_IN): the input tile is computed from a window of x, as a
depthwise conv's weighted sum (DW) or a pool's max or average (POOL_IN), so that op and the
1x1 conv after it (a separable conv, Inception's pool projection) are one kernel.

Pooling (POOL): the epilogue also adds the tile's stored values, divided by OH·OW, to a
float32 (N, K) buffer: the squeeze of a squeeze-and-excitation block, without a pass over y.
A row tile spans one image or a few (small maps), each summed apart and added atomically.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .activation import apply_activation
from .aot import compile_for


@dataclass(frozen=True)
class Conv2dConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    @property
    def name(self) -> str:
        return (f"triton_m{self.block_m}n{self.block_n}k{self.block_k}"
                f"w{self.num_warps}s{self.num_stages}")


# Candidates timed by the autotuner on Hopper; the shape filter below drops the ones whose
# tiles would be mostly padding for the layer at hand.
CONFIGS = (
    Conv2dConfig(128, 128, 64, 8, 3),
    Conv2dConfig(128, 256, 64, 8, 3),
    Conv2dConfig(256, 128, 64, 8, 3),
    Conv2dConfig(128, 128, 32, 4, 4),
    Conv2dConfig(128, 64, 64, 4, 4),
    Conv2dConfig(64, 128, 64, 4, 4),
    Conv2dConfig(64, 64, 64, 4, 4),
    Conv2dConfig(64, 64, 32, 4, 5),
    Conv2dConfig(32, 64, 64, 4, 4),
    Conv2dConfig(32, 32, 32, 2, 4),
)

# Grouped convs: narrow N tiles keep the zero blocks of the packed weight tile small.
GROUPED_CONFIGS = (
    Conv2dConfig(128, 16, 16, 4, 3),
    Conv2dConfig(256, 16, 16, 4, 3),
    Conv2dConfig(128, 32, 32, 4, 3),
    Conv2dConfig(256, 32, 32, 8, 3),
    Conv2dConfig(64, 32, 32, 4, 4),
    Conv2dConfig(128, 64, 64, 4, 3),
    Conv2dConfig(64, 64, 64, 4, 3),
    Conv2dConfig(128, 128, 64, 8, 3),
)

# Large tiles keep the interpreter's per-program overhead down on the CPU.
INTERPRETER_CONFIG = Conv2dConfig(64, 64, 32, 4, 1)
INTERPRETER_GROUPED_CONFIG = Conv2dConfig(64, 16, 16, 4, 1)


def candidate_configs(m: int, k: int, c: int, groups: int = 1) -> list[Conv2dConfig]:
    """Configs worth timing for a GEMM of m rows, k output channels, c input channels."""
    if groups > 1:
        kg = k // groups
        # a tile should not span more groups than it must, nor half-fill one group
        return [cfg for cfg in GROUPED_CONFIGS
                if cfg.block_n <= max(16, triton.next_power_of_2(min(k, max(kg, 32))))
                and cfg.block_m <= max(64, triton.next_power_of_2(m))] or [GROUPED_CONFIGS[0]]

    def fits(cfg):
        return (cfg.block_n <= max(32, triton.next_power_of_2(k))
                and cfg.block_k <= max(32, triton.next_power_of_2(c))
                and cfg.block_m <= max(32, triton.next_power_of_2(m)))
    return [cfg for cfg in CONFIGS if fits(cfg)] or [CONFIGS[-1]]


def default_config(m: int, k: int, c: int, groups: int = 1) -> Conv2dConfig:
    """Untimed pick (CUDA graph capture, autotuning off): the largest tile the shape fills."""
    sm_count = 132
    for cfg in candidate_configs(m, k, c, groups):
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(k, cfg.block_n)
        if tiles >= sm_count:
            return cfg
    return candidate_configs(m, k, c, groups)[-1]


@triton.jit
def _round_to_bf16(v):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN


@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, scale_ptr, affine_ptr, dw_ptr, dwb_ptr,
    N, C, H, W, K, OH, OW, XH, XW,
    sdc, sdr, sds, dw_sh, dw_sw, dw_pt, dw_pl, dw_dh, dw_dw,
    sxn, sxc, sxh, sxw, ssn, ssc, sar, sac,
    swk, swc, swr, sws,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_t, pad_l, dil_h, dil_w, CG, KG,
    pool_ptr, pool_scale,
    R: tl.constexpr, S: tl.constexpr, GROUPED: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_AFFINE: tl.constexpr, IN_ACT: tl.constexpr,
    DW: tl.constexpr, POOL_IN: tl.constexpr, RD: tl.constexpr, SD: tl.constexpr,
    DW_BIAS: tl.constexpr,
    DW_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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
    n = (offs_m // (OW * OH)).to(tl.int64)
    ih0 = oh * stride_h - pad_t
    iw0 = ow * stride_w - pad_l

    if GROUPED:
        # input channels [c_lo, c_hi) of the groups that output channels n0 .. n1 belong to
        n1 = tl.minimum(pid_n * BLOCK_N + BLOCK_N, K) - 1
        c_lo = (pid_n * BLOCK_N // KG) * CG
        c_hi = (n1 // KG + 1) * CG
        w_cols = w_ptr + offs_n[None, :].to(tl.int64) * swk - ((offs_n // KG) * CG)[None, :] * swc
        group_n = offs_n // KG
    else:
        c_lo = 0
        c_hi = C
        w_cols = w_ptr + offs_n[None, :].to(tl.int64) * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        ih = ih0 + r * dil_h
        row_ok = mask_m & (ih >= 0) & (ih < H)
        for s in range(S):
            iw = iw0 + s * dil_w
            ok = row_ok & (iw >= 0) & (iw < W)
            x_rows = x_ptr + (n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
            w_rs = w_cols + r * swr + s * sws
            for c0 in range(c_lo, c_hi, BLOCK_K):
                cs = c0 + offs_k
                c_ok = cs < c_hi
                a_ok = ok[:, None] & c_ok[None, :]
                if DW or POOL_IN != 0:  # x is the input of a depthwise conv, or of a pool
                    # (max 1, average with the padding counted 2 or not 3), whose output this
                    # 1x1 conv reads: compute that output's tile here, so it never goes to memory
                    empty = float("-inf") if POOL_IN == 1 else 0.0
                    d = tl.full((BLOCK_M, BLOCK_K), empty, tl.float32)
                    taps = tl.zeros((BLOCK_M,), dtype=tl.float32)
                    for rd in range(RD):
                        ihd = oh * dw_sh - dw_pt + rd * dw_dh
                        for sd in range(SD):
                            iwd = ow * dw_sw - dw_pl + sd * dw_dw
                            okd = mask_m & (ihd >= 0) & (ihd < XH) & (iwd >= 0) & (iwd < XW)
                            xd = tl.load(x_ptr + (n * sxn + ihd.to(tl.int64) * sxh
                                                  + iwd.to(tl.int64) * sxw)[:, None]
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
                            d += tl.load(dwb_ptr + cs, mask=c_ok,
                                         other=0.0).to(tl.float32)[None, :]
                        d = apply_activation(d, DW_ACT)
                    elif POOL_IN == 1:  # rows and channels past the edge: 0, not -inf, in the
                        # dot (a window inside the tensor has a real tap: padding <= half of it)
                        d = tl.where(mask_m[:, None] & c_ok[None, :], d, 0.0)
                    elif POOL_IN == 2:
                        d = d / (RD * SD)
                    else:
                        d = d / tl.maximum(taps, 1.0)[:, None]
                    a = d if DOT_FP32 else d.to(x_ptr.dtype.element_ty)  # as eager rounds it
                else:
                    a = tl.load(x_rows + cs[None, :] * sxc, mask=a_ok, other=0.0)
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
                w_ok = c_ok[:, None] & mask_n[None, :]
                if GROUPED:  # block diagonal: channel c feeds output n only within one group
                    w_ok = w_ok & ((cs // CG)[:, None] == group_n[None, :])
                b = tl.load(w_rs + cs[:, None] * swc, mask=w_ok, other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r_ptrs = res_ptr + (n * srn + oh.to(tl.int64) * srh + ow.to(tl.int64) * srw)[:, None] \
            + offs_n[None, :] * src
        acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    acc = apply_activation(acc, ACT)
    y_ptrs = y_ptr + (n * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] \
        + offs_n[None, :] * syc
    # DOT_FP32 (the interpreter's bf16): y is a float32 buffer; round to bf16 here, as the GPU
    # would, so the pool sums the values torch's later copy to bf16 keeps exactly
    y = _round_to_bf16(acc) if DOT_FP32 else acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, y, mask=out_mask)
    if POOL:  # the mean of what was stored, per image and channel
        y = tl.where(out_mask, y.to(tl.float32), 0.0)
        first, hw = pid_m * BLOCK_M, OH * OW
        for img in range(first // hw, (tl.minimum(first + BLOCK_M, M) - 1) // hw + 1):
            part = tl.sum(tl.where((n == img)[:, None], y, 0.0), axis=0) * pool_scale
            tl.atomic_add(pool_ptr + img * K + offs_n, part, mask=mask_n, sem="relaxed")


def _launch(x: torch.Tensor, y: torch.Tensor, K: int, config: Conv2dConfig, allow_tf32: bool,
            build, pool=None) -> torch.Tensor:
    """Run the kernel into y, and y's means into pool ((N, K) float32, contiguous) if given;
    build(y, precision, dot_fp32) gives (args, constexprs)."""
    N, _, OH, OW = y.shape
    precision = "tf32" if (x.dtype == torch.float32 and allow_tf32) else "ieee"
    # Triton's CPU interpreter multiplies bf16 tiles wrongly and truncates fp32 -> bf16. bf16
    # products are exact in fp32, so an fp32 dot and an fp32 store rounded by torch give
    # what the GPU computes.
    dot_fp32 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    dest = y
    if dot_fp32:
        precision = "ieee"
        y = torch.empty(y.shape, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    args, constexprs = build(y, precision, dot_fp32)
    if pool is not None:
        pool.zero_()  # the tiles add into it
    args += (pool if pool is not None else y, 1.0 / (OH * OW))
    grid = (triton.cdiv(N * OH * OW, config.block_m) * triton.cdiv(K, config.block_n),)
    _conv2d_kernel[grid](
        *args, **constexprs, POOL=pool is not None, PRECISION=precision, DOT_FP32=dot_fp32,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)
    return dest.copy_(y) if dot_fp32 else y


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, residual, y: torch.Tensor,
           stride, padding, dilation, act_code: int, config: Conv2dConfig,
           allow_tf32: bool = True, input_scale=None, input_affine=None,
           input_act_code: int = 0, pool=None) -> torch.Tensor:
    """Launch on already-validated tensors; padding = (left, right, top, bottom); y is the
    (N, K, OH, OW) destination view, possibly a channel slice of a wider buffer. As x loads:
    input_affine (2, C) fp32 scale and shift rows with activation input_act_code, then
    input_scale (N, C), a per-image channel scale. pool: (N, K) float32 for mean_hw(y)."""
    N, C, H, W = x.shape
    K, CG, R, S = weight.shape
    groups = C // CG

    def build(y, precision, dot_fp32):
        res = residual if residual is not None else y
        scale = input_scale if input_scale is not None else y
        affine = input_affine if input_affine is not None else y
        args = (x, weight, bias if bias is not None else y, res, y, scale, affine, y, y,
                N, C, H, W, K, y.shape[2], y.shape[3], H, W, 0, 0, 0, 1, 1, 0, 0, 1, 1,
                *x.stride(), scale.stride(0), scale.stride(1), affine.stride(0),
                affine.stride(1), *weight.stride(), *res.stride(), *y.stride(),
                stride[0], stride[1], padding[2], padding[0], dilation[0], dilation[1], CG,
                K // groups)
        return args, dict(R=R, S=S, GROUPED=groups > 1, HAS_SCALE=input_scale is not None,
                          HAS_AFFINE=input_affine is not None, IN_ACT=input_act_code,
                          DW=False, POOL_IN=0, RD=1, SD=1, DW_BIAS=False, DW_ACT=0,
                          HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act_code)
    return _launch(x, y, K, config, allow_tf32, build, pool)


def separable_conv2d(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias, dw_stride, dw_padding,
                     dw_dilation, dw_act_code: int, weight: torch.Tensor, bias, residual,
                     y: torch.Tensor, act_code: int, config: Conv2dConfig,
                     allow_tf32: bool = True) -> torch.Tensor:
    """A depthwise conv (C channels, any kernel, stride, padding, dilation) and the 1x1 conv
    that reads it, as one kernel: the depthwise output is computed tile by tile as the 1x1's
    input loads and never goes to memory. dw_weight is (C, 1, KH, KW) in any layout."""
    N, C, XH, XW = x.shape
    K = weight.shape[0]
    OH, OW = y.shape[2:]

    def build(y, precision, dot_fp32):
        res = residual if residual is not None else y
        args = (x, weight, bias if bias is not None else y, res, y, y, y, dw_weight,
                dw_bias if dw_bias is not None else y,
                N, C, OH, OW, K, OH, OW, XH, XW,
                dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3),
                dw_stride[0], dw_stride[1], dw_padding[2], dw_padding[0], dw_dilation[0],
                dw_dilation[1],
                *x.stride(), 0, 0, 0, 0, *weight.stride(), *res.stride(), *y.stride(),
                1, 1, 0, 0, 1, 1, C, K)
        return args, dict(R=1, S=1, GROUPED=False, HAS_SCALE=False, HAS_AFFINE=False, IN_ACT=0,
                          DW=True, POOL_IN=0, RD=dw_weight.shape[2], SD=dw_weight.shape[3],
                          DW_BIAS=dw_bias is not None, DW_ACT=dw_act_code,
                          HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act_code)
    return _launch(x, y, K, config, allow_tf32, build)


POOL_MODES = {"max": 1, "avg": 2, "avg_valid": 3}  # avg_valid: the padding is not counted


def pool_conv2d(x: torch.Tensor, mode: str, kernel_size, stride, padding, weight: torch.Tensor,
                bias, residual, y: torch.Tensor, act_code: int, config: Conv2dConfig,
                allow_tf32: bool = True) -> torch.Tensor:
    """A max or average pool (any window, stride, zero or -inf padding; padding =
    (left, right, top, bottom)) and the 1x1 conv that reads it, as one kernel: the pooled tile
    is computed as the conv's input loads and never goes to memory."""
    N, C, XH, XW = x.shape
    K = weight.shape[0]
    OH, OW = y.shape[2:]

    def build(y, precision, dot_fp32):
        res = residual if residual is not None else y
        args = (x, weight, bias if bias is not None else y, res, y, y, y, y, y,
                N, C, OH, OW, K, OH, OW, XH, XW, 0, 0, 0,
                stride[0], stride[1], padding[2], padding[0], 1, 1,
                *x.stride(), 0, 0, 0, 0, *weight.stride(), *res.stride(), *y.stride(),
                1, 1, 0, 0, 1, 1, C, K)
        return args, dict(R=1, S=1, GROUPED=False, HAS_SCALE=False, HAS_AFFINE=False, IN_ACT=0,
                          DW=False, POOL_IN=POOL_MODES[mode], RD=kernel_size[0],
                          SD=kernel_size[1], DW_BIAS=False, DW_ACT=0,
                          HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act_code)
    return _launch(x, y, K, config, allow_tf32, build)


def compile_ahead(config: Conv2dConfig, dtype: torch.dtype, kernel_hw=(3, 3), act_code: int = 1,
                  has_residual: bool = True, grouped: bool = False, has_scale: bool = False,
                  has_affine: bool = False, depthwise=None, pool: bool = False,
                  pool_in=None, pool_window=None, capability: int = 90):
    """The kernel compiled for `capability` without a GPU (see kernels/aot.py)."""
    constexprs = dict(R=kernel_hw[0], S=kernel_hw[1], GROUPED=grouped, HAS_SCALE=has_scale,
                      HAS_AFFINE=has_affine, IN_ACT=1 if has_affine else 0,
                      DW=depthwise is not None, POOL_IN=POOL_MODES.get(pool_in, 0),
                      RD=(depthwise or pool_window or (1, 1))[0],
                      SD=(depthwise or pool_window or (1, 1))[1], DW_BIAS=depthwise is not None,
                      DW_ACT=2 if depthwise is not None else 0,
                      HAS_BIAS=True, HAS_RES=has_residual, POOL=pool,
                      ACT=act_code, PRECISION="tf32" if dtype == torch.float32 else "ieee",
                      DOT_FP32=False, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      BLOCK_K=config.block_k, GROUP_M=config.group_m)
    pointers = dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "y_ptr", "scale_ptr"), dtype)
    pointers["affine_ptr"] = torch.float32
    pointers.update(dw_ptr=dtype, dwb_ptr=dtype, pool_ptr=torch.float32)
    return compile_for(_conv2d_kernel, constexprs, pointers, config.num_warps, config.num_stages,
                       capability, floats=("pool_scale",))
