"""ResNet / ResNeXt: conv + BN + ReLU, and the residual add (+ ReLU) in the last conv."""
import pytest

from .harness import build, check_model

# (source, model, residual adds that must land in a conv epilogue)
MODELS = [("torchvision", "resnet18", 8), ("torchvision", "resnet50", 16),
          ("torchvision", "resnext50_32x4d", 16), ("timm", "resnet50", 16)]


@pytest.mark.parametrize("source, name, adds", MODELS, ids=[f"{s}-{n}" for s, n, _ in MODELS])
def test_fuse(source, name, adds):
    report = check_model(build(source, name), size=64)
    assert report.coverage == 1.0, str(report)
    assert report.fused["residual add"] == adds
    assert report.fused["batchnorm folded"] == report.conv_sites
    # every conv but the downsample projections (no activation of their own) ends in a ReLU
    assert report.fused["activation relu"] == report.conv_sites - (4 if adds == 16 else 3)
