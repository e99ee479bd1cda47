"""cnnfuse::conv2d_triton — the Triton conv with one tile config fixed, as a torch.library
triton_op, so that torch.compile and AOTInductor see the kernel itself (and an AOTInductor
package carries its compiled binary) instead of an opaque call.

cnnfuse.export writes these ops in place of cnnfuse::conv2d, conv2d_into and conv2d_pooled
where the autotuner's pick for that call is a Triton config (see cnnfuse.export); eager
models never call them. The three schemas mirror those ops', with two arguments more:

    config      [block_m, block_n, block_k, num_warps, num_stages, group_m, split_k], the
                fields of a kernels.conv2d_configs.Conv2dConfig
    allow_tf32  the float32 dot's precision (torch.backends.cudnn.allow_tf32 when picked)

The body launches kernels.conv2d's `_conv2d_kernel` (and its split-K sum) through
torch.library.wrap_triton with the arguments kernels.conv2d_args builds for the runtime
launch, so the kernel in a package is the one that was tuned, on the pointer path: a pick
that loads through tensor-memory-accelerator descriptors (a "...tma" config) runs as its
pointer twin, the same tiles and stages, because torch's tracing of wrap_triton does not
capture descriptors yet (torch 2.14: "TMA descriptor capturing not yet supported in
non-dynamo tracing"). Under tracing the batch may be
symbolic: the kernel's batch argument, the grid and the split-K workspace follow it, and the
choice of 64-bit indexing (a constexpr) is made for the largest batch the program accepts.

On CPU tensors the op computes the fp32 reference (the op's specification), or, with
CNNFUSE_BACKEND=triton under TRITON_INTERPRET=1 (as cnnfuse::conv2d does), runs the same
launch in Triton's interpreter.
"""
import contextlib
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton
from torch.utils.flop_counter import register_flop_formula

from .. import ref
from .._ext import relaxed_capture
from ..backend import requested_backend, triton_interpreting
from ..kernels.conv2d import _conv2d_kernel, _splitk_reduce_kernel, prepare
from ..kernels.conv2d_args import REDUCE_BLOCK, arguments
from ..kernels.conv2d_configs import Conv2dConfig, Conv2dProblem

CONFIG_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "group_m",
                 "split_k")
_INT32_BATCH = 2 ** 31  # a batch this large needs 64-bit indexing for any non-empty layer


def config_list(cfg: Conv2dConfig) -> list[int]:
    """The `config` argument of the ops for a tile config."""
    return [getattr(cfg, f) for f in CONFIG_FIELDS]


def config_of(config) -> Conv2dConfig:
    """The Conv2dConfig of a `config` argument; ValueError for a malformed one."""
    if len(config) != len(CONFIG_FIELDS) or not all(
            isinstance(v, int) and v >= 1 for v in config):
        raise ValueError(f"config must be {len(CONFIG_FIELDS)} positive ints "
                         f"({', '.join(CONFIG_FIELDS)}), got {list(config)!r}")
    cfg = Conv2dConfig(*config)
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if v & (v - 1) or v < 16:
            raise ValueError(f"config {name}={v} must be a power of two >= 16")
    return cfg


def batch_bound(n) -> int:
    """The largest value a (maybe symbolic) batch size takes: the batch itself, the upper
    end of its range in the tracing shape environment, or a batch that forces 64-bit
    indexing when the range is unbounded."""
    if isinstance(n, int):
        return n
    from torch.utils._sympy.numbers import int_oo
    node = n.node
    upper = node.shape_env.bound_sympy(node.expr).upper
    if upper == int_oo:  # no upper end
        return _INT32_BATCH
    return min(int(upper), _INT32_BATCH)


def _strides(t) -> Optional[tuple]:
    return None if t is None else tuple(int(s) for s in t.stride())


