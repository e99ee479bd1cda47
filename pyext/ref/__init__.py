"""fp32 references: the specification of every op and its CPU implementation."""
from .activation import ACTIVATIONS, activation_args, activation_code, activation_name, \
    apply_activation, canonical
from .bias_act import bias_act
from .conv2d import affine_act, conv2d, prologue, scale_channels
from .depthwise_conv2d import depthwise_conv2d
from .pool_conv2d import pool2d, pool_conv2d
from .se_gate import se_gate

__all__ = ["ACTIVATIONS", "activation_args", "activation_code", "activation_name", "affine_act",
           "apply_activation", "bias_act", "canonical",
           "conv2d", "depthwise_conv2d", "pool2d", "pool_conv2d", "prologue", "scale_channels",
           "se_gate"]
