"""DenseNet: conv + BN + ReLU where BN follows a conv; the pre-activation BN stays, said so."""
from .harness import build, check_model


def test_fuse_densenet121():
    report = check_model(build("torchvision", "densenet121"), size=64)
    assert report.coverage == 1.0, str(report)
    # each dense layer's norm1 and each transition's norm read a concatenation, not a conv
    pre_activation = [site for site, reason in report.unfused if "pre-activation" in reason]
    assert len(pre_activation) == 58 + 4, str(report)
    assert report.fused["batchnorm folded"] == 58 + 1
