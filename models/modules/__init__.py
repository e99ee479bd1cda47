"""The fused nn.Modules that `fuse` swaps into a model, and the functions the rewritten graphs
call (concatenation buffers, the SE channel scale, the channel interleave in `permute`, the
attention product in `gate`)."""
from .fused_conv import FusedConv2d
from .pool_conv2d import FusedPoolConv2d
from .separable import FusedSeparableConv2d
from .squeeze_excite import FusedSqueezeExcite, channel_scale

__all__ = ["FusedConv2d", "FusedPoolConv2d", "FusedSeparableConv2d", "FusedSqueezeExcite",
           "channel_scale"]
