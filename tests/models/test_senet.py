"""SE-ResNet: squeeze-and-excitation on the bottleneck output before the residual add. The mean
is summed by the last 1x1 conv; the gate, the add and the ReLU are one pass, except where the
block has a downsample projection, whose epilogue takes the add."""
from .harness import build, check_model


def test_fuse():
    report = check_model(build("timm", "seresnet50"), size=64)
    assert report.coverage == 1.0, str(report)
    assert report.fused["batchnorm folded"] == 53
    assert report.fused["activation sigmoid"] == 16
    assert report.fused["residual add"] == 4
    # the gated output feeds the residual add, not a conv: the scale stays a pass of its own
    assert report.fused["se gate"] == 16 and report.fused["se scale in next conv"] == 0
    assert report.fused["se pool in conv epilogue"] == 16
    assert report.fused["se scale + residual add + relu"] == 12
