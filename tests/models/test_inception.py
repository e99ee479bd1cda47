"""GoogLeNet and Inception v3: BasicConv2d (conv + BN + ReLU) everywhere, 1xn / nx1 kernels."""
import pytest

from .harness import build, check_model

MODELS = [("torchvision", "googlenet", 64), ("torchvision", "inception_v3", 80),
          ("timm", "inception_v3", 80)]


@pytest.mark.parametrize("source, name, size", MODELS, ids=[f"{s}-{n}" for s, n, _ in MODELS])
def test_fuse(source, name, size):
    report = check_model(build(source, name), size=size)
    assert report.coverage == 1.0, str(report)
    assert report.fused["batchnorm folded"] == report.conv_sites
    assert report.fused["activation relu"] == report.conv_sites
