"""Adding a literal zero (MobileOne's blocks without an identity or scale branch: `out = 0 +
...`, `out += 0`) is dropped, so the branches sum into one conv and the activation after them
is absorbed; never where an in-place update would then write into a tensor others read."""
import copy

import pytest
import torch
from torch import nn

import cnnfuse

from ..util import assert_within_torch_error, randomize_batchnorm, relative_error


def _conv_bn(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout))


class _Block(nn.Module):
    """MobileOne's train-time forward: branches summed in place onto the scale branch (or a
    literal 0), plus the identity branch (or a literal 0)."""

    def __init__(self, c=6, identity=True, scale=False):
        super().__init__()
        self.identity = nn.BatchNorm2d(c) if identity else None
        self.scale = _conv_bn(c, c, 1) if scale else None
        self.kxk = nn.ModuleList(_conv_bn(c, c, 3) for _ in range(3))
        self.act = nn.ReLU()

    def forward(self, x):
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.scale is not None:
            scale_out = self.scale(x)
        out = scale_out + identity_out
        for ck in self.kxk:
            out += ck(x)
        out += 0
        return self.act(out)


def _check(model, x):
    model = randomize_batchnorm(model).eval()
    before = x.clone()
    with torch.no_grad():
        same = model(x)
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
        want = copy.deepcopy(model).double()(x.double())
    assert torch.equal(x, before), "the fused model wrote into its input"
    assert_within_torch_error(got, same, want)
    assert relative_error(got, want) < 2e-5
    return cnnfuse.explain(model)


@pytest.mark.parametrize("identity, scale", [(True, False), (False, True), (False, False)],
                         ids=["identity", "scale", "neither"])
def test_branches_sum_into_one_conv(identity, scale):
    torch.manual_seed(0)
    report = _check(_Block(identity=identity, scale=scale), torch.randn(2, 6, 7, 9))
    assert report.fused["parallel branches summed into one conv"] == 3 + scale, str(report)
    assert report.bn_folded == report.batchnorms, str(report)
    assert report.activations_absorbed == report.activation_sites == 1, str(report)


class _IntoInput(nn.Module):
    """0 + x of the input, then updated in place: dropping the sum would write into x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        out = 0 + x
        out += self.conv(x)
        return out


def test_input_is_not_written():
    torch.manual_seed(0)
    _check(_IntoInput(), torch.randn(1, 4, 5, 7))
