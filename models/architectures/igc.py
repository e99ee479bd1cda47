"""IGC-V1: interleaved group convolutions in a ResNet-18-style ImageNet network.

Zhang, Qi, Xiao & Wang, "Interleaved Group Convolutions for Deep Neural Networks", ICCV 2017
(arXiv:1707.02725): the IGC block of section 3 (Figure 1, Eq. 3: x' = P^T W^d P W^p x) and
the ImageNet networks of section 5.3 and its table (IGC-L4M32+Ident., IGC-L16M16+Ident.,
IGC-L100M2+Ident. against ResNet-18): four stages of two residual blocks each, the channel
count doubled at each down-sampling by doubling M with L kept (by doubling L for L100M2).
"+Ident." is the identity (residual) connection. The paper's table gives the widths, not the
stem; here the 7x7/2 stem conv outputs the first stage's width so that every block of the
first stage has an identity shortcut, and down-sampling blocks project theirs (1x1/2 conv +
BatchNorm, as ResNet's option B).
"""
import torch
from torch import nn

__all__ = ["IGCBlock", "IGCNet", "igc_l4m32", "igc_l16m16", "igc_l100m2"]


def interleave(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The permutation P: channel j*per_group + i goes to i*groups + j (the ShuffleNet idiom,
    view -> transpose -> reshape, which fuse matches as a store/load pattern)."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class IGCBlock(nn.Module):
    """One interleaved group convolution (no non-linearity inside: it is one linear kernel).

    Primary: a 3x3 conv with L groups (partitions of M output channels each, `stride` applied
    here); P: interleave so that secondary partition m holds channel m of every primary
    partition; secondary: a 1x1 conv with M groups of L channels; P^T: the inverse interleave.
    Input (N, cin, H, W), cin divisible by L; output (N, L*M, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, cin: int, partitions: int, per_partition: int, stride: int = 1):
        super().__init__()
        if cin % partitions:
            raise ValueError(f"cin ({cin}) must be divisible by partitions ({partitions})")
        self.partitions, self.per_partition = partitions, per_partition
        width = partitions * per_partition
        self.primary = nn.Conv2d(cin, width, 3, stride, 1, groups=partitions, bias=False)
        self.secondary = nn.Conv2d(width, width, 1, groups=per_partition, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = interleave(self.primary(x), self.partitions)
        return interleave(self.secondary(x), self.per_partition)


class BasicBlock(nn.Module):
    """ResNet's basic block with each 3x3 conv an IGC block: IGC -> BN -> ReLU -> IGC -> BN,
    plus the shortcut, then ReLU."""

    def __init__(self, cin: int, partitions: int, per_partition: int, stride: int):
        super().__init__()
        width = partitions * per_partition
        self.igc1 = IGCBlock(cin, partitions, per_partition, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.igc2 = IGCBlock(width, partitions, per_partition)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False),
                                            nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.igc1(x)))
        out = self.bn2(self.igc2(out))
        return self.relu(out + identity)


class IGCNet(nn.Module):
    """An IGC-L<L>M<M>+Ident. ImageNet network (Zhang et al. 2017, section 5.3).

    Input (N, 3, H, W) float (224 in the paper); output (N, num_classes) logits. Stem: 7x7/2
    conv to L*M channels + BN + ReLU, 3x3/2 max pool; four stages of two BasicBlocks at
    strides 1, 2, 2, 2, widths L*M doubled per stage (`double` = "M" or "L" says which factor
    doubles); global average pooling; one fully connected layer. Raises ValueError for a bad
    num_classes, double, or partition sizes.
    """

    def __init__(self, partitions: int, per_partition: int, double: str = "M",
                 num_classes: int = 1000):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if double not in ("M", "L"):
            raise ValueError(f"double must be 'M' or 'L', got {double!r}")
        width = partitions * per_partition
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for stage in range(4):
            for i in range(2):
                stride = 2 if stage and not i else 1
                blocks.append(BasicBlock(cin, partitions, per_partition, stride))
                cin = partitions * per_partition
            if double == "M":
                per_partition *= 2
            else:
                partitions *= 2
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def igc_l4m32(num_classes: int = 1000) -> IGCNet:
    """IGC-L4M32+Ident.: L=4 primary partitions of M=32 channels (widths 128-1024)."""
    return IGCNet(4, 32, "M", num_classes)


def igc_l16m16(num_classes: int = 1000) -> IGCNet:
    """IGC-L16M16+Ident.: L=16 primary partitions of M=16 channels (widths 256-2048)."""
    return IGCNet(16, 16, "M", num_classes)


def igc_l100m2(num_classes: int = 1000) -> IGCNet:
    """IGC-L100M2+Ident.: L=100 primary partitions of M=2 channels, L doubled per stage
    (widths 200-1600)."""
    return IGCNet(100, 2, "L", num_classes)
