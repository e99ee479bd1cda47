"""BN-Inception (Inception v2): GoogLeNet with BatchNorm after every conv and its 5x5 branch
as two stacked 3x3 convs.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
Covariate Shift", ICML 2015, appendix, Figure 5 (the table of the Inception network).
"""
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["BNInception", "bn_inception"]

# Figure 5, one row per inception block: #1x1, #3x3 reduce, #3x3, double #3x3 reduce,
# double #3x3, pool ("avg" | "max"), pool projection (0: a stride-2 block whose pool passes
# through unprojected and which has no 1x1 branch).
_BLOCKS = {
    "3a": (64, 64, 64, 64, 96, "avg", 32),
    "3b": (64, 64, 96, 64, 96, "avg", 64),
    "3c": (0, 128, 160, 64, 96, "max", 0),
    "4a": (224, 64, 96, 96, 128, "avg", 128),
    "4b": (192, 96, 128, 96, 128, "avg", 128),
    "4c": (160, 128, 160, 128, 160, "avg", 96),
    "4d": (96, 128, 192, 160, 192, "avg", 96),
    "4e": (0, 128, 192, 192, 256, "max", 0),
    "5a": (352, 192, 320, 160, 224, "avg", 128),
    "5b": (352, 192, 320, 192, 224, "max", 128),
}


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: the BatchNorm after it has one) -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InceptionBlock(nn.Module):
    """One row of Figure 5: a 1x1 branch, a 1x1 -> 3x3 branch, a 1x1 -> 3x3 -> 3x3 branch and
    a 3x3 pool (projected by a 1x1 conv, or passed through at stride 2), concatenated.

    At stride 2 the last conv of each 3x3 branch strides, and the pass-through max pool is
    padded by one so that every branch has the conv's output size, ceil(H / 2), at any H.
    """

    def __init__(self, cin: int, n1x1: int, n3r: int, n3: int, nd3r: int, nd3: int,
                 pool: str, proj: int):
        super().__init__()
        stride = 1 if proj else 2
        self.out_channels = n1x1 + n3 + nd3 + (proj or cin)
        self.branch1x1 = ConvBNReLU(cin, n1x1, 1) if n1x1 else None
        self.branch3x3 = nn.Sequential(ConvBNReLU(cin, n3r, 1),
                                       ConvBNReLU(n3r, n3, 3, stride, 1))
        self.branch3x3dbl = nn.Sequential(ConvBNReLU(cin, nd3r, 1),
                                          ConvBNReLU(nd3r, nd3, 3, 1, 1),
                                          ConvBNReLU(nd3, nd3, 3, stride, 1))
        pooling = nn.AvgPool2d(3, 1, 1) if pool == "avg" else nn.MaxPool2d(3, stride, 1)
        self.branch_pool = nn.Sequential(pooling, ConvBNReLU(cin, proj, 1)) if proj else pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.branch1x1(x)] if self.branch1x1 is not None else []
        outs += [self.branch3x3(x), self.branch3x3dbl(x), self.branch_pool(x)]
        return torch.cat(outs, 1)


class BNInception(nn.Module):
    """The Inception network of Figure 5 (Ioffe & Szegedy 2015).

    Input (N, 3, H, W) float, H and W >= 32 (224 in the paper); output (N, num_classes)
    logits. Stem: 7x7/2 conv 64, 3x3/2 max pool, 1x1 conv 64, 3x3 conv 192, 3x3/2 max pool
    (pools in ceil mode, as Caffe's, so 224 gives the table's 56 and 28); then blocks 3a-5b
    (widths 256, 320, 576 ... 576, 1024, 1024), global average pooling and one fully connected
    layer. The paper dropped dropout for this network (section 4.2.1), so there is none.
    Parameters: 11.19M at 1000 classes, counted from the table as printed (the paper's text
    says 13.6M, which the table does not reach; widely used Caffe ports project 4c/4d's pools
    to 128 channels instead of 96, which makes those blocks 608 wide).
    Raises ValueError for a num_classes that is not a positive int.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.stem = nn.Sequential(
            ConvBNReLU(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
            ConvBNReLU(64, 64, 1), ConvBNReLU(64, 192, 3, 1, 1),
            nn.MaxPool2d(3, 2, ceil_mode=True))
        blocks, cin = [], 192
        for name, row in _BLOCKS.items():
            block = InceptionBlock(cin, *row)
            blocks.append((f"inception_{name}", block))
            cin = block.out_channels
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def bn_inception(num_classes: int = 1000) -> BNInception:
    """BN-Inception as in Figure 5 of Ioffe & Szegedy 2015 (ImageNet, 224x224 input)."""
    return BNInception(num_classes)
