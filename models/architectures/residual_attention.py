"""Residual Attention Network: attention modules whose soft mask M(x) in (0, 1) scales the
trunk T(x) as (1 + M(x)) * T(x), built from pre-activation bottleneck residual units.

Wang, Jiang, Qian, Yang, Li, Zhang, Wang & Tang, "Residual Attention Network for Image
Classification", CVPR 2017 (arXiv:1704.06904): the attention module of section 3 and Figure 2
(hyper-parameters p=1, t=2, r=1), the mask branch of section 3.3 (max-pool down-sampling to
the lowest resolution, 7x7 at 224, skip connections between the bottom-up and top-down
paths, bilinear up-sampling, two 1x1 convs, sigmoid), and the ImageNet layouts of Table 2
(Attention-56: one module per stage; Attention-92: 1, 2 and 3).
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PreActBottleneck", "AttentionModule", "ResidualAttentionNet", "attention56",
           "attention92"]


class PreActBottleneck(nn.Module):
    """A pre-activation bottleneck residual unit (He et al., "Identity Mappings in Deep
    Residual Networks", 2016): BN-ReLU-1x1 (cout/4), BN-ReLU-3x3 (stride), BN-ReLU-1x1 (cout),
    added to the input, or, when the shape changes, to a 1x1 (stride) projection of the
    pre-activated input. (N, cin, H, W) -> (N, cout, ceil(H/stride), ceil(W/stride))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cout // 4
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(mid), nn.Conv2d(mid, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[PreActBottleneck(channels, channels) for _ in range(n)])


class AttentionModule(nn.Module):
    """One attention module (Figure 2, p=1, t=2, r=1), `depth` max-pool down-samplings deep.

    p units, then the trunk branch (t units) and the soft-mask branch: `depth` times a 3x3/2
    max pool and r units (2r at the lowest resolution), a skip unit on each down-sampled map
    but the lowest; back up, bilinear interpolation to the size of the map it came from, plus
    that level's skip; r units after each sum; the last interpolation returns to the trunk's
    size; then BN-ReLU-1x1-BN-ReLU-1x1 and a sigmoid give M. Output: p units of (1 + M) * T.
    Shape-preserving, (N, C, H, W) -> (N, C, H, W), at any H, W.
    """

    def __init__(self, channels: int, depth: int):
        super().__init__()
        self.pre = _units(channels, 1)
        self.trunk = _units(channels, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.down = nn.ModuleList(_units(channels, 1 if i < depth - 1 else 2)
                                  for i in range(depth))
        self.skips = nn.ModuleList(_units(channels, 1) for _ in range(depth - 1))
        self.up = nn.ModuleList(_units(channels, 1) for _ in range(depth - 1))
        self.mask_out = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False), nn.Sigmoid())
        self.post = _units(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask, skips, sizes = x, [], []
        for i, down in enumerate(self.down):
            sizes.append(mask.shape[-2:])
            mask = down(self.pool(mask))
            if i < len(self.skips):
                skips.append(self.skips[i](mask))
        for i in reversed(range(len(self.up))):
            mask = F.interpolate(mask, size=skips[i].shape[-2:], mode="bilinear",
                                 align_corners=False) + skips[i]
            mask = self.up[i](mask)
        mask = F.interpolate(mask, size=trunk.shape[-2:], mode="bilinear",
                             align_corners=False)
        mask = self.mask_out(mask)
        return self.post((1 + mask) * trunk)


class ResidualAttentionNet(nn.Module):
    """Attention-56 or -92 (Table 2 of Wang et al. 2017).

    Input (N, 3, H, W) float (224 in the paper); output (N, num_classes) logits. Stem: 7x7/2
    conv 64 + BN + ReLU, 3x3/2 max pool; a unit to 256 and `modules[0]` attention modules at
    56x56 (3 down-samplings in their masks); a stride-2 unit to 512 and `modules[1]` modules
    at 28x28 (2); a stride-2 unit to 1024 and `modules[2]` modules at 14x14 (1); three units
    to 2048 (the first at stride 2); BN-ReLU, global average pooling, one fully connected
    layer. Parameters at 1000 classes: Attention-56 31.8M, Attention-92 52.5M (Table 4 of the
    paper: 31.9M and 51.3M; 6.3G and 10.5G multiply-adds at 224, Table 4: 6.2G and 10.4G).
    Raises ValueError for a bad num_classes or modules.
    """

    def __init__(self, modules: tuple, num_classes: int = 1000):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if len(modules) != 3 or not all(isinstance(n, int) and n >= 0 for n in modules):
            raise ValueError(f"modules must be three counts >= 0, got {modules!r}")
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for stage, (cout, count) in enumerate(zip((256, 512, 1024), modules)):
            layers.append(PreActBottleneck(cin, cout, 1 if stage == 0 else 2))
            layers += [AttentionModule(cout, depth=3 - stage) for _ in range(count)]
            cin = cout
        layers += [PreActBottleneck(cin, 2048, 2), PreActBottleneck(2048, 2048),
                   PreActBottleneck(2048, 2048)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(2048), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def attention56(num_classes: int = 1000) -> ResidualAttentionNet:
    """Attention-56 (Table 2): one attention module at each of the three stages."""
    return ResidualAttentionNet((1, 1, 1), num_classes)


def attention92(num_classes: int = 1000) -> ResidualAttentionNet:
    """Attention-92 (Table 2): 1, 2 and 3 attention modules at the three stages."""
    return ResidualAttentionNet((1, 2, 3), num_classes)
