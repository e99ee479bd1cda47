"""What one call of the Triton conv kernel computes (Conv2dProblem), the tile configs it can run
with (Conv2dConfig), which of them are worth timing for a problem, and the untimed default.

The problem is the single description shared by the runtime launcher and the ahead-of-time
compile (kernels/conv2d.py builds the launch arguments from it in both cases), so the kernel
that is checked statically is the kernel that runs.
"""
import functools
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import triton

SM_COUNT = 132  # H100 SXM / H200: the tiles-per-wave rule assumes it
SHARED_BYTES = 220 * 1024  # usable shared memory per block on sm_90, with some slack
STEM_CHANNELS = 8  # few-channel inputs are padded to this many channels (16-byte pixels)


@dataclass(frozen=True)
class Window:
    """A window computed in the conv's load stage, whose output the 1x1 conv reads:
    kind "dw" (a depthwise conv; weight_strides are its (C, 1, KH, KW) weight's strides of
    dims 0, 2, 3), or a pool "max", "avg" (padding counted) or "avg_valid" (not counted).
    padding is (left, right, top, bottom). A pool's padding is PyTorch's: left = right and
    top = bottom, or for ceil mode right and bottom larger by the overhang its last window may
    have (ref.pool_conv2d.pool_padding); "avg" divides by the window clipped to [-top, H + top) x
    [-left, W + left), as PyTorch's count_include_pad does, so that overhang is not counted."""
    kind: str
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    bias: bool = False
    activation: Union[int, tuple] = 0
    weight_strides: tuple = (0, 0, 0)

    def __post_init__(self):
        if self.kind not in ("dw", "max", "avg", "avg_valid"):
            raise ValueError(f"Window.kind must be dw, max, avg or avg_valid; got {self.kind!r}")


