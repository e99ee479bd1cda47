"""VGG, AlexNet and SqueezeNet: plain conv (+ BN) + ReLU stacks."""
import pytest

from .harness import build, check_model

MODELS = [("torchvision", "vgg16_bn", 32), ("torchvision", "alexnet", 64),
          ("torchvision", "squeezenet1_1", 64), ("timm", "vgg16_bn", 64)]


@pytest.mark.parametrize("source, name, size", MODELS, ids=[f"{s}-{n}" for s, n, _ in MODELS])
def test_fuse(source, name, size):
    report = check_model(build(source, name), size=size)
    assert report.coverage == 1.0, str(report)
    # timm's VGG head (ConvMlp) is traced on its own: its convs fuse, its ReLUs stay apart
    relus = 13 if source == "timm" else report.conv_sites
    assert report.fused["activation relu"] == relus, str(report)
