"""cnnfuse.tune: run the autotuner over every op of a fused model ahead of time, and keep the
picks in a file that travels with the model.

    report = cnnfuse.tune(fast, x, batch_sizes=(1, 64), save="resnet50.picks.json")
    fast = cnnfuse.fuse(model, picks="resnet50.picks.json")  # in another process
    # or: CNNFUSE_PICKS=resnet50.picks.json python serve.py

A picks file names the GPU, its compute capability and the cnnfuse, torch and triton versions
it was made with; a file made anywhere else is ignored as a whole, with a log line, because a
tile that won on one GPU or compiler may lose (or not compile) on another. Each pick's key
also holds the dtype, shape and layout of its call, so a pick made for float16 never serves a
bfloat16 call. Picks are process-wide, as the autotuner is: they apply to every model the
process runs, and are consulted before the on-disk cache.
"""
import collections
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from . import autotune
from .backend import log, tracing

PICKS_FORMAT = "cnnfuse-picks"
PICKS_VERSION = 1
PathLike = Union[str, os.PathLike]


def environment() -> dict:
    """What a pick depends on besides its call: the device and the versions of everything
    that compiles or dispatches a kernel."""
    import triton
    from . import __version__
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        device, capability = "cpu", None
    return {"device": device, "capability": capability, "cnnfuse": __version__,
            "torch": torch.__version__, "triton": triton.__version__}


@dataclass
class TuneReport:
    """What `tune` did: the picks per op (autotuner key -> candidate name), per op kind how
    many shapes each backend won (and, for calls that report it, which backend ran), and the
    input shapes it ran."""
    picks: dict = field(default_factory=dict)
    ran: dict = field(default_factory=dict)  # op -> Counter(backend label)
    shapes: list = field(default_factory=list)
    device: str = "cpu"

    def __str__(self) -> str:
        lines = [f"cnnfuse.tune on {self.device}: {len(self.shapes)} input shape(s) "
                 f"{', '.join(map(str, self.shapes))}"]
        if not self.picks:
            lines.append("  nothing to tune on this device: the ops run their reference, "
                         "interpreter or CPU-build path; picks are made on a CUDA GPU")
        for op in sorted(self.ran):
            counts = ", ".join(f"{name} x{n}" for name, n in self.ran[op].most_common())
            tuned = len(self.picks.get(op, {}))
            lines.append(f"  {op}: {counts}" + (f" ({tuned} shape(s) tuned)" if tuned else ""))
        return "\n".join(lines)


def _as_inputs(example_inputs) -> tuple:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors, got "
                        f"{type(example_inputs).__name__}")
    if any(t.dim() == 0 for t in inputs):
        raise ValueError("example_inputs: every input needs a batch dimension (dim 0)")
    return inputs


