"""Per-op profile of a fused model: `python -m cnnfuse.bench.profile --model resnet50 --batch 256`.

One eager forward of the fused model runs under a dispatch mode that records every op it
calls (cnnfuse's fused ops and whatever PyTorch ops remain: pools, the classifier, concats),
the module that called it, and the backend that ran it. Each distinct op (same function,
shapes, strides and arguments) is then timed alone in a CUDA graph on fresh random inputs of
the same layout, and the table lists them by total time with their roofline floor and share
of the whole model's time (also timed in one CUDA graph): the top line is the next kernel
worth writing. Writes JSON (the report draws its roofline chart from it) and prints the table.
Without a GPU it profiles the CPU path at a small batch and says so.
"""
import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry

from .. import backend
from . import zoo

# Ops that launch no kernel worth timing (allocation without a fill).
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "detach", "lift_fresh"}


class _Spec(NamedTuple):
    """A tensor argument by layout, not value: what timing depends on."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: str

    def fresh(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return t.normal_() if t.is_floating_point() else t.zero_()


@dataclass
class Op:
    name: str                       # the module that first called it
    what: str                       # what it computes, shapes included
    backend: str
    flops: float                    # per call
    bytes: float                    # per call: tensors read once, results and destinations written
    calls: int = 1
    ms_per_call: float = float("nan")
    modules: list = field(default_factory=list)

    @property
    def ms(self) -> float:
        return self.ms_per_call * self.calls

    @property
    def floor_ms(self) -> float:
        return max(self.flops / zoo.PEAK_FLOPS, self.bytes / zoo.PEAK_BYTES) * 1e3


def _leaf_key(leaf) -> Any:
    if isinstance(leaf, torch.Tensor):
        return _Spec(tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, str(leaf.device))
    return leaf if isinstance(leaf, (int, float, bool, str, type(None), torch.dtype)) else repr(leaf)


def _describe(func, args, out) -> str:
    name = func.__name__.split(".")[0]
    if func.namespace == "cnnfuse" and name.startswith(("conv2d", "depthwise_conv2d")):
        x, w, _, stride, _, dilation, *rest = args
        groups = rest[0] if name.startswith("conv2d") else x.shape[1]
        act = rest[1] if name.startswith("conv2d") and not name.endswith("cudnn") else rest[0]
        act = act if isinstance(act, str) else {0: "none"}.get(act, f"act{act}")
        kind = "dwconv" if groups == x.shape[1] and w.shape[1] == 1 else "conv"
        text = (f"{kind} {w.shape[2]}x{w.shape[3]}/{stride[0]} {x.shape[1]}→{w.shape[0]} "
                f"@{x.shape[2]}x{x.shape[3]}")
        if groups > 1 and kind == "conv":
            text += f" g{groups}"
        if dilation[0] > 1:
            text += f" d{dilation[0]}"
        if act != "none":
            text += f" {act}"
        if name.startswith("conv2d") and len(rest) > 2 and rest[2] is not None:
            text += " +res"
        prologue = name in ("conv2d", "conv2d_into", "conv2d_pooled")
        if prologue and rest[4] is not None:
            text = text.replace(f" {x.shape[1]}→", f" bn+{rest[5]}({x.shape[1]})→", 1)
        if prologue and rest[3] is not None:
            text += " ·se"
        if name == "conv2d_pooled" or (name == "depthwise_conv2d" and len(rest) > 3
                                       and rest[3] is not None):
            text += " →pool"
        if name == "conv2d_into":
            step = rest[6].stride(1)
            text += " →slice" if step == 1 else f" →slice, channel step {step}"
        return text
    if func.namespace == "cnnfuse" and name.startswith("separable_conv2d"):
        x, dw, _, stride, _, _, dw_act, w, _, act = args[:10]
        text = (f"dw {dw.shape[2]}x{dw.shape[3]}/{stride[0]} {dw_act} + 1x1 "
                f"{x.shape[1]}→{w.shape[0]} @{x.shape[2]}x{x.shape[3]} {act}")
        text += " +res" if args[10] is not None else ""
        return text + (" →slice" if name.endswith("_into") else "")
    if func.namespace == "cnnfuse" and name.startswith("pool_conv2d"):
        x, mode, window, stride, _, w, _, act = args[:8]
        text = (f"{mode} pool {window[0]}x{window[1]}/{stride[0]} + 1x1 "
                f"{x.shape[1]}→{w.shape[0]} @{x.shape[2]}x{x.shape[3]} {act}")
        return text + (" →slice" if name.endswith("_into") else "")
    if func.namespace == "cnnfuse" and name == "se_gate":
        return f"se gate {args[0].shape[1]}→{args[1].shape[0]}→{args[0].shape[1]}"
    shapes = sorted((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)),
                    key=len, reverse=True)  # the activation, not a bias
    return f"{name} {shapes[0] if shapes else ''}".strip()


def _library_backend(func, device: str) -> str:
    if device != "cuda":
        return "PyTorch (CPU)"
    name = func.__name__.split(".")[0]
    if "convolution" in name or name.startswith("cudnn"):
        return "PyTorch (cuDNN)"
    if name in ("mm", "addmm", "bmm", "linear", "matmul"):
        return "PyTorch (cuBLAS)"
    return "PyTorch"


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class _Recorder(TorchDispatchMode):
    def __init__(self, scope: list):
        super().__init__()
        self.scope = scope
        self.ops: dict = {}  # key -> (Op, func, flat args, treespec)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with backend.tracing() as trace:
            out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        mutated = [a for a, arg in zip(args, func._schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.is_write
                   and isinstance(a, torch.Tensor)]
        # A destination (`out`, copy_'s self) is written, not read.
        write_only = [a for a, arg in zip(args, func._schema.arguments)
                      if any(a is m for m in mutated) and (arg.name == "out" or name == "copy_")]
        if func.is_view or name in _NO_KERNEL or not (outs or mutated):
            return out
        flat, tree = tree_flatten((args, kwargs))
        key = (func, str(tree), tuple(_leaf_key(leaf) for leaf in flat))
        module = self.scope[-1] if self.scope else "(model)"
        if key in self.ops:
            op = self.ops[key][0]
            op.calls += 1
            op.modules.append(module)
            return out
        inputs = [t for t in flat if isinstance(t, torch.Tensor)]
        read = [t for t in inputs if not any(t is w for w in write_only)]
        formula = flop_registry.get(func._overloadpacket)
        device = inputs[0].device.type if inputs else "cpu"
        if func.namespace == "cnnfuse":
            label = trace[0][1] if trace else ("CUDA C++" if device == "cuda"
                                               else "C++ (CPU build)")
        else:
            label = _library_backend(func, device)
        op = Op(name=module, what=_describe(func, args, out), backend=label,
                flops=float(formula(*args, **kwargs, out_val=out)) if formula else 0.0,
                bytes=float(_nbytes(read) + _nbytes(o for o in outs
                                                    if not any(o is i for i in inputs))
                            + _nbytes(mutated)), modules=[module])
        self.ops[key] = (op, func, [_leaf_key(leaf) for leaf in flat], tree)
        return out


def record(model: nn.Module, x: torch.Tensor) -> list:
    """Every distinct op one forward of `model` runs, in first-call order, not yet timed."""
    scope, handles = [], []

    def leave(module, args, out):  # returns None: a hook's return value would replace `out`
        scope.pop()
    for qualname, module in model.named_modules():
        if qualname:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, q=qualname: scope.append(q)))
            handles.append(module.register_forward_hook(leave))
    recorder = _Recorder(scope)
    try:
        with torch.no_grad(), recorder:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return list(recorder.ops.values())


def _median_ms(fn: Callable[[], Any], cuda: bool, iters: int) -> float:
    if cuda:
        from .timing import graph_callable, median_ms
        try:
            return median_ms(graph_callable(fn), iters=iters)
        except RuntimeError as exc:  # an op that cannot be captured is timed eagerly
            backend.warn_once(f"profile: timing without a CUDA graph ({exc})")
            return median_ms(fn, iters=iters)
    fn()
    times = []
    for _ in range(max(3, iters // 10)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _time_alone(func, leaves: list, tree, cuda: bool, iters: int) -> float:
    """One op on fresh inputs of the recorded layout, freed when it returns."""
    args, kwargs = tree_unflatten([leaf.fresh() if isinstance(leaf, _Spec) else leaf
                                   for leaf in leaves], tree)
    return _median_ms(lambda: func(*args, **kwargs), cuda, iters)


@torch.no_grad()
def profile(model: nn.Module, x: torch.Tensor, iters: int = 50) -> tuple[list, float]:
    """(ops sorted by total time, whole-model ms) for a fused model on x's device."""
    cuda = x.device.type == "cuda"
    recorded = record(model, x)
    ops = []
    for op, func, leaves, tree in recorded:
        op.ms_per_call = _time_alone(func, leaves, tree, cuda, iters)
        ops.append(op)
    total = _median_ms(lambda: model(x), cuda, iters)
    return sorted(ops, key=lambda o: -o.ms), total


