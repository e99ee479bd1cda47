"""The launch arguments of the Triton conv kernel (kernels/conv2d.py) for a Conv2dProblem: one
function for the runtime launch and the ahead-of-time compile, so the two cannot drift. The
scalar part depends only on the problem and the config and is cached; the pointers are the
tensors of the call (or, compiling ahead, stand-ins that carry a dtype and an alignment).

The weight goes to the kernel as a host-side tensor descriptor (triton.tools.tensor_descriptor,
Triton >= 3.3; the launcher encodes the CUtensorMap, so no device allocator is needed) when the
config asks for TMA, weight_tma_fits allows it and the target has the tensor memory accelerator
(sm_90 and later; the interpreter emulates it): a 3-D view (taps, K, channels per group) read in
boxes of (1, BLOCK_N, BLOCK_K), zero past each tap's channels."""
import functools
import os

import torch
import triton

from .conv2d_configs import (STEM_CHANNELS, Conv2dConfig, Conv2dProblem,  # noqa: F401
                             activation_tma_fits, weight_tma_fits)

POOL_MODES = {"max": 1, "avg": 2, "avg_valid": 3}  # avg_valid: the padding is not counted
REDUCE_BLOCK = (64, 64)  # tile of the split-K sum
_INT32_LIMIT = 2 ** 31 - 1
# x and w come after the scalars: as descriptors they expand to several kernel parameters,
# and the static report finds every other parameter by its position
_POINTERS = ("bias", "res", "y", "scale", "affine", "dw", "dwb", "pool", "ws")
_OPERANDS = ("x", "w")
_REDUCE_POINTERS = ("ws", "bias", "res", "y", "pool")
_SIZES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


class Pointer:
    """Stands in for a tensor when compiling ahead: Triton specialises pointers on their
    dtype and on whether their address is 16-byte aligned."""

    def __init__(self, dtype: torch.dtype, aligned: bool = True):
        self.dtype = dtype
        self._address = 0 if aligned else 2

    def data_ptr(self) -> int:
        return self._address


@functools.lru_cache(maxsize=None)
def descriptors_supported() -> bool:
    """Whether this Triton has host-side tensor descriptors (triton.tools.tensor_descriptor)
    and descriptor loads in kernels; False below 3.3, and then every launch takes the pointer
    path."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    import triton.language as tl
    return hasattr(tl, "tensor_descriptor")


def tma_allowed(device: torch.device) -> bool:
    """Descriptors for launches on `device`: a Triton that has them, a GPU with the tensor
    memory accelerator (NVIDIA, compute capability 9.0 or later) or the CPU interpreter, and
    CNNFUSE_TMA not set to 0."""
    if os.environ.get("CNNFUSE_TMA", "1") == "0" or not descriptors_supported():
        return False
    if device.type != "cuda":
        return True
    if torch.version.hip is not None:  # ROCm reports its own capabilities: no Hopper TMA
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _dense_cl(n, c, h, w):
    return (h * w * c, 1, w * c, c)


def _span(shape, strides) -> int:
    return 1 + sum((d - 1) * abs(st) for d, st in zip(shape, strides))


def _vec(element_size: int, contiguous, *values) -> int:
    """The widest vector of at most 16 bytes, in elements, that divides all values, if the
    channel stride is 1 (else 1)."""
    v = 16 // element_size
    while v > 1 and not (contiguous and all(x % v == 0 for x in values)):
        v //= 2
    return v


def _weight_box(p: Conv2dProblem, cfg: Conv2dConfig, ws: tuple, c: int, cg: int):
    """(shape, strides, block shape) of the weight's descriptor: (taps, K, channels per
    group), element strides; the stem's (R, K, S * STEM_CHANNELS) of its padded weight."""
    block = [1, cfg.block_n, cfg.block_k]
    if p.stem:
        sc = p.s * STEM_CHANNELS
        return [p.r, p.k, sc], [sc, p.r * sc, 1], block
    if p.window is not None or p.r * p.s == 1:
        return [1, p.k, cg], [ws[0], ws[0], 1], block
    return [p.r * p.s, p.k, cg], [ws[3], ws[0], 1], block


