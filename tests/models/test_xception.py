"""Xception: separable convs (depthwise + pointwise) with ReLU before them, residual 1x1
projections."""
import pytest

from .harness import build, check_model

MODELS = [("timm", "legacy_xception", 12), ("timm", "xception41", 12)]


@pytest.mark.parametrize("source, name, adds", MODELS, ids=[f"{s}-{n}" for s, n, _ in MODELS])
def test_fuse(source, name, adds):
    report = check_model(build(source, name), size=96)
    assert report.coverage == 1.0, str(report)
    assert report.fused["residual add"] == adds
