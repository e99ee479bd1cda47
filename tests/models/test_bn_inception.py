"""BN-Inception: BatchNorm after every conv, the 5x5 branch as two 3x3, average-pool
projections (max in 5b), stride-2 blocks 3c and 4e with a max-pool pass-through branch."""
import pytest
import torch

from cnnfuse.models.architectures import bn_inception

from .seed_harness import check_seed, count_params

# Figure 5 of Ioffe & Szegedy 2015: the output size column, block by block, at 224x224.
_OUTPUTS = {"3a": (256, 28), "3b": (320, 28), "3c": (576, 14), "4a": (576, 14),
            "4b": (576, 14), "4c": (576, 14), "4d": (576, 14), "4e": (1024, 7),
            "5a": (1024, 7), "5b": (1024, 7)}


def test_layout():
    """Every block's output as the table prints it; 69 convs, each followed by a BatchNorm.
    Parameters: 11.2M, under the 13.6M the paper's text states (the table as printed does not
    reach it; see BNInception's docstring), a sanity bound of 10.5M-13.6M."""
    model = bn_inception().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        x = model.stem(x)
        assert tuple(x.shape[1:]) == (192, 28, 28)
        for name, block in model.blocks.named_children():
            x = block(x)
            c, hw = _OUTPUTS[name.split("_")[1]]
            assert tuple(x.shape[1:]) == (c, hw, hw), name
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 69
    assert 10.5e6 < count_params(model) < 13.6e6
    with pytest.raises(ValueError, match="num_classes"):
        bn_inception(num_classes=-1)


def test_fuse():
    """All 69 BatchNorms folded, every ReLU absorbed; the nine pool projections (seven
    average, 5b's and the stem's max) run as pool + 1x1 in one op."""
    result = check_seed(bn_inception(num_classes=100), sizes=(64, 67))
    report = result.report
    assert result.folded == result.batchnorms == 69
    assert report.fused["activation relu"] == 69
    assert report.fused["pool + 1x1 in one op"] == 9
    assert report.fused["conv writes its concat slice"] > 0
    assert report.coverage == 1.0 and report.activations_absorbed == report.activation_sites
    # Still eager, and listed: the stride-2 blocks' pass-through pools, copied into their
    # concatenations.
    reasons = dict(report.unfused)
    for block in ("3c", "4e"):
        assert "copied into its concatenation" in reasons[
            f"blocks.inception_{block}.branch_pool"], str(report)
    assert "stem.1" not in reasons, str(report)  # the ceil-mode pool, paired
    assert "stem.4" not in reasons  # a 3x3 conv follows it: nothing to pair
