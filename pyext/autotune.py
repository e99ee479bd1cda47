"""Pick the fastest correct backend per op and shape; remember the pick on disk.

A candidate is timed only after its output has matched the reference once, so a kernel that
is wrong on some GPU or shape is dropped (and said so) instead of winning on speed. The cache
is keyed by GPU name, library versions, dtype and shape; delete the file to re-tune.
"""
import contextlib
import json
import os
import re
import statistics
import threading
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from .backend import log, warn_once

_progress = None  # a tqdm bar while `progress()` is active
_observing = threading.local()  # .lists: this thread's lists collecting its picks (observing())

# Picks from a file that travels with a model (cnnfuse.tune(save=), cnnfuse.use_picks,
# CNNFUSE_PICKS), consulted before the cache; cnnfuse.tune reads and checks the file.
preset: Optional[dict] = None      # op -> {key: candidate}; None until first needed
recording: Optional[dict] = None   # op -> {key: candidate} while cnnfuse.tune runs a model


def cache_dir() -> Path:
    return Path(os.environ.get("CNNFUSE_CACHE_DIR", Path.home() / ".cache" / "cnnfuse"))


def enabled() -> bool:
    return os.environ.get("CNNFUSE_AUTOTUNE", "1") != "0"


class Pick(NamedTuple):
    """One answer of `Autotuner.pick`: final when the same key gets the same answer for as long
    as `preset` is the same object, `recording` is None and CNNFUSE_AUTOTUNE is unchanged (a
    pick made during a CUDA graph capture, or after every candidate failed, is not)."""
    op: str
    key: str
    name: str
    candidate: object  # what candidates[name] was
    final: bool


@contextlib.contextmanager
def observing():
    """Collect a `Pick` for every pick this thread makes inside the block (how a fused
    module's plan learns which backend it may call directly from now on)."""
    seen = []
    lists = _observing.__dict__.setdefault("lists", [])
    lists.append(seen)
    try:
        yield seen
    finally:
        # by identity: list.remove compares by ==, and an outer block's list may equal this one
        for i in range(len(lists) - 1, -1, -1):
            if lists[i] is seen:
                del lists[i]
                break


@contextlib.contextmanager
def progress(description: str):
    """Show a progress bar that counts the shapes tuned inside the block."""
    global _progress
    from tqdm import tqdm
    with tqdm(desc=description, unit=" shape", leave=False) as bar:
        _progress = bar
        try:
            yield bar
        finally:
            _progress = None


def _median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 15) -> float:
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def _tensors(output) -> tuple:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return (got.float() - want).abs().max().item() / (want.abs().max().item() + 1e-6)


class Autotuner:
    def __init__(self, op: str):
        self.op = op
        self._table: Optional[dict] = None

    def _path(self) -> Path:
        import triton
        from . import __version__
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
        tag = f"{self.op}-{gpu}-cnnfuse{__version__}-torch{torch.__version__}-triton{triton.__version__}"
        return cache_dir() / "autotune" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", tag) + ".json")

    def _load(self) -> dict:
        if self._table is None:
            try:
                self._table = json.loads(self._path().read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self) -> None:
        path = self._path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._table, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            warn_once(f"autotune cache not writable ({exc}); picks last for this process only")

    def pick(self, key: str, candidates: dict, reference: Callable[[], torch.Tensor],
             tolerance: float, default: str) -> str:
        """Name of the candidate to run. candidates map names to zero-argument callables that
        return their output, a tensor or a tuple of them; reference() returns the expected
        output (any dtype), each tensor checked relative to its own largest value."""
        global preset
        if preset is None:
            from .tune import picks_from_environment
            preset = picks_from_environment()
        chosen, final = preset.get(self.op, {}).get(key), True
        if chosen not in candidates:
            chosen = self._pick(key, candidates, reference, tolerance, default)
            final = self._kept(key, chosen, candidates)
        if recording is not None:
            recording.setdefault(self.op, {})[key] = chosen
            final = False  # cnnfuse.tune must see every key a model asks for
        for seen in getattr(_observing, "lists", ()):
            seen.append(Pick(self.op, key, chosen, candidates.get(chosen), final))
        return chosen

    def _kept(self, key: str, chosen: str, candidates: dict) -> bool:
        """Whether `_pick` answers `chosen` for `key` again (see Pick): the cache holds it, or
        there is nothing to search. Read from the cache itself, not from what one call did, so
        that a pick made while another thread's finishes is judged by its own key."""
        if not enabled() or len(candidates) == 1:
            return True
        table = self._table or {}
        return table.get(key, {}).get("best") == chosen and chosen in candidates

    def _pick(self, key: str, candidates: dict, reference: Callable[[], torch.Tensor],
              tolerance: float, default: str) -> str:
        """The pick from the cache, the default or a search (a search's answer is cached
        unless every candidate failed or a CUDA graph is being captured)."""
        table = self._load()
        chosen = table.get(key, {}).get("best")
        if chosen in candidates:
            return chosen
        if not enabled() or len(candidates) == 1:
            return default
        if torch.cuda.is_current_stream_capturing():
            return default  # tuned on the first call outside the capture
        expected = _tensors(reference())
        timings = {}
        for name, fn in candidates.items():
            try:
                err = max(_relative_error(got, want) for got, want in
                          zip(_tensors(fn()), expected, strict=True))
                if not err <= tolerance:
                    warn_once(f"{self.op}: backend {name} is off by {err:.2e} (relative) on {key}; "
                              "dropped")
                    continue
                timings[name] = _median_ms(fn)
            except Exception as exc:  # a backend that cannot run this shape is just not a candidate
                warn_once(f"{self.op}: backend {name} failed on {key}: {exc}")
        if not timings:
            warn_once(f"{self.op}: no backend passed on {key}; using {default}")
            return default
        best = min(timings, key=timings.get)
        table[key] = {"best": best, "ms": {k: round(v, 5) for k, v in timings.items()}}
        self._save()
        log.info("cnnfuse: %s %s -> %s (%.4f ms)", self.op, key, best, timings[best])
        if _progress is not None:
            _progress.update(1)
        return best
