"""`python -m cnnfuse.info`: versions, what `_C` was built with, and which backends run here,
each with the reason when it does not."""
import platform
import re

import torch

from . import __version__
from ._ext import build_info, load_error
from .backend import requested_backend, triton_interpreting

# The C++ kernels `_C` registers; `cuda` means these (plus PyTorch's conv around them).
_C_KERNELS = ("bias_act", "depthwise_conv2d")


def arch_covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST ("8.0;8.6", "9.0+PTX", "9.0a") has code that runs on a
    GPU of this compute capability: a cubin runs on its own major version at the same or a
    higher minor ("a" variants only on their own), PTX is JIT-compiled for any newer GPU."""
    for entry in filter(None, re.split(r"[;,\s]+", arch_list)):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry.strip(), re.I)
        if not m:
            continue
        built, variant, ptx = (int(m[1]), int(m[2])), m[3].lower(), bool(m[4])
        if ptx and capability >= built:
            return True
        if capability == built or (not variant and capability[0] == built[0]
                                   and capability[1] >= built[1]):
            return True
    return False


def _gpu_capabilities() -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def backends() -> list[tuple[str, bool, str]]:
    """(backend, usable here, what it runs, or why it does not), one row per CNNFUSE_BACKEND
    value and for the cuDNN runtime-fusion candidate that `auto` and `cuda` also try."""
    info, caps = build_info(), _gpu_capabilities()
    rows = [("reference", True, "fp32 PyTorch: the specification and the CPU path")]
    try:
        import triton
        version = f"triton {triton.__version__}"
        if caps:
            rows.append(("triton", True, f"{version} on the GPU"))
        elif triton_interpreting():
            rows.append(("triton", True, f"{version} interpreter on CPU tensors "
                                         "(TRITON_INTERPRET=1; with CNNFUSE_BACKEND=triton)"))
        else:
            rows.append(("triton", False, f"{version}: no GPU visible (TRITON_INTERPRET=1 with "
                                          "CNNFUSE_BACKEND=triton runs it on the CPU)"))
    except ImportError as exc:
        rows.append(("triton", False, f"triton not installed ({exc})"))

    if load_error:
        why = f"cnnfuse._C not built ({load_error}); `make setup` builds it"
        return rows + [("cuda", False, why), ("cudnn_fused", False, why)]
    from . import ops  # noqa: F401  (defines the schemas the kernels register under)

    def registered(key):
        return [k for k in _C_KERNELS
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"cnnfuse::{k}", key)]
    archs = info.get("cuda_archs", "")
    cuda_built = bool(info.get("cuda")) and bool(registered("CUDA"))
    cpu_kernels = ", ".join(registered("CPU")) or "none"
    uncovered = [c for c in caps if not arch_covers(archs, c)]
    if not caps:
        cuda_ok = bool(registered("CPU"))
        why = (f"the CPU build of the C++ kernels ({cpu_kernels}) with PyTorch's conv "
               "(CNNFUSE_BACKEND=cuda); " + (f"their CUDA build (archs {archs}) needs a GPU"
                                             if cuda_built else "_C was built without CUDA"))
    elif not cuda_built:
        cuda_ok, why = False, ("_C was built without CUDA (CPU kernels only): rebuild with a "
                               "CUDA toolkit and CUDA_HOME set")
    elif uncovered:
        cuda_ok = False
        need = ";".join(f"{major}.{minor}" for major, minor in uncovered)
        why = (f"_C was built for archs {archs}, which do not run on this GPU (sm_"
               f"{''.join(map(str, uncovered[0]))}): rebuild with TORCH_CUDA_ARCH_LIST={need}")
    else:
        cuda_ok = True
        why = f"CUDA kernels ({', '.join(registered('CUDA'))}) built for archs {archs}, and cuDNN"
    rows.append(("cuda", cuda_ok, why))

    if not info.get("cudnn_frontend"):
        rows.append(("cudnn_fused", False,
                     "_C was built without CUDA" if not info.get("cuda") else
                     "_C was built without the cuDNN frontend headers (pip install "
                     "nvidia-cudnn-frontend, then rebuild)"))
    elif not caps:
        rows.append(("cudnn_fused", False, "built with cudnn-frontend; needs a GPU (cuDNN "
                                           "runtime fusion runs on CUDA tensors only)"))
    else:
        rows.append(("cudnn_fused", cuda_ok, "cuDNN runtime fusion via cudnn-frontend, an "
                                             "autotuning candidate of auto and cuda"
                     if cuda_ok else why))
    return rows


def report() -> str:
    info = build_info()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpus = [f"{torch.cuda.get_device_name(i)} "
            f"(sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    built = ("not built" if not info else
             f"CUDA {info.get('cuda_version', '')}, archs {info.get('cuda_archs', '')}"
             if info.get("cuda") else "CPU kernels only")
    lines = [
        f"cnnfuse {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}",
        f"torch CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}",
        f"GPU: {', '.join(gpus) if gpus else 'none visible'}",
        f"_C: {built}",
        f"CNNFUSE_BACKEND={requested_backend()}, TRITON_INTERPRET={int(triton_interpreting())}",
        "backends (CNNFUSE_BACKEND=auto picks per op and shape among those available):",
    ]
    lines += [f"  {name:<12} {'yes' if ok else 'no':<4} {why}" for name, ok, why in backends()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
