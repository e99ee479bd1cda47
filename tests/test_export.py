"""cnnfuse.export: a torch.export program (.pt2) of a fused model, batch dynamic where the model
allows; it runs in a fresh process with `torch.export.load(path).module()` (cnnfuse imported),
bit for bit as the fused model, and compiles with torch.compile and AOTInductor."""
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import cnnfuse

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
program = torch.export.load(sys.argv[1])
model = program.module()
with torch.no_grad():
    for i, path in enumerate(sys.argv[2:]):
        torch.save(model(torch.load(path, weights_only=True)), f"{path}.got")
"""


def test_export_then_load_in_a_fresh_process_is_identical_at_any_batch(tmp_path):
    fused = _fused()
    program = cnnfuse.export(fused, _x(1), tmp_path / "m.pt2")  # traced at 2: stays dynamic
    assert len(program.range_constraints) == 1
    inputs = {b: _x(b) for b in (1, 2, 5)}
    for b, x in inputs.items():
        torch.save(x, tmp_path / f"x{b}.pt")
    subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "m.pt2"),
                    *(str(tmp_path / f"x{b}.pt") for b in inputs)], check=True, timeout=300)
    with torch.no_grad():
        for b, x in inputs.items():
            got = torch.load(tmp_path / f"x{b}.pt.got", weights_only=True)
            assert torch.equal(got, fused(x)), f"batch {b}"


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


# fp32 rounding: Inductor generates its own kernels for the mean and the linear layer (the
# cnnfuse ops stay opaque calls), which sum in another order than eager's.
COMPILED_TOLERANCE = 1e-5


@pytest.mark.slow
def test_compile_and_aot_inductor_package(tmp_path):
    """~1 min on 2 cores: Inductor writes and compiles C++ for the CPU."""
    fused = _fused()
    program = cnnfuse.export(fused, _x(2), tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "m_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    compiled = torch.compile(loaded)
    with torch.no_grad():
        for b in (2, 3):
            x = _x(b)
            want = fused(x)
            scale = want.abs().max().item()
            for name, fn in (("aoti", runner), ("torch.compile", compiled)):
                err = (fn(x) - want).abs().max().item() / scale
                assert err <= COMPILED_TOLERANCE, f"{name}, batch {b}: off by {err:.2e}"
    assert os.path.getsize(package) > 0
