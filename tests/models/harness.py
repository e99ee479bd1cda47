"""Builds classifiers with random weights and randomised BatchNorm, fuses them, and checks the
fused logits and the fusion coverage."""
import torch

import cnnfuse
from cnnfuse.bench import zoo

from ..util import randomize_batchnorm, relative_error

# fp32 on the CPU: folding in float64 keeps the fused model within a few ulps of the original;
# a folding bug (a wrong eps, a missed mean) shows as 1e-3 or more with randomised statistics.
FP32_TOLERANCE = 2e-5


def build(source: str, name: str) -> torch.nn.Module:
    return zoo.build(f"timm/{name}" if source == "timm" else name)


def check_model(model: torch.nn.Module, size: int, min_coverage: float = 0.95):
    model = randomize_batchnorm(model).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
    err = relative_error(got, expected)
    assert err < FP32_TOLERANCE, f"fused logits differ by {err:.2e} (relative)"
    report = cnnfuse.explain(model)
    assert report.coverage >= min_coverage, str(report)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in fused.modules()) or report.unfused
    return report
