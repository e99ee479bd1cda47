"""Activation epilogue shared by the Triton kernels; codes follow cnnfuse.ref.activation."""
import triton
import triton.language as tl


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    if ACT == 1:  # relu
        x = tl.maximum(x, 0.0)
    elif ACT == 2:  # relu6
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif ACT == 3:  # silu
        x = x * tl.sigmoid(x)
    elif ACT == 4:  # hardswish
        x = x * (tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) * (1.0 / 6.0))
    elif ACT == 5:  # hardsigmoid
        x = tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) * (1.0 / 6.0)
    elif ACT == 6:  # sigmoid
        x = tl.sigmoid(x)
    elif ACT == 7:  # gelu (erf)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 8:  # gelu (tanh), tanh written through sigmoid: tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * z)
    return x
