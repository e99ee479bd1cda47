"""IGC-V1: interleaved group convolutions (primary grouped 3x3, channel interleave, secondary
grouped 1x1, inverse interleave) in ResNet-18-style ImageNet networks."""
import copy

import pytest
import torch
import torch.nn.functional as F

import cnnfuse
from cnnfuse.backend import tracing

from cnnfuse.models.architectures import igc_l4m32, igc_l16m16, igc_l100m2
from cnnfuse.models.architectures.igc import BasicBlock, IGCBlock, IGCNet, interleave

from ..util import randomize_batchnorm, relative_error, triton_runnable
from .seed_harness import check_seed, count_params


def _composed_kernel(block: IGCBlock, cin: int) -> torch.Tensor:
    """The (cout, cin) channel-mixing matrix of the block at a 3x3 kernel's centre tap: the
    response to one-hot single-pixel inputs (padding zeroes the other taps)."""
    with torch.no_grad():
        return block(torch.eye(cin).view(cin, cin, 1, 1)).view(cin, -1).T


@pytest.mark.parametrize("partitions, per_partition", [(2, 3), (4, 2), (3, 5)])
def test_block_is_one_dense_kernel(partitions, per_partition):
    """Eq. 3 of the paper: P^T W^d P W^p is a regular conv with a dense kernel, since each
    secondary partition takes one channel from every primary partition (complementary
    condition). Without the interleave the product would be block-diagonal."""
    torch.manual_seed(0)
    c = partitions * per_partition
    block = IGCBlock(c, partitions, per_partition).eval()
    dense = _composed_kernel(block, c)
    assert (dense.abs() > 0).all(), dense
    wp, wd = block.primary.weight.double(), block.secondary.weight.double()
    # The same kernel built from the two weights: primary as a dense block-diagonal matrix,
    # the secondary's partitions in interleaved channel order.
    primary = torch.block_diag(*wp[:, :, 1, 1].split(per_partition, 0))
    order = torch.arange(c).view(partitions, per_partition).T.reshape(-1)  # P: new -> old
    secondary = torch.block_diag(*wd[:, :, 0, 0].split(partitions, 0))
    inverse = torch.argsort(order)
    want = secondary[inverse][:, inverse] @ primary
    assert torch.allclose(dense.double(), want, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, c, 5, 7, dtype=torch.double)
    y = block.double()(x)
    spatial = F.conv2d(x, wp, padding=1, groups=partitions)
    assert torch.allclose(y, F.conv2d(spatial, (secondary[inverse][:, inverse])[..., None, None]))


def test_interleave():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert interleave(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert torch.equal(interleave(interleave(x, 2), 3), x)


@pytest.mark.parametrize("make, widths", [(igc_l4m32, (128, 256, 512, 1024)),
                                          (igc_l16m16, (256, 512, 1024, 2048)),
                                          (igc_l100m2, (200, 400, 800, 1600))],
                         ids=["L4M32", "L16M16", "L100M2"])
def test_layout(make, widths):
    """Four stages of two blocks, channels doubled at each down-sampling (by M, or by L for
    L100M2, as the paper's ImageNet table says); the primary conv's parameters are 9*C*M and
    the secondary's C*L per IGC block."""
    model = make(num_classes=10)
    blocks = list(model.blocks)
    assert len(blocks) == 8
    assert tuple(b.bn2.num_features for b in blocks[::2]) == widths
    for b in blocks:
        for igc in (b.igc1, b.igc2):
            c, m, l = igc.secondary.out_channels, igc.per_partition, igc.partitions
            assert count_params(igc.secondary) == c * l
            assert count_params(igc.primary) == 9 * igc.primary.in_channels * m
    assert 8e6 < count_params(make()) < 17e6  # ResNet-18-sized (11.7M), as the paper pairs them
    with pytest.raises(ValueError, match="double"):
        IGCNet(4, 8, double="C")
    with pytest.raises(ValueError, match="divisible"):
        IGCBlock(10, 4, 8)
    with pytest.raises(ValueError, match="num_classes"):
        igc_l4m32(num_classes=0)


def test_fuse():
    """Every conv fused, all 20 BatchNorms folded and all 17 ReLUs absorbed: the
    BatchNorm-ReLU after each interleave moves before it (its parameters permuted) into the
    secondary conv's epilogue, and so does each residual add (P(z) + r = P(z + P^-1(r)): r's
    own permutation cancels, or the shortcut conv's rows are permuted, or, after the stem's
    pool, r is copied once). The interleaves between grouped convs stay copies, each listed."""
    result = check_seed(igc_l4m32(num_classes=100), sizes=(64, 67))
    report = result.report
    assert result.batchnorms == 20
    assert result.folded == 20, str(report)
    assert report.activations_absorbed == report.activation_sites == 17, str(report)
    assert report.fused["residual add"] == 8, str(report)
    assert report.fused["channel permutation as one copy"] == 33, str(report)


def test_fuse_doubling_l_on_cpu_kernels(backend):
    """A network that doubles L, as IGC-L100M2 does (here L=8, M=2 to keep the test small):
    each stage's first primary conv has one input channel per group and two outputs (a
    depthwise conv with channel multiplier 2), which the depthwise C++ kernel's CPU build
    runs."""
    backend("cuda")
    with tracing() as calls:
        result = check_seed(IGCNet(8, 2, double="L", num_classes=10), sizes=(24, 27))
    assert result.folded == 20, str(result.report)
    for i in (2, 4, 6):  # the first block of stages 2-4
        conv = result.fused.get_submodule(f"blocks.{i}.igc1.primary")
        assert conv.groups == conv.in_channels and conv.out_channels == 2 * conv.in_channels
    ran = {b for op, b in calls if op == "conv2d"}
    assert any("depthwise" in b for b in ran), ran


def test_fuse_folds_every_batchnorm():
    result = check_seed(IGCNet(2, 4, num_classes=10), sizes=(33,))
    assert result.folded == result.batchnorms
    assert result.report.activations_absorbed == result.report.activation_sites


@pytest.mark.parametrize("stride", [1, 2])
def test_block_on_triton(stride, monkeypatch):
    """One residual block through the Triton kernels (interpreter on the CPU): grouped 3x3
    and 1x1 convs with the interleave between them and the projected shortcut."""
    if not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("CNNFUSE_BACKEND", "triton")
    block = randomize_batchnorm(BasicBlock(6, 2, 4, stride)).eval()
    x = torch.randn(1, 6, 7, 5)
    with torch.no_grad():
        want = copy.deepcopy(block).double()(x.double())
        fused = cnnfuse.fuse(block)
        with tracing() as calls:
            got = fused(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, want) < 2e-5
    convs = [backend for op, backend in calls if op == "conv2d"]
    assert len(convs) >= 5 and all("Triton" in backend for backend in convs), calls
