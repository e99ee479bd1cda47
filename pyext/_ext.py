"""Loads the compiled extension `cnnfuse._C`, remembering why it is missing if it is."""
import importlib

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
