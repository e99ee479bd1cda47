"""The seed classifiers that neither torchvision nor timm ships, as plain PyTorch models:
BN-Inception, Network in Network, IGC-V1 and the Residual Attention Network.

Each constructor takes `num_classes` and returns a randomly initialised ImageNet-scale model
(input (N, 3, 224, 224) in its paper; smaller and odd sizes work too). `ARCHITECTURES` maps
the names the benchmark zoo uses ("cnnfuse/<name>") to the constructors.
"""
from .bn_inception import BNInception, bn_inception
from .igc import IGCNet, igc_l4m32, igc_l16m16, igc_l100m2
from .nin import NIN, nin
from .residual_attention import ResidualAttentionNet, attention56, attention92

ARCHITECTURES = {
    "bn_inception": bn_inception,
    "nin": nin,
    "igc_l4m32": igc_l4m32,
    "igc_l16m16": igc_l16m16,
    "igc_l100m2": igc_l100m2,
    "attention56": attention56,
    "attention92": attention92,
}

__all__ = ["ARCHITECTURES", "BNInception", "IGCNet", "NIN", "ResidualAttentionNet",
           "attention56", "attention92", "bn_inception", "igc_l4m32", "igc_l16m16",
           "igc_l100m2", "nin"]
