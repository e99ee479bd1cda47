"""Network in Network: mlpconv blocks (a spatial conv, then two 1x1 convs, each with ReLU)
and global average pooling of per-class maps in place of fully connected layers.

Lin, Chen & Yan, "Network In Network", ICLR 2014 (arXiv:1312.4400), section 3 and Figure 2;
the paper gives only its CIFAR/SVHN/MNIST layouts, so the ImageNet layout is the authors'
released Caffe model-zoo NIN ("nin_imagenet"): four mlpconv blocks of 96, 256, 384 and 1024
channels, 11x11/4, 5x5, 3x3 and 3x3 spatial convs, 3x3/2 max pools between them, dropout
before the last block, whose last 1x1 conv has one channel per class.
"""
import torch
from torch import nn

__all__ = ["NIN", "nin"]

# (spatial kernel, stride, padding, channels) of each mlpconv block; the last block's third
# conv outputs num_classes channels instead.
_BLOCKS = ((11, 4, 0, 96), (5, 1, 2, 256), (3, 1, 1, 384), (3, 1, 1, 1024))


class MLPConv(nn.Sequential):
    """A spatial conv and two 1x1 convs (the "micro network" of section 3.1), each followed
    by ReLU, and by BatchNorm before it when batch_norm is True."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int,
                 last: int = 0, batch_norm: bool = False):
        layers = []
        specs = ((cin, cout, kernel, stride, padding), (cout, cout, 1, 1, 0),
                 (cout, last or cout, 1, 1, 0))
        for i, o, k, s, p in specs:
            layers.append(nn.Conv2d(i, o, k, s, p, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(o))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class NIN(nn.Module):
    """ImageNet NIN (Lin, Chen & Yan 2014, with the Caffe model-zoo ImageNet layout).

    Input (N, 3, H, W) float, H and W >= 39 (224 in the paper); output (N, num_classes):
    the global average of the last block's ReLU'd per-class maps (6x6 at 224). Max pools are
    3x3/2 in ceil mode as Caffe's (224 -> 54 -> 27 -> 13 -> 6). Dropout (p=0.5) before the last
    mlpconv; 7.60M parameters at 1000 classes (batch_norm=False). `batch_norm=True` adds a
    BatchNorm after every conv (a later training practice, not in the paper) and drops the
    conv biases. Raises ValueError for a num_classes that is not a positive int.
    """

    def __init__(self, num_classes: int = 1000, batch_norm: bool = False):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        layers, cin = [], 3
        for i, (kernel, stride, padding, cout) in enumerate(_BLOCKS):
            last = i == len(_BLOCKS) - 1
            if last:
                layers.append(nn.Dropout(0.5))
            layers.append(MLPConv(cin, cout, kernel, stride, padding,
                                  last=num_classes if last else 0, batch_norm=batch_norm))
            if not last:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def nin(num_classes: int = 1000, batch_norm: bool = False) -> NIN:
    """NIN for ImageNet (224x224 input), as the authors' Caffe model-zoo model."""
    return NIN(num_classes, batch_norm)
