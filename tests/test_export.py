"""cnnfuse.export: a torch.export program (.pt2) of a fused model, batch dynamic where the model
allows; it runs in a fresh process with `torch.export.load(path).module()` (cnnfuse imported),
bit for bit as the fused model, and compiles with torch.compile and AOTInductor."""
import logging
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse.bench import zoo

from .util import randomize_batchnorm


class Tiny(nn.Module):
    """conv-BN-ReLU, depthwise -> 1x1 (separable), a residual epilogue, a concat, a head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.pw, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1), \
            nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.pw(self.dw(x)))
        y = torch.relu(self.c3(y) + y)
        return self.fc(torch.cat([x, y], 1).mean((2, 3)))


def _fused() -> nn.Module:
    return cnnfuse.fuse(randomize_batchnorm(Tiny()).eval())


def _x(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 10, 13).contiguous(memory_format=torch.channels_last)


RUN = """
import sys, torch, cnnfuse
directory, names = sys.argv[1], sys.argv[2:]
for name in names:
    model = torch.export.load(f"{directory}/{name}.pt2").module()
    inputs = torch.load(f"{directory}/{name}.x.pt", weights_only=True)
    with torch.no_grad():
        torch.save([model(x) for x in inputs], f"{directory}/{name}.got.pt")
"""
# Tiny, and the zoo model whose graph writes most outputs into slices of concat buffers;
# CNNFUSE_TEST_ALL_ZOO=1: every zoo model (minutes).
ZOO_MODELS = zoo.ZOO if os.environ.get("CNNFUSE_TEST_ALL_ZOO") == "1" else ("googlenet",)


def test_export_then_load_in_a_fresh_process_is_identical_at_any_batch(tmp_path):
    want = {}
    for name in ("tiny",) + ZOO_MODELS:
        file = name.replace("/", "_")
        if name == "tiny":
            fused, size = _fused(), (10, 13)
        else:
            fused = cnnfuse.fuse(zoo.build(name))
            size = (299, 299) if zoo.input_size(name) == 299 else (96, 96)
        inputs = [torch.randn(b, 3, *size).contiguous(memory_format=torch.channels_last)
                  for b in (1, 2, 5)]
        # traced at batch 2 from an example of 1, so the batch stays symbolic
        program = cnnfuse.export(fused, inputs[0], tmp_path / f"{file}.pt2")
        assert len(program.range_constraints) == 1, name
        torch.save(inputs, tmp_path / f"{file}.x.pt")
        with torch.no_grad():
            want[file] = [fused(x) for x in inputs]
    subprocess.run([sys.executable, "-c", RUN, str(tmp_path), *want], check=True, timeout=600)
    for file, outputs in want.items():
        got = torch.load(tmp_path / f"{file}.got.pt", weights_only=True)
        for x, y, b in zip(got, outputs, (1, 2, 5)):
            assert torch.equal(x, y), f"{file}, batch {b}"


def test_a_model_that_fixes_its_batch_is_exported_static_with_a_log_line(tmp_path, caplog):
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).reshape(3, -1)  # only batch 3 works
    fused = cnnfuse.fuse(Fixed().eval())
    with caplog.at_level(logging.WARNING, logger="cnnfuse"):
        program = cnnfuse.export(fused, _x(3), tmp_path / "m.pt2")
    assert "batch size stays 3" in caplog.text
    assert not program.range_constraints
    with torch.no_grad():
        x = _x(3)
        assert torch.equal(program.module()(x), fused(x))


def test_static_export_and_bad_arguments(tmp_path):
    fused = _fused()
    program = cnnfuse.export(fused, _x(2), tmp_path / "m.pt2", dynamic_batch=False)
    assert not program.range_constraints
    with pytest.raises(Exception):
        program.module()(_x(3))  # the batch is fixed at 2
    with pytest.raises(TypeError, match="example_inputs"):
        cnnfuse.export(fused, "an image", tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="fused"):
        cnnfuse.export(Tiny, _x(2), tmp_path / "m.pt2")


def test_every_weight_is_saved_once_in_its_layout_without_a_storage_warning(tmp_path):
    """torch.export.save warns "No complete tensor found in the group" for every tensor that
    is not contiguous in the NCHW sense (channels_last weights) or that shares a wider
    storage: the program holds each weight in a storage of its own, which the .pt2 stores
    exactly, and the warning is not shown."""
    fused = _fused()
    wide = torch.randn(5, 40)
    fused.fc.weight = nn.Parameter(wide[:, 3:19])  # a view with gaps, into a wider storage
    x = _x(3)
    with torch.no_grad():
        want = fused(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = cnnfuse.export(fused, _x(2), tmp_path / "m.pt2")
    assert not [w for w in caught if "complete tensor" in str(w.message)], \
        [str(w.message) for w in caught]
    assert fused.fc.weight.data_ptr() == wide.data_ptr() + 3 * 4  # the model keeps its own
    state = program.state_dict
    for name, t in state.items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    assert state["c1.weight"].stride() == fused.c1.weight.stride() != \
        fused.c1.weight.contiguous().stride()  # channels_last kept
    with zipfile.ZipFile(tmp_path / "m.pt2") as zf:
        stored = sum(i.file_size for i in zf.infolist() if "/data/weights/weight_" in
                     i.filename)
    assert stored == sum(t.numel() * t.element_size() for t in state.values())
    loaded = torch.export.load(tmp_path / "m.pt2")
    for name, t in state.items():
        got = loaded.state_dict[name]
        assert got.stride() == t.stride() and torch.equal(got, t), name
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), want)


# fp32 rounding: Inductor generates its own kernels for the mean and the linear layer (the
# cnnfuse ops stay opaque calls), which sum in another order than eager's.
COMPILED_TOLERANCE = 1e-5


@pytest.mark.slow
def test_compile_and_aot_inductor_package(tmp_path, monkeypatch):
    """~1 min on 2 cores: Inductor writes and compiles C++ for the CPU. The package calls the
    cnnfuse ops by name, so the backend is chosen when it runs: the reference, and the CPU
    build of the C++ kernels (CNNFUSE_BACKEND=cuda)."""
    fused = _fused()
    program = cnnfuse.export(fused, _x(2), tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "m_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    compiled = torch.compile(loaded)
    for backend in ("reference", "cuda"):
        monkeypatch.setenv("CNNFUSE_BACKEND", backend)
        with torch.no_grad():
            for b in (2, 3):
                x = _x(b)
                want = fused(x)
                scale = want.abs().max().item()
                for name, fn in (("aoti", runner), ("torch.compile", compiled)):
                    err = (fn(x) - want).abs().max().item() / scale
                    assert err <= COMPILED_TOLERANCE, \
                        f"{name}, {backend}, batch {b}: off by {err:.2e}"
    assert os.path.getsize(package) > 0
