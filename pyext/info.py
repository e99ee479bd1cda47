"""`python -m cnnfuse.info`: versions, what `_C` was built with, and which backends run here."""
import platform

import torch

from . import __version__
from ._ext import build_info, load_error
from .backend import requested_backend, triton_interpreting


def backends() -> list[tuple[str, bool, str]]:
    """(backend, usable here, why not / what it covers)."""
    info, gpu = build_info(), torch.cuda.is_available()
    rows = [("reference", True, "fp32 PyTorch; the CPU path")]
    try:
        import triton
        triton_ok, why = gpu or triton_interpreting(), f"triton {triton.__version__}"
        if not triton_ok:
            why += ": no GPU (set TRITON_INTERPRET=1 and CNNFUSE_BACKEND=triton to run it on CPU)"
    except ImportError as exc:
        triton_ok, why = False, f"triton missing ({exc})"
    rows.append(("triton", triton_ok, why))
    if load_error:
        rows.append(("cuda (cnnfuse._C)", False, f"extension not built: {load_error}"))
        return rows
    from . import ops  # noqa: F401  (defines the schemas the kernels register under)
    kernels = [name for name in ("bias_act", "depthwise_conv2d")
               if torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnfuse::{name}", "CUDA")]
    rows.append(("cuda (cnnfuse._C)", bool(info.get("cuda")) and gpu,
                 f"CUDA kernels ({', '.join(kernels)}) built for " + info.get("cuda_archs", "")
                 if info.get("cuda") else "built without CUDA (CPU kernels only)"))
    if not gpu:
        rows[-1] = (rows[-1][0], False, rows[-1][2] + "; no GPU visible")
    rows.append(("cudnn_fused", bool(info.get("cudnn_frontend")) and gpu,
                 "cuDNN runtime fusion via cudnn-frontend" if info.get("cudnn_frontend")
                 else "built without the cuDNN frontend headers"))
    return rows


def report() -> str:
    import triton
    info = build_info()
    lines = [
        f"cnnfuse {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}",
        f"torch CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}",
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
        f"_C: {'CUDA ' + info.get('cuda_version', '') + ', archs ' + info.get('cuda_archs', '') if info.get('cuda') else 'CPU only' if info else 'not built'}",
        f"CNNFUSE_BACKEND={requested_backend()}, TRITON_INTERPRET={int(triton_interpreting())}",
        "backends:",
    ]
    lines += [f"  {name:<18} {'yes' if ok else 'no ':<4} {why}" for name, ok, why in backends()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
