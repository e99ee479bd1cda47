"""Sibling convs (same input, geometry and activation) merged into one conv whose output
slices their readers take in place."""
import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse import FusedConv2d

from ..util import randomize_batchnorm, relative_error, triton_runnable
from .test_concat import _conv_bn


class Reduces(nn.Module):
    """GoogLeNet's block: a 1x1 branch into the concatenation, two 1x1 reduces before a 3x3
    and a 5x5, and a 1x1 with another activation and one with a stride, which must stay."""
    def __init__(self, c=10):
        super().__init__()
        self.b1 = _conv_bn(c, 4)
        self.r2, self.c2 = _conv_bn(c, 6), _conv_bn(6, 5, 3)
        self.r3, self.c3 = _conv_bn(c, 3), _conv_bn(3, 4, 5)
        self.other_act = nn.Sequential(nn.Conv2d(c, 3, 1), nn.BatchNorm2d(3), nn.SiLU())
        self.strided = nn.Sequential(nn.Conv2d(c, 3, 1, 2), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        y = torch.cat([self.b1(x), self.c2(self.r2(x)), self.c3(self.r3(x))], 1)
        return y, self.other_act(x), self.strided(x)


def _fused(model):
    model = randomize_batchnorm(model).eval()
    return model, cnnfuse.fuse(model)


def test_reduces_merge_and_the_rest_stays():
    model, fused = _fused(Reduces())
    report = cnnfuse.explain(model)
    assert report.fused["sibling convs merged"] == 2
    merged = [m for m in fused.modules() if isinstance(m, FusedConv2d) and m.out_channels == 9]
    assert len(merged) == 1 and merged[0].activation == "relu"
    x = torch.randn(2, 10, 9, 8)
    with torch.no_grad():
        for got, expected in zip(fused(x), model(x)):
            assert relative_error(got, expected) < 2e-5


def test_merged_model_state_dict_round_trips():
    model, fused = _fused(Reduces())
    other = cnnfuse.fuse(randomize_batchnorm(Reduces(), torch.Generator().manual_seed(7)).eval())
    other.load_state_dict(fused.state_dict())
    x = torch.randn(1, 10, 6, 6)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(other(x), fused(x)))


@pytest.mark.skipif(not triton_runnable(), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_reads_the_merged_slices(backend):
    backend("triton")
    model, fused = _fused(Reduces())
    x = torch.randn(1, 10, 7, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for got, expected in zip(fused(x), model(x)):
            assert relative_error(got, expected) < 2e-5
