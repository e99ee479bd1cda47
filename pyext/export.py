"""cnnfuse.export: a fused model as a torch.export program (.pt2), for torch.export.load,
torch.compile and AOTInductor, with its batch dimension dynamic where the model allows.

Where the autotuner picked a Triton config for a conv (or a separable conv, or a pool
projection) on a CUDA tensor, the program calls cnnfuse::conv2d_triton (separable_conv2d_triton,
pool_conv2d_triton: torch.library triton_ops, ops/triton_conv2d.py and
ops/triton_window_conv2d.py) with that config instead of the opaque op: torch.compile and
AOTInductor then see the Triton kernel itself, and an AOTInductor package carries its
compiled binary. Every other op stays a call by name, dispatched when the program runs."""
import contextlib
import json
import os
import warnings
from typing import Optional, Union

import torch
import torch.export
from torch import nn

from .backend import log, requested_backend
from .tune import _as_inputs, current_picks, environment, with_batch

PathLike = Union[str, os.PathLike]

# torch.export.save says this of every tensor that is not contiguous in the default (NCHW)
# sense, channels_last weights included, although it then stores the tensor's whole storage
# and its strides, which is exact when the tensor covers that storage densely; _own_storage
# makes every saved tensor do so.
_PARTIAL_STORAGE_WARNING = "No complete tensor found in the group"


def export(fused: nn.Module, example_inputs, path: PathLike, *,
           dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """Write `fused` as a torch.export program to `path` (a .pt2) and return the program.

    example_inputs: a tensor or tuple of tensors as `fused` takes them. With dynamic_batch,
    dim 0 of every input is one symbolic batch size (an example batch of 1 is traced at 2 so
    it stays symbolic); a model that fixes its batch is exported at the example's, with a log
    line. The program calls the cnnfuse ops by name (torch.ops.cnnfuse.*): a process that runs
    it needs cnnfuse imported, e.g. `torch.export.load(path).module()`, torch.compile on it,
    or torch._inductor.aoti_compile_and_package. Only load .pt2 files you trust:
    torch.export.load may unpickle (cnnfuse.save / cnnfuse.load never do).

    Convs on CUDA tensors whose autotuner pick (from cnnfuse.tune on this model, a picks
    file, the autotune cache, or CNNFUSE_BACKEND=triton's untimed default) is a Triton config
    are written as cnnfuse::conv2d_triton calls at that config: the pick made for the
    example's batch size serves every batch of the program, so tune at the batch you serve.

    The .pt2 stores each weight once, in its memory layout (channels_last stays so); a
    parameter that is a view into a wider tensor is stored as a dense copy of its elements.

    Raises TypeError for a non-module or non-tensor inputs.
    """
    if not isinstance(fused, nn.Module):
        raise TypeError(f"fused must be a torch.nn.Module, got {type(fused).__name__}")
    inputs = _as_inputs(example_inputs)
    with _dense_weights(fused):
        program = _trace(fused, inputs, dynamic_batch)
    picks = current_picks()
    for op, table in (fused.__dict__.get("_cnnfuse_picks") or {}).items():
        picks[op] = {**picks.get(op, {}), **table}
    use_triton_ops(program, inputs[0].shape[0], picks)
    _own_storage(program)
    doc = {"format": "cnnfuse-picks", "version": 1, "environment": environment(),
           "picks": picks}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PARTIAL_STORAGE_WARNING)
        torch.export.save(program, path, extra_files={"cnnfuse_picks.json": json.dumps(doc)})
    return program


def _trace(fused: nn.Module, inputs: tuple, dynamic_batch: bool):
    program = None
    if dynamic_batch:
        batch = max(2, inputs[0].shape[0])
        traced = tuple(with_batch(t, batch) for t in inputs)
        dim = torch.export.Dim("batch", min=1, max=1 << 20)
        try:
            program = torch.export.export(fused, traced, dynamic_shapes=tuple({0: dim}
                                                                             for _ in traced))
        except Exception as exc:  # export raises several types for a specialised dim
            log.warning("cnnfuse.export: the batch size stays %d (the model fixes it: %s)",
                        inputs[0].shape[0], str(exc).splitlines()[0][:200] if str(exc) else
                        type(exc).__name__)
    if program is None:
        program = torch.export.export(fused, inputs)
    return program


# ------------------------------------------------------------------- Triton picks as ops