def _pool_code(win) -> int:
    """The kernel's POOL_IN for a window: POOL_MODES, and 4 for "avg" with a ceil-mode
    overhang (right or bottom padding past left or top), whose divisor clips the window to
    the padded input as PyTorch's does; a floor-mode "avg" divides by the whole window."""
    code = POOL_MODES.get(win.kind, 0)
    pad = win.padding
    return 4 if code == 2 and (pad[1] != pad[0] or pad[3] != pad[2]) else code


@functools.lru_cache(maxsize=4096)
def _plan(p: Conv2dProblem, cfg: Conv2dConfig, dtype: torch.dtype, dot_fp32: bool,
          tma: bool = False):
    """(scalars, constexprs, grid, reduce scalars, reduce constexprs, reduce grid, weight
    descriptor (shape, strides, block) or None). tma: descriptors are allowed here."""
    oh, ow = p.out_hw
    win = p.window
    stem = p.stem
    c = STEM_CHANNELS if stem else p.c
    cg = c // p.groups
    xs = _dense_cl(p.n, c, p.h, p.w) if stem or p.x_strides is None else tuple(p.x_strides)
    ws = (_dense_cl(p.k, cg, p.r, p.s) if stem or p.w_strides is None
          else tuple(p.w_strides))
    ys = _dense_cl(p.n, p.k, oh, ow) if p.y_strides is None else tuple(p.y_strides)
    rs = (_dense_cl(p.n, p.k, oh, ow) if p.residual_strides is None
          else tuple(p.residual_strides)) if p.residual else ys
    esize = _SIZES[dtype]
    xvec = 1 if stem else _vec(
        esize, xs[1] == 1 and ws[1] == 1, c, cg, xs[0], xs[2], xs[3], ws[0], ws[2], ws[3])
    yvec = _vec(esize, ys[1] == 1 and rs[1] == 1, p.k, ys[0], ys[2], ys[3], rs[0], rs[2],
                rs[3])
    xv = (xs[0] // xvec, xs[1], xs[2] // xvec, xs[3] // xvec)
    wv = (ws[0] // xvec, ws[1], ws[2] // xvec, ws[3] // xvec)
    yv = (ys[0] // yvec, ys[1], ys[2] // yvec, ys[3] // yvec)
    rv = (rs[0] // yvec, rs[1], rs[2] // yvec, rs[3] // yvec)
    m = p.n * oh * ow
    spans = (_span((p.n, c, p.h, p.w), xs), _span((p.n, p.k, oh, ow), ys),
             _span((p.n, p.k, oh, ow), rs), cfg.split_k * m * p.k + 1,
             _span((p.k, cg, p.r, p.s), ws))
    int64 = max(spans) > _INT32_LIMIT
    if win is None:
        conv_hw = (p.h, p.w)
        window = (0, 0, 0, 1, 1, 0, 0, 1, 1)
        conv = (*p.stride, p.padding[2], p.padding[0], *p.dilation)
    else:
        conv_hw = (oh, ow)
        window = (*win.weight_strides, *win.stride, win.padding[2], win.padding[0],
                  *win.dilation)
        conv = (1, 1, 0, 0, 1, 1)
    scalars = (p.n, c // xvec, *conv_hw, p.k // yvec, oh, ow, p.h, p.w,
               *xv, *wv, *rv, *yv,
               *((p.c, 1) if p.input_scale is not None else (0, 0)),
               *((p.c, 1) if p.input_affine is not None else (0, 0)),
               *window[:3], *conv, *window[3:], cg // xvec, p.k // p.groups, 1.0 / (oh * ow))
    precision = "tf32" if dtype == torch.float32 and p.allow_tf32 and not dot_fp32 else "ieee"
    w_box = (_weight_box(p, cfg, ws, c, cg)
             if tma and cfg.tma and weight_tma_fits(p, cfg, esize) else None)
    x_box = ([m, p.c], [xs[3], 1], [cfg.block_m, cfg.block_k])
    if not (tma and cfg.tma and cfg.x_tma and activation_tma_fits(p, cfg, esize)):
        x_box = None
    constexprs = dict(
        R=1 if win else p.r, S=1 if win else p.s, GROUPED=p.groups > 1,
        HAS_SCALE=p.input_scale is not None, HAS_AFFINE=p.input_affine is not None,
        IN_ACT=p.input_activation, DW=win is not None and win.kind == "dw",
        POOL_IN=_pool_code(win) if win else 0,
        RD=win.kernel[0] if win else 1, SD=win.kernel[1] if win else 1,
        DW_BIAS=bool(win and win.bias), DW_ACT=win.activation if win else 0,
        HAS_BIAS=p.bias, HAS_RES=p.residual, ACT=p.activation, POOL=p.pooled, STEM=stem,
        XVEC=xvec, YVEC=yvec, SPLIT_K=cfg.split_k, W_TMA=w_box is not None,
        X_TMA=x_box is not None, INT64=int64,
        PRECISION=precision,
        DOT_FP32=dot_fp32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(p.k, cfg.block_n), cfg.split_k)
    if cfg.split_k == 1:
        return scalars, constexprs, grid, None, None, None, (x_box, w_box)
    bm, bn = REDUCE_BLOCK
    return (scalars, constexprs, grid,
            (m, p.k // yvec, oh, ow, *rv, *yv, 1.0 / (oh * ow)),
            dict(SPLIT_K=cfg.split_k, HAS_BIAS=p.bias, HAS_RES=p.residual, ACT=p.activation,
                 POOL=p.pooled, DOT_FP32=dot_fp32, INT64=int64, YVEC=yvec, BLOCK_M=bm,
                 BLOCK_N=bn, num_warps=4, num_stages=1),
            (triton.cdiv(m, bm), triton.cdiv(p.k, bn)), (x_box, w_box))


def arguments(p: Conv2dProblem, cfg: Conv2dConfig, dtype: torch.dtype, t: dict,
              dot_fp32: bool = False, tma: bool = False):
    """(args, constexprs, grid, reduce) of one launch of `p` at `cfg` in `dtype`. t maps x, w,
    bias, res, y, scale, affine, dw, dwb, pool, ws to tensors (or Pointer stand-ins, or None
    where absent: y stands in); x and w are the padded ones when p.stem. reduce is (args,
    constexprs, grid) of the split-K sum, or None. dot_fp32: the interpreter's bf16 mode (y is
    a float32 buffer). tma: the weight may go through a descriptor (tma_allowed); it does
    when cfg.tma and weight_tma_fits agree (constexprs["W_TMA"])."""
    scalars, constexprs, grid, r_scalars, r_constexprs, r_grid, (x_box, w_box) = _plan(
        p, cfg, dtype, dot_fp32, tma)
    y = t["y"]
    ptr = {k: (t.get(k) if t.get(k) is not None else y) for k in _POINTERS + _OPERANDS}
    for name, box in (("x", x_box), ("w", w_box)):
        if box is not None:
            from triton.tools.tensor_descriptor import TensorDescriptor
            ptr[name] = TensorDescriptor(ptr[name], *box)
    args = tuple(ptr[k] for k in _POINTERS) + scalars + (ptr["x"], ptr["w"])
    reduce = None
    if r_scalars is not None:
        reduce = (tuple(ptr[k] for k in _REDUCE_POINTERS) + r_scalars, r_constexprs, r_grid)
    return args, constexprs, grid, reduce


def stand_ins(p: Conv2dProblem, dtype: torch.dtype, split_k: int) -> dict:
    """Pointer stand-ins for every tensor a launch of `p` passes, as `arguments` takes them."""
    f32 = torch.float32
    win = p.window
    return dict(x=Pointer(dtype, p.x_aligned or p.stem), w=Pointer(dtype),
                bias=Pointer(dtype) if p.bias else None,
                res=Pointer(dtype) if p.residual else None,
                y=Pointer(dtype, p.y_aligned),
                scale=Pointer(p.input_scale) if p.input_scale is not None else None,
                affine=Pointer(p.input_affine) if p.input_affine is not None else None,
                dw=Pointer(dtype) if win is not None and win.kind == "dw" else None,
                dwb=Pointer(dtype) if win is not None and win.bias else None,
                pool=Pointer(f32) if p.pooled else None,
                ws=Pointer(f32) if split_k > 1 else None)