def _launch(x, weight, bias, residual, y, stride, padding, dilation, activation, input_scale,
            input_affine, input_activation, pool, cfg: Conv2dConfig, allow_tf32: bool):
    """kernels.conv2d.conv2d's launch, with wrap_triton and a batch that may be symbolic."""
    n, c, h, w = x.shape
    if input_scale is not None:
        input_scale = input_scale.contiguous()
    if input_affine is not None:
        input_affine = input_affine.contiguous()
    p = Conv2dProblem.of_conv(
        (batch_bound(n), c, h, w), tuple(weight.shape), tuple(stride), tuple(padding),
        tuple(dilation), c // weight.shape[1], bias=bias is not None,
        residual=residual is not None, activation=ref.activation_args(activation),
        input_scale=None if input_scale is None else input_scale.dtype,
        input_affine=None if input_affine is None else input_affine.dtype,
        input_activation=ref.activation_args(input_activation), pooled=pool is not None,
        x_strides=_strides(x), y_strides=_strides(y), w_strides=_strides(weight),
        residual_strides=_strides(residual), allow_tf32=allow_tf32)
    launch(p, cfg, dict(x=x, w=weight, bias=bias, res=residual, y=y, scale=input_scale,
                        affine=input_affine, pool=pool), n)


def launch(p: Conv2dProblem, cfg: Conv2dConfig, tensors: dict, n) -> None:
    """kernels.conv2d._run through wrap_triton: the conv kernel (and its split-K sum) for
    problem `p`, made at batch_bound(n), on `tensors` (as kernels.conv2d._run takes them,
    y the destination), at batch n (an int or a symbolic size). The scalar plan (cached on
    concrete problems) is made at the largest batch, which fixes the 64-bit indexing choice
    for every batch; the batch-dependent values (the kernel's batch, the grids, the split-K
    workspace) follow n."""
    x, y = tensors["x"], tensors["y"]
    oh, ow = p.out_hw
    m, k = n * oh * ow, p.k
    p, cfg, t, dot_fp32 = prepare(p, cfg, tensors, m)
    args, constexprs, _, reduce = arguments(p, cfg, x.dtype, t, dot_fp32)
    kwargs = dict(zip(_conv2d_kernel.arg_names, args))
    kwargs["N"] = n
    kwargs.update(constexprs)
    # the launch grid of kernels.conv2d_args._plan, from the real batch
    grid = ((m + cfg.block_m - 1) // cfg.block_m * ((k + cfg.block_n - 1) // cfg.block_n),
            cfg.split_k)
    wrap_triton(_conv2d_kernel)[grid](**kwargs)
    if reduce is not None:
        r_kwargs = dict(zip(_splitk_reduce_kernel.arg_names, reduce[0]))
        r_kwargs["M"] = m
        r_kwargs.update(reduce[1])
        bm, bn = REDUCE_BLOCK
        r_grid = ((m + bm - 1) // bm, (k + bn - 1) // bn)
        wrap_triton(_splitk_reduce_kernel)[r_grid](**r_kwargs)
    if dot_fp32:
        y.copy_(t["y"])


def runs_kernel(x: torch.Tensor) -> bool:
    """Whether the op launches the kernel (CUDA, or a real CPU tensor under the interpreter
    with CNNFUSE_BACKEND=triton, as the cnnfuse ops do) rather than the reference."""
    real = type(x) is torch.Tensor  # not a fake or functional tensor of a trace
    return x.device.type == "cuda" or (
        real and triton_interpreting() and requested_backend() == "triton")


def launching(x: torch.Tensor):
    """Around a launch on real tensors: a kernel compiled inside a CUDA graph capture may
    load (as the cnnfuse ops' own launches)."""
    return relaxed_capture() if type(x) is torch.Tensor else contextlib.nullcontext()


def _compute(x, weight, bias, stride, padding, dilation, groups, activation, residual,
             input_scale, input_affine, input_activation, config, allow_tf32, y, pool):
    """y (and pool) from the kernel on CUDA (or the interpreter), else from the reference."""
    from .conv2d import plan
    plan(x, weight, bias, stride, padding, dilation, groups, activation, residual,
         input_scale, input_affine, input_activation)
    if len(padding) != 4:
        raise ValueError(f"padding must be (left, right, top, bottom), got {list(padding)!r}")
    cfg = config_of(config)
    if runs_kernel(x):
        if x.stride(1) != 1 and x.shape[1] > 1:  # as ops.conv2d._run: the kernel is NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
        with launching(x):
            _launch(x, weight, bias, residual, y, stride, padding, dilation, activation,
                    input_scale, input_affine, input_activation, pool, cfg, allow_tf32)
        return y
    out = ref.conv2d(x, weight, bias, stride, padding, dilation, groups, activation, residual,
                     input_scale, input_affine, input_activation)
    y.copy_(out)
    if pool is not None:
        pool.copy_(y.float().mean((2, 3)))
    return y


def _output(x, weight, stride, padding, dilation):
    from .conv2d import output_hw
    oh, ow = output_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@triton_op("cnnfuse::conv2d_triton", mutates_args=())
def conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  activation: str, residual: Optional[torch.Tensor],
                  input_scale: Optional[torch.Tensor], input_affine: Optional[torch.Tensor],
                  input_activation: str, config: list[int], allow_tf32: bool) -> torch.Tensor:
    """cnnfuse::conv2d computed by the Triton conv at one tile config: a new channels_last
    (N, K, OH, OW) tensor in x's dtype. padding is (left, right, top, bottom). Raises
    ValueError for arguments cnnfuse::conv2d rejects and for a malformed config."""
    y = _output(x, weight, stride, padding, dilation)
    return _compute(x, weight, bias, stride, padding, dilation, groups, activation, residual,
                    input_scale, input_affine, input_activation, config, allow_tf32, y, None)


