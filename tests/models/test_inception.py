"""GoogLeNet and Inception v3: BasicConv2d (conv + BN + ReLU) everywhere, 1xn / nx1 kernels, and
a pool before a 1x1 conv: each block's pool projection, and Inception-v3's stem."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse

from ..util import randomize_batchnorm, relative_error, triton_runnable
from .harness import build, check_model

# (source, name, input size, pools fused with the 1x1 conv after them; GoogLeNet: its 9
# blocks and the stem's ceil-mode pool)
MODELS = [("torchvision", "googlenet", 64, 10), ("torchvision", "inception_v3", 80, 10),
          ("timm", "inception_v3", 80, 10), ("timm", "inception_v4", 80, 14)]


@pytest.mark.parametrize("source, name, size, pools", MODELS,
                         ids=[f"{s}-{n}" for s, n, _, _ in MODELS])
def test_fuse(source, name, size, pools):
    report = check_model(build(source, name), size=size)
    assert report.coverage == 1.0, str(report)
    assert report.fused["pool + 1x1 in one op"] == pools
    assert report.fused["batchnorm folded"] == report.conv_sites
    assert report.fused["activation relu"] == report.conv_sites


class PoolBranch(nn.Module):
    """An Inception block's pool projection beside a 1x1 branch, concatenated; `variant`
    changes the pool or puts an in-place write between the pool and its conv."""

    def __init__(self, variant: str = "max"):
        super().__init__()
        self.variant = variant
        self.pool = {"max": nn.MaxPool2d(3, 1, 1, ceil_mode=True),
                     "avg": nn.Identity(),
                     "ceil s2": nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                     "written": nn.MaxPool2d(3, 1, 1)}[variant]
        self.proj, self.branch = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        x = x * 1.0
        pooled = self.pool(x)  # (avg: the functional form below instead)
        if self.variant == "written":
            pooled = pooled + 0.0  # the pool's output, read by the conv, is not the pool node
            x.mul_(2.0)
        if self.variant == "avg":
            pooled = F.avg_pool2d(x, 3, 1, 1)  # the functional form, padding counted
        projected = torch.relu(self.bn(self.proj(pooled)))
        if self.variant == "ceil s2":  # 7x6 -> 4x4 where floor mode gives 3x3
            return projected
        return torch.cat([self.branch(x), projected], 1)


@pytest.mark.parametrize("backend_name", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("variant, fused", [("max", 1), ("avg", 1), ("ceil s2", 1),
                                            ("written", 0)])
def test_pool_projection(variant, fused, backend_name, monkeypatch):
    """Fused where PyTorch's pool is what pool_conv2d computes (floor or ceil mode),
    written into its concat slice; exact everywhere."""
    if backend_name == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("CNNFUSE_BACKEND", backend_name)
    model = randomize_batchnorm(PoolBranch(variant)).eval()
    x = torch.randn(2, 8, 7, 6)
    with torch.no_grad():
        expected = model(x.clone())
        got = cnnfuse.fuse(model)(x.clone().contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < 2e-5
    report = cnnfuse.explain(model)
    assert report.fused["pool + 1x1 in one op"] == fused
    if fused and variant != "ceil s2":  # (that variant has no concatenation)
        assert report.fused["conv writes its concat slice"] == 2


class PoolSizedInGraph(nn.Module):
    """Pools whose window is computed in the graph, or given as a one-element list: not what
    pool_conv2d takes (or, for the list, taken as the pair it means)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d([3], [1], [1])
        self.a, self.b, self.c = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return (self.a(F.avg_pool2d(x, x.size()[2:])) + self.b(F.max_pool2d(x, x.size(2)))
                + self.c(self.pool(x)))


def test_pool_sizes_computed_in_the_graph():
    model = PoolSizedInGraph().eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert relative_error(cnnfuse.fuse(model)(x), model(x)) < 2e-5
    assert cnnfuse.explain(model).fused["pool + 1x1 in one op"] == 1  # the list form
