"""Activations every fused op understands: the one table, its spelling, fp32 references and
eager's in-place forms.

An activation crosses every op schema and module attribute as one `str`: a bare name
("relu", "selu") or a name with its parameters, "leaky_relu(0.2)", "elu(1.0)",
"hardtanh(-1.0,1.0)", "softplus(1.0,20.0)". `canonical` gives each activation one spelling
(the parameters as Python's exact float repr, defaults filled in, hardtanh(0, 6) as relu6), so
equal activations compare equal as strings. Kernels take `activation_args(name)`, the triple
(code, p0, p1): a Triton constexpr as it is, the int and two floats of the C++ ops.

The code is the position in ACTIVATIONS and crosses into kernels (Triton constexpr, the C++
enum in csrc/common/activation.h), so the order is part of the ABI: append, never reorder.

Formulas are PyTorch's (torch.nn docs): leaky_relu(x) = x if x > 0 else slope·x (PReLU with
one weight a is leaky_relu(a), for any a); elu = x if x > 0 else alpha·(exp(x) - 1) (Clevert
et al. 2015); celu = x if x > 0 else alpha·(exp(x/alpha) - 1) (Barron 2017); selu =
scale·elu(x, alpha) with the constants of Klambauer et al. 2017; mish = x·tanh(softplus(x))
(Misra 2019); hardtanh = clamp(x, min_val, max_val); softplus = x if beta·x > threshold
else log(1 + exp(beta·x)) / beta. celu takes either sign of alpha (aten computes it as
x <= 0 ? alpha·(exp(x·(1/alpha)) - 1) : x). NaN goes through every activation, as in
PyTorch; ±inf gives PyTorch's float32 result (silu(-inf) is NaN, as -inf·0).
"""
import functools
import math
import re

import torch
import torch.nn.functional as F

ACTIVATIONS = (
    "none", "relu", "relu6", "silu", "hardswish", "hardsigmoid", "sigmoid", "gelu", "gelu_tanh",
    "leaky_relu", "elu", "celu", "selu", "mish", "tanh", "hardtanh", "softplus",
)

# The parameters of those that have any: (name, PyTorch's default) in the order kernels take
# them as p0, p1.
PARAMETERS = {
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "celu": (("alpha", 1.0),),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
}

# SELU's fixed point constants (Klambauer et al. 2017), as torch.nn.SELU has them.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

_SPELLING = re.compile(r"\s*([a-z][a-z0-9_]*)\s*(?:\(([^()]*)\))?\s*$")


def _unsupported(name) -> ValueError:
    return ValueError(f"activation={name!r} is not supported; choose one of {ACTIVATIONS}, "
                      "parameters in brackets where they have any, e.g. 'leaky_relu(0.2)'")


# The largest finite float32. A finite parameter beyond it is refused as PyTorch refuses it on
# a float32 tensor ("value cannot be converted to type float without overflow"); kept, it
# would also make Triton type the constant, and so the whole epilogue, as float64.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_params(base: str, params: tuple) -> None:
    if any(math.isnan(p) for p in params):
        raise ValueError(f"{base}: a parameter is NaN ({params})")
    if any(math.isfinite(p) and abs(p) > _FLOAT32_MAX for p in params):
        raise ValueError(f"{base}: a parameter is beyond float32's range ({params}); PyTorch "
                         "cannot apply it to a float32 tensor either")
    if base in ("leaky_relu", "elu", "celu") and not math.isfinite(params[0]):
        raise ValueError(f"{base}: {PARAMETERS[base][0][0]}={params[0]} must be finite")
    if base == "celu" and params[0] == 0.0:
        raise ValueError("celu: alpha must not be 0 (it divides x)")
    if base == "hardtanh" and not params[0] <= params[1]:
        raise ValueError(f"hardtanh: min_val={params[0]} is above max_val={params[1]}")
    if base == "softplus" and (params[0] == 0.0 or not math.isfinite(params[0])):
        raise ValueError(f"softplus: beta={params[0]} must be finite and not 0 (it divides)")


@functools.lru_cache(maxsize=1024)
def activation_args(name: str) -> tuple:
    """(code, p0, p1) of an activation spelled as ACTIVATIONS names it, with its parameters in
    brackets or, without them, PyTorch's defaults: what the kernels take (a Triton constexpr,
    the C++ ops' int and floats). Parameters an activation lacks are 0.0. Cached: the eager
    path calls it per call.

    Raises TypeError for a non-str, ValueError for an unknown name, a wrong number of
    parameters or a value the formula cannot take (NaN, celu's alpha 0, ...)."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str, got {type(name).__name__}")
    m = _SPELLING.match(name)
    if m is None or m.group(1) not in ACTIVATIONS:
        raise _unsupported(name)
    base, inside = m.group(1), m.group(2)
    names = PARAMETERS.get(base, ())
    if inside is None or not inside.strip():
        params = tuple(default for _, default in names)
    else:
        try:
            params = tuple(float(p) + 0.0 for p in inside.split(","))  # + 0.0: no -0.0
        except ValueError:
            raise ValueError(f"activation={name!r}: parameters must be numbers") from None
    if len(params) != len(names):
        wanted = ", ".join(n for n, _ in names) or "none"
        raise ValueError(f"activation={name!r}: {base} takes {len(names)} parameter(s) "
                         f"({wanted}), got {len(params)}")
    _check_params(base, params)
    if base == "hardtanh" and params == (0.0, 6.0):
        return (ACTIVATIONS.index("relu6"), 0.0, 0.0)  # the same function: one spelling
    return (ACTIVATIONS.index(base),) + params + (0.0,) * (2 - len(params))


def activation_code(name: str) -> int:
    """The kernel code of an activation (see activation_args; raises the same errors)."""
    return activation_args(name)[0]


@functools.lru_cache(maxsize=1024)
def activation_name(code: int, p0: float = 0.0, p1: float = 0.0) -> str:
    """The canonical spelling of (code, p0, p1), activation_args' inverse."""
    if not isinstance(code, int) or not 0 <= code < len(ACTIVATIONS):
        raise ValueError(f"activation code {code!r} is not one of 0..{len(ACTIVATIONS) - 1}")
    base = ACTIVATIONS[code]
    n = len(PARAMETERS.get(base, ()))
    if not n:
        return base
    return canonical(f"{base}({','.join(repr(float(p) + 0.0) for p in (p0, p1)[:n])})")


