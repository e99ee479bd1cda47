"""Loads the compiled extension `cnnfuse._C`, remembering why it is missing if it is."""
import contextlib
import importlib

import torch

_C = None
load_error = None
try:
    _C = importlib.import_module("cnnfuse._C")
except ImportError as exc:  # a source checkout that was never built, or CNNFUSE_SKIP_CUDA_BUILD
    load_error = str(exc)


def build_info() -> dict:
    """What `_C` was compiled with; empty when it is missing."""
    return dict(_C.build_info()) if _C is not None else {}


def has_cuda_kernels() -> bool:
    return bool(build_info().get("cuda"))


def has_cudnn_frontend() -> bool:
    return bool(build_info().get("cudnn_frontend"))


@contextlib.contextmanager
def relaxed_capture():
    """Inside a CUDA graph capture, let this thread load a kernel that was just compiled (a
    Triton kernel's first call), which the default capture mode forbids; so a fused model can
    be captured on its very first call. Elsewhere it does nothing."""
    if _C is None or not hasattr(_C, "exchange_capture_mode") or \
            not torch.cuda.is_initialized() or not torch.cuda.is_current_stream_capturing():
        yield
        return
    previous = _C.exchange_capture_mode(2)
    try:
        yield
    finally:
        _C.exchange_capture_mode(previous)