@dataclass(frozen=True)
class Conv2dProblem:
    """One conv call. x is (n, c, h, w); the weight (k, c // groups, r, s); padding is (left,
    right, top, bottom). With a window, x is the window's input and the conv is 1x1 on its
    output. Strides of None mean a dense channels_last tensor; a tuple (NCHW order, in
    elements) describes a view, e.g. a channel slice of a wider buffer. *_aligned: whether
    that tensor's data pointer is 16-byte aligned (w_aligned: the weight's, which a
    tensor-memory-accelerator descriptor needs). input_scale / input_affine: None when absent,
    else the dtype of that tensor (contiguous (n, c) and (2, c)). Activations are the
    (code, p0, p1) of cnnfuse.ref.activation_args, or a bare code for one without
    parameters."""
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int = 1
    s: int = 1
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    bias: bool = True
    residual: bool = False
    activation: Union[int, tuple] = 0
    input_scale: Optional[torch.dtype] = None
    input_affine: Optional[torch.dtype] = None
    input_activation: Union[int, tuple] = 0
    pooled: bool = False
    window: Optional[Window] = None
    x_strides: Optional[tuple] = None
    y_strides: Optional[tuple] = None
    w_strides: Optional[tuple] = None
    residual_strides: Optional[tuple] = None
    x_aligned: bool = True
    y_aligned: bool = True
    w_aligned: bool = True
    allow_tf32: bool = True
    out_size: Optional[tuple] = None  # (OH, OW) when given (a ceil-mode pool window)

    @property
    def out_hw(self) -> tuple:
        if self.out_size is not None:
            return tuple(self.out_size)
        if self.window is not None:
            kernel, stride, pad, dil = (self.window.kernel, self.window.stride,
                                        self.window.padding, self.window.dilation)
        else:
            kernel, stride, pad, dil = (self.r, self.s), self.stride, self.padding, self.dilation
        oh = (self.h + pad[2] + pad[3] - dil[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        ow = (self.w + pad[0] + pad[1] - dil[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        return oh, ow

    @property
    def m(self) -> int:
        """GEMM rows: output pixels."""
        oh, ow = self.out_hw
        return self.n * oh * ow

    @property
    def stem(self) -> bool:
        """Few input channels (an RGB or grey stem): x and the weight are padded to
        STEM_CHANNELS and each kernel row's (s, c) taps form one contiguous reduction."""
        return (self.groups == 1 and self.c < STEM_CHANNELS and self.window is None
                and self.input_scale is None and self.input_affine is None
                and self.dilation[1] == 1)

    def reduction_steps(self, block_k: int) -> int:
        """Steps of the kernel's one reduction loop at this BLOCK_K (per tile; grouped tiles
        spanning one group)."""
        if self.stem:
            return self.r * triton.cdiv(self.s * STEM_CHANNELS, block_k)
        cg = self.c // self.groups
        return self.r * self.s * triton.cdiv(cg if self.groups > 1 else self.c, block_k)

    @staticmethod
    def gemm(m: int, k: int, c: int, groups: int = 1) -> "Conv2dProblem":
        """A 1x1 conv of m rows, k output channels and c input channels: the GEMM those
        numbers describe, for callers that know only them."""
        return Conv2dProblem(n=1, c=c, h=m, w=1, k=k, groups=groups)

    @staticmethod
    def of_conv(x_shape, w_shape, stride, padding, dilation, groups: int = 1,
                **flags) -> "Conv2dProblem":
        n, c, h, w = x_shape
        k, _, r, s = w_shape
        return Conv2dProblem(n, c, h, w, k, r, s, tuple(stride), tuple(padding),
                             tuple(dilation), groups, **flags)


@dataclass(frozen=True)
class Conv2dConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1  # the reduction split over this many programs, summed in fixed order
    # operands through tensor-memory-accelerator descriptors where the geometry and the
    # Triton build allow it (the weight: weight_tma_fits; with x_tma also the activation:
    # activation_tma_fits; conv2d_args.tma_allowed); else the pointer path. A request, not a
    # promise: each launch falls back on its own
    tma: bool = False
    x_tma: bool = False

    @property
    def name(self) -> str:
        return (f"triton_m{self.block_m}n{self.block_n}k{self.block_k}"
                f"w{self.num_warps}s{self.num_stages}"
                + (f"sk{self.split_k}" if self.split_k > 1 else "")
                + ("tma" if self.tma else "") + ("x" if self.tma and self.x_tma else ""))

    def shared_bytes(self, element_size: int, taps: int = 1) -> int:
        """Shared memory of the pipelined operand buffers; with a load-stage window of `taps`
        taps, each tap's x tile is a buffer of its own, num_stages - 1 deep (as the sm_90
        compile lays them out)."""
        if taps > 1:
            return ((self.num_stages - 1) * taps * self.block_m + self.num_stages * self.block_n
                    ) * self.block_k * element_size
        return (self.num_stages * (self.block_m + self.block_n) * self.block_k
                * element_size)


# Hopper candidates. One pipelined loop covers the whole (r, s, c) reduction, so stage counts
# run 3-5 at every kernel size; 8 warps (two warpgroups) for the 128-row and wider tiles.
CONFIGS = (
    Conv2dConfig(128, 128, 64, 8, 4),
    Conv2dConfig(128, 256, 64, 8, 3),
    Conv2dConfig(256, 128, 64, 8, 3),
    Conv2dConfig(128, 64, 64, 4, 4),
    Conv2dConfig(64, 128, 64, 4, 4),
    Conv2dConfig(128, 128, 32, 8, 5),
    Conv2dConfig(64, 64, 64, 4, 4),
    Conv2dConfig(64, 64, 32, 4, 5),
    Conv2dConfig(128, 32, 64, 4, 4),  # narrow layers (MobileNet's 16-32 channel projections)
    Conv2dConfig(64, 32, 64, 4, 4),
    Conv2dConfig(128, 32, 32, 4, 4),  # narrow and shallow (16-32 channels in and out)
    Conv2dConfig(64, 32, 32, 4, 4),
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

# Load-stage windows (depthwise, pool): every tap's x tile is staged in shared memory, so
# shallow pipelines; the plain configs stay candidates where they fit.
WINDOW_CONFIGS = (
    Conv2dConfig(128, 32, 32, 4, 2),
    Conv2dConfig(128, 64, 32, 4, 2),
    Conv2dConfig(64, 64, 32, 4, 2),
    Conv2dConfig(64, 32, 32, 4, 2),
    Conv2dConfig(64, 128, 32, 4, 2),
    Conv2dConfig(128, 128, 32, 8, 2),
)

# Large tiles keep the interpreter's per-program overhead down on the CPU; descriptors where
# they fit, as the GPU's default picks take them, so the CPU tests run that path.
INTERPRETER_CONFIG = Conv2dConfig(64, 64, 32, 4, 1, tma=True, x_tma=True)
INTERPRETER_GROUPED_CONFIG = Conv2dConfig(64, 16, 16, 4, 1, tma=True)

SPLITS = (2, 3, 4, 6, 8, 12, 16)
MIN_STEPS_PER_SPLIT = 4  # fewer and the partial sums' traffic outweighs the overlap


def _as_problem(problem, k, c, groups, taps) -> Conv2dProblem:
    if isinstance(problem, Conv2dProblem):
        return problem
    if k is None or c is None:
        raise TypeError("candidate_configs/default_config take a Conv2dProblem, or m, k, c")
    if taps > 1:  # a 1x1 conv after a window of `taps` taps: the window's shape is immaterial
        return Conv2dProblem(1, c, problem, 1, k, window=Window("avg", (taps, 1)),
                             out_size=(problem, 1))
    return Conv2dProblem.gemm(problem, k, c, groups)


def _tiles(p: Conv2dProblem, cfg: Conv2dConfig) -> int:
    return triton.cdiv(p.m, cfg.block_m) * triton.cdiv(p.k, cfg.block_n)


def _split_for(p: Conv2dProblem, cfg: Conv2dConfig) -> int:
    """The smallest split that brings the tile count to about two waves, if the reduction is
    deep enough to afford it; 1 if none."""
    tiles, steps = _tiles(p, cfg), p.reduction_steps(cfg.block_k)
    if tiles >= 2 * SM_COUNT:
        return 1
    for split in SPLITS:
        if steps < split * MIN_STEPS_PER_SPLIT:
            break
        if tiles * split >= 2 * SM_COUNT:
            return split
    fitting = [sp for sp in SPLITS if steps >= sp * MIN_STEPS_PER_SPLIT]
    return fitting[-1] if fitting else 1


def candidate_configs(problem, k: Optional[int] = None, c: Optional[int] = None,
                      groups: int = 1, dtype: Optional[torch.dtype] = None, taps: int = 1
                      ) -> list[Conv2dConfig]:
    """Configs worth timing for `problem` (a Conv2dProblem; or m, k, c[, groups] of a plain
    GEMM, the older form, after a load-stage window of `taps` taps if taps > 1): tiles that are not mostly padding, operand buffers that fit in
    shared memory at dtype's size (fp16 if None), and split-K versions of the dense tiles
    that fill fewer than two waves."""
    return list(_candidates(_as_problem(problem, k, c, groups, taps), dtype))


@functools.lru_cache(maxsize=4096)
def _candidates(p: Conv2dProblem, dtype) -> tuple:
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else 2
    if p.groups > 1:
        kg = p.k // p.groups
        # a tile should not span more groups than it must, nor half-fill one group
        out = [cfg for cfg in GROUPED_CONFIGS
               if cfg.block_n <= max(16, triton.next_power_of_2(min(p.k, max(kg, 32))))
               and cfg.block_m <= max(64, triton.next_power_of_2(p.m))
               and cfg.shared_bytes(size) <= SHARED_BYTES]
        return _with_tma(p, tuple(out or [GROUPED_CONFIGS[0]]), size)
    depth = p.s * STEM_CHANNELS if p.stem else p.c
    taps = p.window.kernel[0] * p.window.kernel[1] if p.window is not None else 1

    def fits(cfg):
        return (cfg.block_n <= max(32, triton.next_power_of_2(p.k))
                and cfg.block_k <= max(32, triton.next_power_of_2(depth))
                and cfg.block_m <= max(32, triton.next_power_of_2(p.m))
                and cfg.shared_bytes(size, taps) <= SHARED_BYTES)
    pool = CONFIGS + WINDOW_CONFIGS if taps > 1 else CONFIGS
    out = [cfg for cfg in pool if fits(cfg)] or [Conv2dConfig(32, 32, 32, 2, 1)]
    split = []
    for cfg in out:
        sk = _split_for(p, cfg)
        if sk > 1:
            split.append(Conv2dConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps,
                                      cfg.num_stages, cfg.group_m, sk))
    plain = tuple(out + sorted(split, key=lambda cfg: _split_rank(p, cfg),
                               reverse=True)[:MAX_SPLIT])
    return _with_tma(p, plain, size)


MAX_SPLIT = 4  # split-K candidates timed per shape
POINTER_TWINS = 2  # pointer-path versions kept beside the TMA ones, so tuning compares both


def weight_tma_fits(p: Conv2dProblem, cfg: Conv2dConfig, element_size: int) -> bool:
    """Whether the weight tile of (p, cfg) can be a tensor-memory-accelerator box: channels
    contiguous (c stride 1), the other strides and the base 16-byte aligned, a box row of
    BLOCK_K channels a multiple of 16 bytes, (r, s) taps one stride apart (r stride = S · s
    stride, so the taps form one descriptor dimension), and for grouped convs a tile of output
    channels inside one group (the block-diagonal mask of wider tiles is not a box). The
    channel tail of each tap is the descriptor's zero fill, so no box straddles two taps."""
    if element_size not in (2, 4):
        return False
    if cfg.block_k * element_size % 16 or cfg.block_n > 256 or cfg.block_k > 256:
        return False
    if p.stem:  # the padded weight, a fresh dense (K, R, S, STEM_CHANNELS) tensor
        return p.s * STEM_CHANNELS * element_size % 16 == 0
    if not p.w_aligned:
        return False
    if p.groups > 1 and (p.k // p.groups) % cfg.block_n:
        return False
    if p.w_strides is None:
        ws = (p.c // p.groups * p.r * p.s, 1, p.s * p.c // p.groups, p.c // p.groups)
    else:
        ws = tuple(p.w_strides)
    taps = 1 if p.window is not None else p.r * p.s
    if ws[1] != 1 and p.c // p.groups > 1:
        return False
    if 0 in ws:  # an expanded weight: a descriptor's strides must be real strides
        return False
    if taps > 1 and (ws[2] != p.s * ws[3] or ws[3] * element_size % 16):
        return False
    return ws[0] * element_size % 16 == 0


def activation_tma_fits(p: Conv2dProblem, cfg: Conv2dConfig, element_size: int) -> bool:
    """Whether x's tile can be one tensor-memory-accelerator box per step: a dense 1x1
    stride-1 unpadded conv without a load-stage window or prologue, whose output pixels are
    x's pixels (rows uniformly strided, channels contiguous, 16-byte aligned)."""
    if element_size not in (2, 4) or p.groups != 1 or p.stem or p.window is not None:
        return False
    if (p.r, p.s, p.stride, p.padding) != (1, 1, (1, 1), (0, 0, 0, 0)):
        return False
    if p.input_scale is not None or p.input_affine is not None or not p.x_aligned:
        return False
    if cfg.block_k * element_size % 16 or cfg.block_m > 256 or cfg.block_k > 256:
        return False
    xs = (p.h * p.w * p.c, 1, p.w * p.c, p.c) if p.x_strides is None else tuple(p.x_strides)
    rows_uniform = xs[0] == p.h * xs[2] and xs[2] == p.w * xs[3]
    # an empty batch has no box; an expanded x no real strides
    return (xs[1] == 1 or p.c == 1) and rows_uniform and xs[3] * element_size % 16 == 0 \
        and 0 < p.n * p.h * p.w < 2 ** 31 and 0 not in xs


def _tma_twin(p: Conv2dProblem, cfg: Conv2dConfig, size: int):
    """cfg with tma (and x_tma where the activation fits too), or None if no operand fits."""
    x_fits = activation_tma_fits(p, cfg, size)
    if not (x_fits or weight_tma_fits(p, cfg, size)):
        return None
    return replace(cfg, tma=True, x_tma=x_fits)


def _with_tma(p: Conv2dProblem, configs: tuple, size: int) -> tuple:
    """configs with each one that has a TMA twin replaced by it, and the first POINTER_TWINS
    of those also as they were."""
    twins = {cfg: _tma_twin(p, cfg, size) for cfg in configs}
    out = [twins[cfg] or cfg for cfg in configs]
    return tuple(out + [cfg for cfg in configs if twins[cfg]][:POINTER_TWINS])


def _split_rank(p: Conv2dProblem, cfg: Conv2dConfig) -> tuple:
    """Better split-K configs rank higher: a full wave of programs first, then fewest row
    tiles (each reads the whole weight slice again: small-batch layers are weight-bound), then
    four-warp (warpgroup) MMA, then the larger tile."""
    programs = _tiles(p, cfg) * cfg.split_k
    return (programs >= 0.75 * SM_COUNT, -triton.cdiv(p.m, cfg.block_m), cfg.num_warps >= 4,
            cfg.block_m * cfg.block_n)


def default_config(problem, k: Optional[int] = None, c: Optional[int] = None,
                   groups: int = 1, dtype: Optional[torch.dtype] = None, taps: int = 1
                   ) -> Conv2dConfig:
    """The untimed pick (autotuning off, first call inside a CUDA graph), a per-shape rule:
    the largest tile that still gives two waves of tiles on SM_COUNT SMs with little of the
    last wave idle; if none does, the split-K config of best _split_rank; failing both, the
    largest tile that still fills half the SMs. Warpgroup (4+ warp) tiles are tried first."""
    return _default(_as_problem(problem, k, c, groups, taps), dtype)


@functools.lru_cache(maxsize=4096)
def _default(p: Conv2dProblem, dtype) -> Conv2dConfig:
    """The rule below over the pointer-path candidates, then the pick's TMA twin if it has
    one (operands through descriptors: fewer address registers and instructions, no
    per-element masks; a 1x1 stride-1 conv's 128x64 tile drops from 156 to 96 registers)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else 2
    pick = _default_tile(p, tuple(dict.fromkeys(replace(cfg, tma=False, x_tma=False)
                                                for cfg in _candidates(p, dtype))))
    return _tma_twin(p, pick, size) or pick


ACC_REGISTERS = 64  # fp32 accumulator registers per thread beyond which a residual spills


def _default_tile(p: Conv2dProblem, cands: tuple) -> Conv2dConfig:
    if p.residual:  # the residual tile loads beside the accumulator: 128x256 and 256x128
        # tiles at 8 warps (128 accumulator registers a thread) spill 40-200 bytes on sm_90
        light = tuple(cfg for cfg in cands
                      if cfg.block_m * cfg.block_n <= ACC_REGISTERS * 32 * cfg.num_warps)
        cands = light or cands

    def area(cfg):
        return cfg.block_m * cfg.block_n

    def wave_efficiency(cfg):
        tiles = _tiles(p, cfg)
        return tiles / (triton.cdiv(tiles, SM_COUNT) * SM_COUNT)
    # warpgroup (4+ warp) tiles first: Hopper's wgmma; two-warp tiles only if nothing else fits
    for group in ([cfg for cfg in cands if cfg.num_warps >= 4], list(cands)):
        plain = [cfg for cfg in group if cfg.split_k == 1]
        full = [cfg for cfg in plain if _tiles(p, cfg) >= 2 * SM_COUNT]
        if full:
            # the largest tile whose last wave is at least 3/4 full, else the best-filled one
            good = [cfg for cfg in full if wave_efficiency(cfg) >= 0.75]
            return max(good or full, key=lambda cfg: (
                area(cfg) if good else wave_efficiency(cfg), cfg.block_k, -cfg.num_stages))
        split = [cfg for cfg in group if cfg.split_k > 1]
        if split and p.groups == 1:
            return max(split, key=lambda cfg: _split_rank(p, cfg))
    plain = [cfg for cfg in cands if cfg.split_k == 1]
    return max(plain, key=lambda cfg: (_tiles(p, cfg) >= SM_COUNT // 2, cfg.num_warps >= 4,
                                       area(cfg)))
