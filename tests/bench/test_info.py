"""`python -m cnnfuse.info`: each backend's availability agrees with what the dispatch really
does here, and a backend that is off says why."""
import pytest
import torch

import cnnfuse
from cnnfuse import info


def _rows(monkeypatch, *, caps=(), build=None, load_error=None, interpreting=False):
    monkeypatch.setattr(info, "_gpu_capabilities", lambda: sorted(caps))
    monkeypatch.setattr(info, "build_info", lambda: dict(build or {}))
    monkeypatch.setattr(info, "load_error", load_error)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreting else "0")
    return {name: (ok, why) for name, ok, why in info.backends()}


CUDA_BUILD = {"cuda": True, "cuda_version": "13.0", "cuda_archs": "9.0+PTX",
              "cudnn_frontend": True}


@pytest.mark.skipif(not cnnfuse._ext.has_cuda_kernels(), reason="needs _C built with CUDA")
def test_cpu_machine_with_a_cuda_build(monkeypatch):
    rows = _rows(monkeypatch, build=CUDA_BUILD)
    assert rows["reference"][0]
    assert rows["triton"] == (False, rows["triton"][1]) and "no GPU visible" in rows["triton"][1]
    ok, why = rows["cuda"]  # what CNNFUSE_BACKEND=cuda runs on CPU tensors: the CPU build
    assert ok and "CPU build of the C++ kernels (bias_act, depthwise_conv2d)" in why
    assert "archs 9.0+PTX" in why and "needs a GPU" in why
    assert rows["cudnn_fused"] == (False, rows["cudnn_fused"][1])
    assert "needs a GPU" in rows["cudnn_fused"][1]
    assert _rows(monkeypatch, build=CUDA_BUILD, interpreting=True)["triton"][0]


@pytest.mark.skipif(not cnnfuse._ext.has_cuda_kernels(), reason="needs _C built with CUDA")
@pytest.mark.parametrize("caps, archs, ok, says", [
    ([(9, 0)], "9.0+PTX", True, "CUDA kernels (bias_act, depthwise_conv2d) built for"),
    ([(10, 0)], "9.0+PTX", True, "built for archs 9.0+PTX"),   # PTX JIT-compiles
    ([(8, 6)], "9.0+PTX", False, "rebuild with TORCH_CUDA_ARCH_LIST=8.6"),
    ([(10, 0)], "9.0", False, "(sm_100): rebuild with TORCH_CUDA_ARCH_LIST=10.0"),
    ([(8, 9)], "8.0;8.6", True, "built for archs 8.0;8.6"),     # a cubin runs on later minors
], ids=["h100", "newer-ptx", "older-gpu", "newer-no-ptx", "same-major"])
def test_gpu_archs_decide_the_cuda_backend(monkeypatch, caps, archs, ok, says):
    rows = _rows(monkeypatch, caps=caps, build=dict(CUDA_BUILD, cuda_archs=archs))
    assert rows["cuda"][0] == ok and says in rows["cuda"][1]
    assert rows["cudnn_fused"][0] == ok
    assert rows["triton"][0]


def test_off_backends_say_why(monkeypatch):
    rows = _rows(monkeypatch, load_error="No module named 'cnnfuse._C'")
    for name in ("cuda", "cudnn_fused"):
        assert rows[name][0] is False and "cnnfuse._C not built" in rows[name][1]
        assert "make setup" in rows[name][1]
    rows = _rows(monkeypatch, caps=[(9, 0)], build=dict(CUDA_BUILD, cudnn_frontend=False))
    assert rows["cudnn_fused"][0] is False and "cuDNN frontend headers" in rows["cudnn_fused"][1]
    rows = _rows(monkeypatch, caps=[(9, 0)], build={"cuda": False, "cudnn_frontend": False})
    assert rows["cuda"][0] is False and "built without CUDA" in rows["cuda"][1]
    assert "built without CUDA" in rows["cudnn_fused"][1]


@pytest.mark.parametrize("archs, cap, covered", [
    ("9.0+PTX", (9, 0), True), ("9.0+PTX", (12, 0), True), ("9.0+PTX", (8, 9), False),
    ("9.0", (9, 0), True), ("9.0", (10, 0), False), ("8.0;8.6", (8, 9), True),
    ("8.0 8.6", (8, 6), True), ("8.6", (8, 0), False), ("9.0a", (9, 0), True),
    ("9.0a", (9, 1), False),
    ("", (9, 0), False), ("garbage", (9, 0), False),
])
def test_arch_covers(archs, cap, covered):
    assert info.arch_covers(archs, cap) is covered


def test_report_lists_every_backend():
    text = info.report()
    for name in ("reference", "triton", "cuda", "cudnn_fused"):
        assert f"\n  {name} " in text
    assert ("GPU: none visible" in text) == (not torch.cuda.is_available())


@pytest.mark.skipif(cnnfuse._ext.load_error is not None or torch.cuda.is_available(),
                    reason="needs cnnfuse._C and no GPU")
def test_cuda_row_matches_what_runs_on_cpu_tensors(monkeypatch):
    from cnnfuse.backend import tracing
    monkeypatch.setenv("CNNFUSE_BACKEND", "cuda")
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    with tracing() as ran:
        cnnfuse.ops.conv2d(x, w, None, padding=1, groups=4)
    row = {name: (ok, why) for name, ok, why in info.backends()}["cuda"]
    assert ran and all("CPU build" in backend for _, backend in ran)
    assert row[0] is True and "CPU build" in row[1]
