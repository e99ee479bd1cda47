"""ShuffleNet v2: channel split, branch convs (depthwise without activation) and the shuffle."""
from .harness import build, check_model


def test_fuse():
    report = check_model(build("torchvision", "shufflenet_v2_x1_0"), size=64)
    assert report.coverage == 1.0, str(report)
    assert report.fused["batchnorm folded"] == report.conv_sites == 56
    assert report.fused["activation relu"] == 37  # every 1x1 and the stem; depthwise convs have none