@triton_op("cnnfuse::conv2d_triton_pooled", mutates_args=())
def conv2d_triton_pooled(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         stride: list[int], padding: list[int], dilation: list[int],
                         groups: int, activation: str, residual: Optional[torch.Tensor],
                         input_scale: Optional[torch.Tensor],
                         input_affine: Optional[torch.Tensor], input_activation: str,
                         config: list[int], allow_tf32: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """cnnfuse::conv2d_pooled by the Triton conv at one tile config: (y, pooled), pooled
    (N, K) float32 the mean of y over height and width, summed in the kernel's epilogue."""
    y = _output(x, weight, stride, padding, dilation)
    pool = torch.zeros((x.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)
    _compute(x, weight, bias, stride, padding, dilation, groups, activation, residual,
             input_scale, input_affine, input_activation, config, allow_tf32, y, pool)
    return y, pool


@triton_op("cnnfuse::conv2d_triton_into", mutates_args=("out",))
def conv2d_triton_into(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       stride: list[int], padding: list[int], dilation: list[int],
                       groups: int, activation: str, residual: Optional[torch.Tensor],
                       input_scale: Optional[torch.Tensor],
                       input_affine: Optional[torch.Tensor], input_activation: str,
                       config: list[int], allow_tf32: bool, out: torch.Tensor,
                       out_channel_offset: int) -> None:
    """cnnfuse::conv2d_into by the Triton conv at one tile config: y written into channels
    [out_channel_offset, + K) of out (N, C_total, OH, OW)."""
    from . import _check
    from .conv2d import plan
    *_, shape = plan(x, weight, bias, stride, padding, dilation, groups, activation, residual,
                     input_scale, input_affine, input_activation)
    _check.out_slice(out, x, shape, out_channel_offset)
    y = out.narrow(1, out_channel_offset, weight.shape[0])
    _compute(x, weight, bias, stride, padding, dilation, groups, activation, residual,
             input_scale, input_affine, input_activation, config, allow_tf32, y, None)


@register_flop_formula([torch.ops.cnnfuse.conv2d_triton, torch.ops.cnnfuse.conv2d_triton_into,
                        torch.ops.cnnfuse.conv2d_triton_pooled])
def _(x, weight, bias, stride, padding, dilation, *rest, out_shape=None, **kwargs):
    from .conv2d import conv_flops
    return conv_flops(x, weight, stride, padding, dilation)  # as for cnnfuse::conv2d


# The three ops in the order of the cnnfuse ops they stand for (conv2d, conv2d_pooled,
# conv2d_into): cnnfuse.export maps one to the other.
OPS = {"conv2d": torch.ops.cnnfuse.conv2d_triton.default,
       "conv2d_pooled": torch.ops.cnnfuse.conv2d_triton_pooled.default,
       "conv2d_into": torch.ops.cnnfuse.conv2d_triton_into.default}

__all__ = ["CONFIG_FIELDS", "OPS", "batch_bound", "config_list", "config_of",
           "conv2d_triton", "conv2d_triton_into", "conv2d_triton_pooled", "launch",
           "launching", "runs_kernel"]