@functools.lru_cache(maxsize=1024)
def canonical(name: str, *params: float) -> str:
    """The one spelling of an activation: canonical("leaky_relu", 0.2) and
    canonical("leaky_relu( 0.2 )") are both "leaky_relu(0.2)"; canonical("leaky_relu") is
    "leaky_relu(0.01)" (PyTorch's default); canonical("hardtanh", 0, 6) is "relu6". With
    params, `name` is a bare name. Raises as activation_args does."""
    if params:
        if not isinstance(name, str) or "(" in name:
            raise ValueError(f"canonical({name!r}, ...): give a bare name with the parameters")
        name = f"{name}({','.join(repr(float(p)) for p in params)})"
    code, p0, p1 = activation_args(name)
    base = ACTIVATIONS[code]
    n = len(PARAMETERS.get(base, ()))
    return base if not n else f"{base}({','.join(repr(p) for p in (p0, p1)[:n])})"


# The references, by code: f(y, p0, p1) on an fp32 or fp64 tensor; eager's own functions
# where they are the formula (so the reference is PyTorch's to the rounding).
_REFERENCE = (
    lambda y, a, b: y,
    lambda y, a, b: torch.relu(y),
    lambda y, a, b: y.clamp(0.0, 6.0),
    lambda y, a, b: y * torch.sigmoid(y),
    lambda y, a, b: y * (y + 3.0).clamp(0.0, 6.0) / 6.0,
    lambda y, a, b: (y + 3.0).clamp(0.0, 6.0) / 6.0,
    lambda y, a, b: torch.sigmoid(y),
    lambda y, a, b: 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0))),
    lambda y, a, b: F.gelu(y, approximate="tanh"),
    lambda y, a, b: F.leaky_relu(y, a),
    lambda y, a, b: F.elu(y, a),
    lambda y, a, b: F.celu(y, a),
    lambda y, a, b: F.selu(y),
    lambda y, a, b: F.mish(y),
    lambda y, a, b: torch.tanh(y),
    lambda y, a, b: F.hardtanh(y, a, b),
    lambda y, a, b: F.softplus(y, a, b),
)


def apply_activation(y: torch.Tensor, name: str) -> torch.Tensor:
    """act(y) for any activation spelling (see activation_args), in y's dtype."""
    code, p0, p1 = activation_args(name)
    return _REFERENCE[code](y, p0, p1)


# In-place forms on a fresh fp32 result, by name: eager's own functions, so a fused model's
# CPU plans round as the original does. Each entry makes, from (p0, p1), the callable of y
# that runs: eager's function itself, bound to its parameters, with no wrapper in between
# (the eager path calls it per call). gelu and softplus have no in-place form; "none" is
# nothing to do.
_P = functools.partial
_INPLACE = {
    "none": lambda a, b: None,
    "relu": lambda a, b: torch.relu_,
    "relu6": lambda a, b: _P(torch.clamp_, min=0.0, max=6.0),
    "silu": lambda a, b: _P(F.silu, inplace=True),
    "hardswish": lambda a, b: _P(F.hardswish, inplace=True),
    "hardsigmoid": lambda a, b: _P(F.hardsigmoid, inplace=True),
    "sigmoid": lambda a, b: torch.sigmoid_,
    "gelu": lambda a, b: F.gelu,
    "gelu_tanh": lambda a, b: _P(F.gelu, approximate="tanh"),
    "leaky_relu": lambda a, b: _P(F.leaky_relu, negative_slope=a, inplace=True),
    "elu": lambda a, b: _P(F.elu, alpha=a, inplace=True),
    "celu": lambda a, b: _P(F.celu, alpha=a, inplace=True),
    "selu": lambda a, b: _P(F.selu, inplace=True),
    "mish": lambda a, b: _P(F.mish, inplace=True),
    "tanh": lambda a, b: torch.tanh_,
    "hardtanh": lambda a, b: _P(F.hardtanh, min_val=a, max_val=b, inplace=True),
    "softplus": lambda a, b: _P(F.softplus, beta=a, threshold=b),
}


@functools.lru_cache(maxsize=1024)
def _inplace(name: str):
    code, p0, p1 = activation_args(name)
    return _INPLACE[ACTIVATIONS[code]](p0, p1)


def activate_(y: torch.Tensor, name: str) -> torch.Tensor:
    """apply_activation(y, name), in place where eager has an in-place form; returns the
    result (y itself, or a new tensor for gelu and softplus)."""
    fn = _inplace(name)
    return y if fn is None else fn(y)