def with_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """t with `batch` rows along dim 0 (the rows repeated or cut), in t's memory format."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 0:
        raise ValueError("example_inputs: an input with batch 0 cannot be resized")
    # rows i -> t[i % n] by tiling: ops on t alone, so a fake tensor (export on fake CUDA
    # tensors) stays fake
    tiles = -(-batch // t.shape[0])
    out = t.repeat(tiles, *[1] * (t.dim() - 1)).narrow(0, 0, batch)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def tune(fused: nn.Module, example_inputs, *, batch_sizes: Optional[Iterable[int]] = None,
         save: Optional[PathLike] = None) -> TuneReport:
    """Run `fused` once per input shape so the autotuner times every op now, not on the
    first real calls; returns a TuneReport (print it for a summary per op kind).

    example_inputs: a tensor or tuple of tensors as `fused` takes them (e.g. (N, 3, H, W),
    channels_last, the model's dtype and device). batch_sizes: the batch sizes to tune for
    (the inputs' rows repeated or cut along dim 0); default: the inputs' own. save: a path to
    write the picks to (JSON), for `fuse(..., picks=PATH)`, `cnnfuse.use_picks(PATH)` or
    CNNFUSE_PICKS=PATH.

    After it a CUDA graph capture runs tuned kernels. On the CPU it still runs the model
    (there is nothing to time there: the report says so) and a saved file holds no picks.
    Raises TypeError for a non-module or non-tensor inputs, ValueError for a batch size < 1.
    """
    if not isinstance(fused, nn.Module):
        raise TypeError(f"fused must be a torch.nn.Module, got {type(fused).__name__}")
    inputs = _as_inputs(example_inputs)
    sizes = [inputs[0].shape[0]] if batch_sizes is None else list(batch_sizes)
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                            for b in sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    env = environment()
    report = TuneReport(device=env["device"])
    ran = collections.defaultdict(collections.Counter)
    bar = autotune.progress("cnnfuse.tune") if sys.stderr.isatty() else contextlib.nullcontext()
    for m in fused.modules():
        # A fused module's eager plans hold the backend it chose per call signature; dropped,
        # every op asks the autotuner again, which records its pick (the cache answers fast).
        m.__dict__.pop("_eager_plans", None)
    outer, autotune.recording = autotune.recording, {}
    try:
        with bar, torch.no_grad():
            for b in sizes:
                batch = tuple(with_batch(t, b) for t in inputs)
                with tracing() as calls:
                    fused(*batch)
                for op, backend in calls:
                    ran[op][backend] += 1
                report.shapes.append(tuple(batch[0].shape))
        report.picks = autotune.recording
    finally:
        autotune.recording = outer
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    from .ops.conv2d import backend_label
    for op, table in report.picks.items():
        ran[op].update(backend_label(name) for name in table.values())
    report.ran = dict(ran)
    fused.__dict__["_cnnfuse_picks"] = report.picks  # cnnfuse.save writes them with the model
    log.info("%s", report)
    if save is not None:
        save_picks(report.picks, save, env)
    return report


def save_picks(picks: dict, path: PathLike, env: Optional[dict] = None) -> None:
    """Write picks ({op: {key: candidate}}) as a picks file keyed by this environment."""
    doc = {"format": PICKS_FORMAT, "version": PICKS_VERSION, "environment": env or environment(),
           "picks": picks}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)  # readers never see half a file


def read_picks(source: Union[PathLike, dict], *, what: str = "picks file") -> dict:
    """The picks of a picks file (a path or its parsed JSON) if it was made in this
    environment, else {} with a log line saying why. Raises ValueError for a file that is not
    a picks file."""
    if isinstance(source, dict):
        doc, name = source, what
    else:
        name = f"{what} {source}"
        try:
            doc = json.loads(Path(source).read_text())
        except OSError as exc:
            raise ValueError(f"{name}: cannot be read ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{name}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != PICKS_FORMAT:
        raise ValueError(f"{name}: not a cnnfuse picks file")
    if doc.get("version") != PICKS_VERSION:
        log.warning("cnnfuse: %s has picks format version %r, this cnnfuse reads %d; ignored",
                    name, doc.get("version"), PICKS_VERSION)
        return {}
    here, there = environment(), doc.get("environment")
    if there != here:
        diff = ", ".join(f"{k} {there.get(k)!r} (here {here[k]!r})" for k in here
                         if not isinstance(there, dict) or there.get(k) != here[k])
        log.warning("cnnfuse: %s was made elsewhere: %s; its picks are ignored", name, diff)
        return {}
    picks = doc.get("picks")
    if not isinstance(picks, dict) or not all(
            isinstance(table, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in table.items())
            for table in picks.values()):
        raise ValueError(f"{name}: 'picks' must map op names to {{key: candidate}} tables")
    return picks


def use_picks(source: Union[PathLike, dict, None]) -> int:
    """Make the autotuner consult these picks (a picks file's path or parsed JSON) before its
    cache, in this process; None clears them. Returns how many picks were taken: 0 when the
    file was made on another GPU or with other versions (a log line says so)."""
    picks = {} if source is None else read_picks(source)
    base = autotune.preset if autotune.preset is not None else picks_from_environment()
    merged = {} if source is None else dict(base)
    for op, table in picks.items():
        merged[op] = {**merged.get(op, {}), **table}
    autotune.preset = merged
    return sum(len(t) for t in picks.values())


def picks_from_environment() -> dict:
    """The picks of CNNFUSE_PICKS (a path), or {}; what the autotuner starts with. A file that
    cannot be read is reported once and ignored, never fatal to the op that asked."""
    path = os.environ.get("CNNFUSE_PICKS")
    if not path:
        return {}
    try:
        return read_picks(path, what="CNNFUSE_PICKS file")
    except ValueError as exc:
        log.warning("cnnfuse: %s; ignored", exc)
        return {}


def current_picks() -> dict:
    """The picks loaded in this process (from a file or CNNFUSE_PICKS), {op: {key: name}}."""
    if autotune.preset is None:
        autotune.preset = picks_from_environment()
    return {op: dict(t) for op, t in autotune.preset.items()}


__all__ = ["TuneReport", "current_picks", "environment", "read_picks", "save_picks", "tune",
           "use_picks"]
