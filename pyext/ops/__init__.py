"""Public functional ops; each is also a torch.library op under torch.ops.cnnfuse."""
from .bias_act import bias_act
from .conv2d import conv2d
from .depthwise_conv2d import depthwise_conv2d
from .pool_conv2d import pool_conv2d
from .se_gate import se_gate
from .separable_conv2d import separable_conv2d
from . import triton_conv2d, triton_window_conv2d  # noqa: F401  (triton_ops, for export)

__all__ = ["bias_act", "conv2d", "depthwise_conv2d", "pool_conv2d", "se_gate",
           "separable_conv2d"]