def table(ops: list, total_ms: float, top: int, whole: str = "in one CUDA graph") -> str:
    rows = [f"{'#':>3} {'ms':>8} {'share':>6} {'calls':>5}  {'floor ms':>8} {'of floor':>8} "
            f"{'TFLOP/s':>8}  {'backend':<36} op"]
    for i, op in enumerate(ops[:top], 1):
        tflops = op.flops / (op.ms_per_call * 1e-3) / 1e12 if op.ms_per_call > 0 else 0.0
        where = op.name + (f" (+{op.calls - 1} more)" if op.calls > 1 else "")
        rows.append(f"{i:>3} {op.ms:>8.3f} {op.ms / total_ms:>6.1%} {op.calls:>5}  "
                    f"{op.floor_ms * op.calls:>8.3f} {op.floor_ms / op.ms_per_call:>8.2f} "
                    f"{tflops:>8.1f}  {op.backend[:36]:<36} {op.what}  [{where}]")
    summed = sum(op.ms for op in ops)
    rows.append(f"{len(ops)} distinct ops, {sum(op.calls for op in ops)} calls; their sum "
                f"alone {summed:.3f} ms, the whole model {whole} {total_ms:.3f} ms")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cnnfuse.bench.profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="torchvision name, or timm/<name>")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--top", type=int, default=25, help="lines of the table (all go to JSON)")
    p.add_argument("--iters", type=int, default=50, help="graph replays per op")
    p.add_argument("--out", default="results", help="folder for the JSON and the roofline PNG")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import json

    import cnnfuse

    from . import report
    from .__main__ import DTYPES
    from .machine import info
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", DTYPES[args.dtype]) if cuda else ("cpu", torch.float32)
    batch = args.batch if cuda else min(args.batch, 2)
    model = zoo.build(args.model)
    fused = cnnfuse.fuse(model, dtype=dtype).to(device)
    x = torch.randn(batch, 3, zoo.input_size(args.model), zoo.input_size(args.model),
                    device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if cuda:
        with cnnfuse.autotune.progress("autotuning conv shapes"), torch.no_grad():
            fused(x)
    ops, total = profile(fused, x, args.iters)
    dtype_name = args.dtype if cuda else "fp32"
    print(f"{args.model}, batch {batch}, {dtype_name}, channels_last, fused by cnnfuse "
          f"({'CUDA graphs' if cuda else 'CPU'})")
    print(table(ops, total, args.top, "in one CUDA graph" if cuda else "in one call"))
    if not cuda:
        print(f"No CUDA GPU: these are CPU timings at batch {batch}; they show the "
              "mechanics, not GPU speed.")
    record = {"kind": "cnnfuse.profile", "machine": info(), "model": args.model,
              "batch": batch, "dtype": dtype_name, "device": device, "total_ms": total,
              "ops": [dict(asdict(op), ms=op.ms, floor_ms=op.floor_ms, share=op.ms / total)
                      for op in ops]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_{args.model.replace('/', '_')}_b{batch}_{dtype_name}.json"
    path.write_text(json.dumps(record, indent=1))
    chart = out / report.roofline_name(record)
    drawn = report.plot_roofline(record, chart)
    print(f"wrote {path}" + (f" and {chart}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
