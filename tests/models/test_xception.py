"""Xception: separable convs (depthwise + pointwise) with ReLU before them, residual 1x1
projections."""
import pytest

from .harness import build, check_model

# (source, model, residual adds, separable convs run as one depthwise + 1x1 op)
MODELS = [("timm", "legacy_xception", 12, 34), ("timm", "xception41", 12, 39)]


@pytest.mark.parametrize("source, name, adds, separable", MODELS,
                         ids=[f"{m[0]}-{m[1]}" for m in MODELS])
def test_fuse(source, name, adds, separable):
    report = check_model(build(source, name), size=96)
    assert report.coverage == 1.0, str(report)
    assert report.fused["residual add"] == adds
    assert report.fused["depthwise + 1x1 in one op"] == separable
