"""Builds cnnfuse: the Python packages plus the compiled extension cnnfuse._C.

CUDA sources are compiled when a CUDA toolkit and a CUDA build of torch are present, unless
CNNFUSE_SKIP_CUDA_BUILD=1; otherwise `_C` holds the CPU kernels only. TORCH_CUDA_ARCH_LIST
and MAX_JOBS are honoured; by default the archs are those of the visible GPUs (the newest with
PTX), else 9.0 with PTX only: each arch compiles every CUDA source once more, and sm_90 is the
GPU this project targets. The build says which archs it compiles and why.
"""
import os
import re
import site
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
README = ROOT / "README.md"
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "pyext" / "__init__.py").read_text())[1]


def _site_dirs():
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    return [Path(d) for d in dict.fromkeys(dirs) if d and Path(d).is_dir()]


def _find(relative: str):
    """The first site-packages dir holding `relative` (pip-installed NVIDIA headers)."""
    return next((d for d in _site_dirs() if (d / relative).exists()), None)


_NOTES = []  # what the build says it does, printed when build_ext runs (pip runs this file
#              more than once, to ask for the build requirements first)


def _say(message: str) -> None:
    _NOTES.append(f"cnnfuse: {message}")


def arch_list(torch, environ=os.environ) -> tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST to build, why): the one given, else the visible GPUs' archs,
    else 9.0+PTX (H100/H200; the PTX lets newer GPUs JIT-compile it)."""
    given = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given, "from TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        gpus = {torch.cuda.get_device_capability(i): torch.cuda.get_device_name(i)
                for i in range(torch.cuda.device_count())}
        archs = [f"{major}.{minor}" for major, minor in sorted(gpus)]
        archs[-1] += "+PTX"
        return ";".join(archs), "the visible GPUs: " + ", ".join(
            f"{name} (sm_{major}{minor})" for (major, minor), name in sorted(gpus.items()))
    return "9.0+PTX", ("no GPU visible and TORCH_CUDA_ARCH_LIST unset, so sm_90 only; for other "
                       "GPUs set TORCH_CUDA_ARCH_LIST, e.g. \"8.0;8.6;9.0\"")


def _extension():
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    skip_cuda = os.environ.get("CNNFUSE_SKIP_CUDA_BUILD", "0") == "1"
    with_cuda = (not skip_cuda and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    csrc = ROOT / "csrc"
    sources = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cpp"))
    cudnn_fused = "csrc/conv2d/cudnn_fused.cpp"
    cxx = ["-O3"]  # the C++ standard is the one torch asks for
    macros, include_dirs, libraries, library_dirs, link_args = [], [], [], [], []
    if not with_cuda:
        sources = [s for s in sources if s != cudnn_fused]
        _say("building _C without CUDA "
             f"({'CNNFUSE_SKIP_CUDA_BUILD=1' if skip_cuda else 'no CUDA toolkit or CPU torch'}): "
             f"{len(sources)} C++ sources")
        return cpp_extension.CppExtension(
            "cnnfuse._C", sources, extra_compile_args={"cxx": cxx})

    archs, why = arch_list(torch)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch's build turns into -gencode flags
    sources += sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cu"))
    macros += [("CNNFUSE_WITH_CUDA", None),
               ("CNNFUSE_CUDA_VERSION", f'"{torch.version.cuda}"'),
               ("CNNFUSE_CUDA_ARCHS", f'"{archs}"')]
    # torch's CUDA headers pull in cusparse.h and friends, shipped in the nvidia/cu13 wheels.
    for rel in ("nvidia/cu13/include", "nvidia/cudnn/include"):
        found = _find(rel)
        if found:
            include_dirs.append(str(found / rel))
    frontend = _find("include/cudnn_frontend.h")
    cudnn_lib, nvrtc_lib = _find("nvidia/cudnn/lib/libcudnn.so.9"), _find("nvidia/cu13/lib")
    if frontend and cudnn_lib and nvrtc_lib and (ROOT / cudnn_fused).exists():
        include_dirs.append(str(frontend / "include"))
        macros.append(("CNNFUSE_WITH_CUDNN_FRONTEND", None))
        # The same libcudnn and libnvrtc that torch loads; the frontend links both.
        for lib_dir in (cudnn_lib / "nvidia/cudnn/lib", nvrtc_lib / "nvidia/cu13/lib"):
            library_dirs.append(str(lib_dir))
            link_args.append(f"-Wl,-rpath,{lib_dir}")
        libraries += [":libcudnn.so.9", ":libnvrtc.so.13"]
    else:
        sources = [s for s in sources if s != cudnn_fused]
        _say("cuDNN frontend headers or libcudnn not found; building without the cuDNN "
             "runtime-fusion backend (pip install nvidia-cudnn-frontend)")
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr"]
    _say(f"building _C with CUDA {torch.version.cuda} for archs {archs}: {why}")
    _say(f"{len(sources)} sources, MAX_JOBS={os.environ['MAX_JOBS']}")
    return cpp_extension.CUDAExtension(
        "cnnfuse._C", sources, define_macros=macros, include_dirs=include_dirs,
        libraries=libraries, library_dirs=library_dirs, extra_link_args=link_args,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc})


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            for note in _NOTES:
                print(note, flush=True)
            super().run()
    return Build


# Under pip (setuptools' build backend) and `python setup.py` alike this file runs as
# __main__; imported (the tests of arch_list), it only defines.
if __name__ == "__main__":
    setup(
        name="cnnfuse",
        version=VERSION,
        description="Fused CUDA and Triton kernels for classic CNN image classifiers",
        long_description=README.read_text() if README.exists() else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        package_dir={"cnnfuse": "pyext", "cnnfuse.kernels": "kernels", "cnnfuse.models": "models"},
        packages=["cnnfuse", "cnnfuse.ops", "cnnfuse.ref", "cnnfuse.bench", "cnnfuse.kernels",
                  "cnnfuse.models", "cnnfuse.models.modules", "cnnfuse.models.passes",
                  "cnnfuse.models.architectures"],
        ext_modules=[_extension()],
        cmdclass={"build_ext": _build_ext()},
        install_requires=["torch>=2.6", "triton>=3.3", "tqdm"],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "hypothesis", "timm", "torchvision",
                     "scikit-image"],
            "bench": ["torchvision", "timm", "matplotlib", "pytest-benchmark"],
            "cudnn": ["nvidia-cudnn-frontend"],
        },
        entry_points={"console_scripts": ["cnnfuse-bench = cnnfuse.bench.__main__:main"]},
        zip_safe=False,
    )
