"""Activation epilogue shared by the Triton kernels; codes and formulas follow
cnnfuse.ref.activation (the table there is the specification).

ACT is a constexpr: the triple (code, p0, p1) that cnnfuse.ref.activation_args gives, so each
parameter value specialises the kernel (it folds into an immediate operand, and the launch
cache keys on it), or a bare int code for an activation without parameters.

Triton has no expm1, log1p or tanh on both 3.6 and 3.8 (and the interpreter): they are
written here from exp with short series where exp(x) - 1 or log(1 + u) would cancel, so
ELU near 0 and softplus far below 0 keep their relative precision.

NaN goes through as PyTorch's kernels let it: every float clamp here is tl.minimum/tl.maximum
with propagate_nan=ALL (PTX min.NaN.f32/max.NaN.f32, SASS FMNMX.NAN: the same one
instruction as the default, which returns the operand that is not NaN, so relu(NaN) would be
0), and the branches test x <= 0 where x itself is the other side, so NaN takes x.
"""
import triton
import triton.language as tl


_PARAMETRISED = (9, 10, 11, 15, 16)  # leaky_relu, elu, celu, hardtanh, softplus


@triton.constexpr_function
def act_code(act):
    """The code of ACT (an int, or the first of a (code, p0, p1) triple). A bare code of an
    activation with parameters is refused: its parameters would silently be 0."""
    if isinstance(act, int):
        if act in _PARAMETRISED:
            raise ValueError(f"ACT={act}: an activation with parameters needs the triple "
                             "cnnfuse.ref.activation_args gives, not its bare code")
        return act
    return getattr(act[0], "value", act[0])


@triton.constexpr_function
def act_param(act, i):
    """Parameter i (1 or 2) of a (code, p0, p1) triple; 0.0 for a bare code."""
    if isinstance(act, int):
        return 0.0
    return float(getattr(act[i], "value", act[i]))


@triton.jit
def _min(x, y):
    return tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max(x, y):
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _expm1(x):
    # exp(x) - 1 loses relative precision below |x| ~ 0.5; there the Taylor series to x^8
    # (truncation under 1.5e-8 relative at |x| = 0.5).
    s = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (
        1.0 / 120.0 + x * (1.0 / 720.0 + x * (1.0 / 5040.0 + x * (1.0 / 40320.0))))))))
    return tl.where(tl.abs(x) < 0.5, s, tl.exp(x) - 1.0)


@triton.jit
def _log1p_unit(u):
    # log(1 + u) for 0 <= u <= 1 as 2·atanh(s), s = u / (2 + u) <= 1/3: the odd series to
    # s^17 (truncation under 1e-9 relative), exact in relative terms as u -> 0.
    s = u / (2.0 + u)
    t = s * s
    p = 1.0 + t * (1.0 / 3.0 + t * (1.0 / 5.0 + t * (1.0 / 7.0 + t * (1.0 / 9.0 + t * (
        1.0 / 11.0 + t * (1.0 / 13.0 + t * (1.0 / 15.0 + t * (1.0 / 17.0))))))))
    return 2.0 * s * p


@triton.jit
def _tanh(x):
    # tanh(a) = expm1(2a) / (expm1(2a) + 2) for a = |x|; 1 in fp32 from a = 9.1 on.
    a = _min(tl.abs(x), 10.0)
    e = _expm1(2.0 * a)
    t = e / (e + 2.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    CODE: tl.constexpr = act_code(ACT)
    P0: tl.constexpr = act_param(ACT, 1)
    P1: tl.constexpr = act_param(ACT, 2)
    if CODE == 1:  # relu
        x = _max(x, 0.0)
    elif CODE == 2:  # relu6
        x = _min(_max(x, 0.0), 6.0)
    elif CODE == 3:  # silu
        x = x * tl.sigmoid(x)
    elif CODE == 4:  # hardswish
        x = x * (_min(_max(x + 3.0, 0.0), 6.0) * (1.0 / 6.0))
    elif CODE == 5:  # hardsigmoid
        x = _min(_max(x + 3.0, 0.0), 6.0) * (1.0 / 6.0)
    elif CODE == 6:  # sigmoid
        x = tl.sigmoid(x)
    elif CODE == 7:  # gelu (erf)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif CODE == 8:  # gelu (tanh), tanh written through sigmoid: tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * z)
    elif CODE == 9:  # leaky_relu(negative_slope); PReLU with one weight
        x = tl.where(x > 0, x, x * P0)
    elif CODE == 10:  # elu(alpha)
        x = tl.where(x <= 0, P0 * _expm1(_min(x, 0.0)), x)
    elif CODE == 11:  # celu(alpha): elu with its input divided by alpha, as PyTorch's
        # x <= 0 ? alpha·expm1(x·(1/alpha)) : x for either sign of alpha (for alpha < 0 the
        # exponent is >= 0). x is clamped, not x/alpha: the clamp only keeps the branch that
        # is not taken from overflowing.
        x = tl.where(x <= 0, P0 * _expm1(_min(x, 0.0) * (1.0 / P0)), x)
    elif CODE == 12:  # selu
        x = 1.0507009873554805 * tl.where(
            x <= 0, 1.6732632423543772 * _expm1(_min(x, 0.0)), x)
    elif CODE == 13:  # mish: x·tanh(log(1 + e^x)) = x·n / (n + 2), n = e^x (e^x + 2)
        e = tl.exp(_min(x, 20.0))
        n = e * (e + 2.0)
        x = tl.where(x > 20.0, x, x * (n / (n + 2.0)))
    elif CODE == 14:  # tanh
        x = _tanh(x)
    elif CODE == 15:  # hardtanh(min_val, max_val)
        x = _min(_max(x, P0), P1)
    elif CODE == 16:  # softplus(beta, threshold) = max(z, 0) + log(1 + e^-|z|) over beta
        z = x * P0
        sp = (_max(z, 0.0) + _log1p_unit(tl.exp(-tl.abs(z)))) * (1.0 / P0)
        x = tl.where(z > P1, x, sp)
    return x