def use_triton_ops(program: "torch.export.ExportedProgram", batch: int,
                   picks: Optional[dict] = None) -> int:
    """Rewrite, in place, each cnnfuse::conv2d (conv2d_into, conv2d_pooled),
    separable_conv2d(_into) and pool_conv2d(_into) call of `program` on CUDA tensors whose
    autotuner pick at batch size `batch` is a Triton config into the matching triton_op
    (cnnfuse::conv2d_triton, ...) at that config; returns how many were rewritten.
    picks: {op: {autotuner key: candidate}} (default: this process's, see cnnfuse.tune)."""
    from .ops import triton_conv2d, triton_window_conv2d
    picks = current_picks() if picks is None else picks
    targets = {**triton_conv2d.OPS, **triton_window_conv2d.OPS}
    sources = {getattr(torch.ops.cnnfuse, name).default: name for name in targets}
    caches, calls, rewritten = {}, 0, 0
    symbols = list(program.range_constraints)
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in sources:
            continue
        calls += 1
        name = sources[node.target]
        args = _named_args(node)
        x = args["x"].meta.get("val") if isinstance(args["x"], torch.fx.Node) else None
        if x is None or x.device.type != "cuda":
            continue
        family = name.replace("_into", "").replace("_pooled", "")
        if family not in caches:
            caches[family] = _autotune_cache(family)
        cfg = _triton_config(name, family, args, symbols, batch, picks.get(family, {}),
                             caches[family])
        if cfg is None:
            continue
        schema = node.target._schema.arguments
        head = [a.name for a in schema if a.name not in ("out", "out_channel_offset")]
        tail = [a.name for a in schema if a.name in ("out", "out_channel_offset")]
        node.target = targets[name]
        node.args = (tuple(args[a] for a in head)
                     + (triton_conv2d.config_list(cfg), bool(args["allow_tf32"]))
                     + tuple(args[a] for a in tail))
        node.kwargs = {}
        rewritten += 1
    if rewritten:
        program.graph_module.recompile()
    if calls:
        log.info("cnnfuse.export: %d of %d conv calls run the Triton kernel at their tuned "
                 "config (visible to torch.compile and AOTInductor); the rest call the cnnfuse "
                 "ops by name", rewritten, calls)
    return rewritten


def _named_args(node) -> dict:
    """The call's arguments by schema name, defaults filled in; allow_tf32 as it stands now
    (the float32 dot's precision is part of the pick's key)."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value
    out["allow_tf32"] = torch.backends.cudnn.allow_tf32
    return out


def _autotune_cache(op: str) -> dict:
    """The op's autotuner table on disk for this GPU and these versions ({} without one)."""
    if not torch.cuda.is_available():
        return {}
    from . import autotune
    return autotune.Autotuner(op)._load()


def _concrete(value, symbols, batch):
    """A meta tensor with value's shape, strides and dtype at batch size `batch` (value a fake
    tensor of the trace, maybe with a symbolic batch); None stays None."""
    if value is None:
        return None
    v = value.meta["val"]

    def size(d):
        if isinstance(d, int):
            return d
        return int(d.node.expr.xreplace({s: batch for s in symbols}))
    return torch.empty_strided([size(d) for d in v.shape], [size(s) for s in v.stride()],
                               dtype=v.dtype, device="meta")


