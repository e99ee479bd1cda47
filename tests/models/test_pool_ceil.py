"""Ceil-mode pools before a 1x1 conv, paired into one pool_conv2d: BN-Inception's stem max pool
(Caffe's ceil mode), the stride-2 average pool of ResNet-D's downsampling shortcut
(AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) -> 1x1 conv -> BN), and the same
with the padding counted. The fused float32 model against the original in float64."""
import copy

import pytest
import timm
import torch
from torch import nn

import cnnfuse
from cnnfuse.models.architectures import bn_inception

from ..util import randomize_batchnorm, relative_error, triton_runnable

TOLERANCE = 1e-5  # float32 against float64: a wrong window or divisor shows as 1e-2 or more


def _check_against_fp64(model, x):
    model = randomize_batchnorm(model).eval()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = cnnfuse.fuse(model)(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape
    err = relative_error(got, want)
    assert err < TOLERANCE, f"fused output differs by {err:.2e} (relative)"
    return cnnfuse.explain(model)


def test_bn_inception_stem_paired():
    """The stem's first ceil-mode pool (before a 1x1 conv) is paired too: nine pool
    projections; 35x35 input, where ceil mode gives that pool a ninth output row and column."""
    report = _check_against_fp64(bn_inception(num_classes=10), torch.randn(1, 3, 35, 35))
    assert report.fused["pool + 1x1 in one op"] == 9
    reasons = dict(report.unfused)
    assert "stem.1" not in reasons, str(report)
    assert not any("ceil-mode" in why for why in reasons.values()), str(report)
    assert report.coverage == 1.0


def test_resnet26d_shortcut_pools_paired():
    """resnet26d's three stride-2 shortcuts: each ceil-mode average pool and its 1x1 conv in
    one op; 37x37 input gives odd maps (10, 5, 3) where ceil mode adds a window."""
    model = timm.create_model("resnet26d", pretrained=False, num_classes=10)
    report = _check_against_fp64(model, torch.randn(2, 3, 37, 37))
    assert report.fused["pool + 1x1 in one op"] == 3
    assert not any("ceil-mode" in why for _, why in report.unfused), str(report)


class CeilShortcut(nn.Module):
    """A ResNet-D shortcut (or, with counted=True, one whose average counts the padding) and a
    ceil-mode max pool projection, each into a 1x1 conv with BN."""

    def __init__(self, counted: bool):
        super().__init__()
        self.down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True,
                                               count_include_pad=counted),
                                  nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.proj = nn.Sequential(nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(8, 6, 1),
                                  nn.BatchNorm2d(6), nn.ReLU())
        self.avg3 = nn.Sequential(nn.AvgPool2d(3, 3, 1, ceil_mode=True,
                                               count_include_pad=counted), nn.Conv2d(8, 5, 1))

    def forward(self, x):
        return self.down(x), self.proj(x), self.avg3(x)


@pytest.mark.parametrize("backend_name", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("counted", [False, True], ids=["avg_valid", "avg"])
def test_ceil_pools_on_every_backend(backend_name, counted, monkeypatch):
    """8x9 input: ceil mode adds a column to the 2x2 pool, a row to the 3x3 stride-2 max pool
    and a column to the stride-3 one, whose rows lose the window that would start in the
    padding."""
    if backend_name == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("CNNFUSE_BACKEND", backend_name)
    model = randomize_batchnorm(CeilShortcut(counted)).eval()
    x = torch.randn(2, 8, 8, 9)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = cnnfuse.fuse(model)(x.contiguous(memory_format=torch.channels_last))
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_error(g, w) < TOLERANCE
    assert cnnfuse.explain(model).fused["pool + 1x1 in one op"] == 3
