"""Fused nn.Modules (`modules/`), the passes that swap them into existing models (`passes/`),
and the seed architectures no library ships (`architectures/`)."""
from .fuse import explain, fuse
from .modules import FusedConv2d, FusedSqueezeExcite
from .report import FusionReport

__all__ = ["FusedConv2d", "FusedSqueezeExcite", "FusionReport", "explain", "fuse"]
