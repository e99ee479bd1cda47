"""Fused nn.Modules and the passes that swap them into existing models."""
from .fuse import explain, fuse
from .fused_conv import FusedConv2d
from .report import FusionReport
from .squeeze_excite import FusedSqueezeExcite

__all__ = ["FusedConv2d", "FusedSqueezeExcite", "FusionReport", "explain", "fuse"]
