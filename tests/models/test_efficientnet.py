"""EfficientNet: MBConv with SiLU, a sigmoid-gated squeeze-and-excitation and stochastic depth
before the residual add (the identity at inference, so the add lands in the project conv)."""
import pytest

from .harness import build, check_model

MODELS = [("torchvision", "efficientnet_b0", 9, 16), ("torchvision", "efficientnet_b3", 19, 26),
          ("timm", "efficientnet_b0", 9, 16)]


@pytest.mark.parametrize("source, name, adds, se", MODELS, ids=[f"{s}-{n}" for s, n, _, _ in MODELS])
def test_fuse(source, name, adds, se):
    report = check_model(build(source, name), size=64)
    assert report.coverage == 1.0, str(report)
    assert report.fused["residual add"] == adds
    assert report.fused["batchnorm folded"] == report.conv_sites - 2 * se  # SE convs have no BN
    assert report.fused["activation sigmoid"] == se
