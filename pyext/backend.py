"""Backend selection (CNNFUSE_BACKEND) and the say-it-once log for fallbacks."""
import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger("cnnfuse")

BACKENDS = ("auto", "triton", "cuda", "reference")


def requested_backend() -> str:
    value = os.environ.get("CNNFUSE_BACKEND", "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"CNNFUSE_BACKEND={value!r} is not one of {BACKENDS}")
    return value


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable_on(t: torch.Tensor) -> bool:
    """Triton runs CUDA tensors natively and CPU tensors only under its interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and triton_interpreting())


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    log.warning("cnnfuse: %s", message)


# Which backend ran each op call, collected only inside `tracing()` (the profiler's "who ran
# it"); outside it `ran` is one global lookup.
_trace = None


@contextlib.contextmanager
def tracing():
    """Collect (op, backend) for every cnnfuse op called eagerly inside the block."""
    global _trace
    outer, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = outer


def ran(op: str, backend: str) -> None:
    if _trace is not None:
        _trace.append((op, backend))