def _nhwc(t):
    """t in the layout the cnnfuse ops give their input on CUDA before they name the call."""
    if t is not None and t.stride(1) != 1 and t.shape[1] > 1:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _triton_config(name: str, family: str, args: dict, symbols, batch: int, picks: dict,
                   cache: dict):
    """The Triton config the op's autotuner would run for this call at `batch` (its pick,
    from `picks`, else the on-disk `cache`; with CNNFUSE_BACKEND=triton and neither, the
    untimed default), or None. The key is the one the op's implementation names the call by
    (ops/conv2d.py's _run and run_pair, the window ops' key functions)."""
    from .kernels.conv2d_configs import Conv2dProblem, candidate_configs, default_config
    from .ops.conv2d import _key, output_hw
    from .ops.depthwise_conv2d import is_depthwise

    def meta(k):
        return _concrete(args[k], symbols, batch)
    x, weight, bias, residual = _nhwc(meta("x")), meta("weight"), meta("bias"), meta("residual")
    dest = None
    if name.endswith("_into"):
        dest = meta("out").narrow(1, args["out_channel_offset"], weight.shape[0])
    if family == "conv2d":
        groups = args["groups"]
        if is_depthwise(x, weight, groups):
            return None  # the Triton conv is never a depthwise candidate
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
        stride, padding, dilation = (list(args[k]) for k in ("stride", "padding", "dilation"))
        affine = args["input_affine"] is not None
        key = (_key(x, weight, bias, stride, padding, dilation, groups, args["activation"],
                    residual, dest)
               + f" scale={args['input_scale'] is not None} "
               f"affine={args['input_activation'] if affine else None}"
               + (" pool" if name == "conv2d_pooled" else ""))
        problem = Conv2dProblem.of_conv(tuple(x.shape), tuple(weight.shape), stride, padding,
                                        dilation, groups)
        options = dict(dtype=x.dtype)
    else:
        if family == "separable_conv2d":
            dw = meta("dw_weight")
            window = (dw.shape[2:], args["dw_stride"], args["dw_padding"], args["dw_dilation"])
            key = (_key(x, dw, meta("dw_bias"), args["dw_stride"], args["dw_padding"],
                        args["dw_dilation"], x.shape[1], args["dw_activation"], None, dest)
                   + f" | pw w{list(weight.shape)} {args['activation']} "
                     f"bias={bias is not None} res={residual is not None}")
        else:
            window = (args["kernel_size"], args["stride"], args["padding"], (1, 1))
            key = (_key(x, weight, bias, args["stride"], args["padding"], (1, 1), 1,
                        args["activation"], residual, dest)
                   + f" | {args['pool_mode']} pool {list(args['kernel_size'])}")
        oh, ow = output_hw(x.shape[2], x.shape[3], *window)
        problem = x.shape[0] * oh * ow  # as run_pair names the GEMM
        options = dict(k=weight.shape[0], c=x.shape[1], dtype=x.dtype,
                       taps=window[0][0] * window[0][1])
    pick = picks.get(key) or cache.get(key, {}).get("best")
    if pick is None:
        if requested_backend() != "triton":
            return None
        return default_config(problem, **options)  # what the op runs untimed
    if not pick.startswith("triton_"):
        return None
    for cfg in candidate_configs(problem, **options) + [default_config(problem, **options)]:
        if cfg.name == pick:
            return cfg
    log.warning("cnnfuse.export: the pick %s for %s is not a config of this cnnfuse; that "
                "call stays cnnfuse::%s", pick, key, name)
    return None


# ------------------------------------------------------------------------- storage

def _dense_over_storage(t: torch.Tensor) -> bool:
    """t's elements fill its storage from its first byte to its last, once each."""
    if t.storage_offset() != 0:
        return False
    dims = sorted((st, d) for st, d in zip(t.stride(), t.shape) if d != 1)
    expected = 1
    for st, d in dims:
        if st != expected:
            return False
        expected *= d
    return t.numel() * t.element_size() == t.untyped_storage().nbytes()


@contextlib.contextmanager
def _dense_weights(fused: nn.Module):
    """While the model is traced, each parameter or buffer that is a view with gaps, or a
    part of a wider storage, is replaced by a dense copy in the same dim order (tied ones by
    one copy): the program then holds, and the .pt2 stores, exactly its elements. The model
    gets its own tensors back afterwards."""
    copies, swapped = {}, []
    for m in fused.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or _dense_over_storage(t) or _is_fake(t) or _overlapping(t):
                    continue
                if id(t) not in copies:
                    with torch.no_grad():
                        own = t.detach().clone(memory_format=torch.preserve_format)
                    if isinstance(t, nn.Parameter):
                        own = nn.Parameter(own, requires_grad=t.requires_grad)
                    copies[id(t)] = own
                swapped.append((table, name, t))
                table[name] = copies[id(t)]
    try:
        yield
    finally:
        for table, name, t in swapped:
            table[name] = t


def _own_storage(program: "torch.export.ExportedProgram") -> None:
    """Give every weight and constant of `program` that shares or does not fill its storage a
    storage of its own, with the same shape, strides, dtype and device, so that the .pt2
    stores exactly its bytes. Tied tensors stay one tensor."""
    copies = {}
    for table in (program.state_dict, program.constants):
        for name, t in list(table.items()):
            if not isinstance(t, torch.Tensor) or _dense_over_storage(t) or \
                    t.device.type == "meta" or _is_fake(t) or _overlapping(t):
                continue  # an expanded tensor keeps its strides: the graph was traced so
            if id(t) not in copies:
                with torch.no_grad():
                    own = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                              device=t.device)
                    own.copy_(t)
                if isinstance(t, nn.Parameter):
                    own = nn.Parameter(own, requires_grad=t.requires_grad)
                copies[id(t)] = own
            table[name] = copies[id(t)]


def _overlapping(t: torch.Tensor) -> bool:
    return any(st == 0 and d > 1 for st, d in zip(t.stride(), t.shape))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)
