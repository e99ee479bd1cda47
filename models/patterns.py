"""What the fusion passes recognise: activations in module, function and method form, and
residual adds. Tables, not code per model: every family written with these ops is covered."""
import functools
import inspect
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

_ACT_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
}
_ACT_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def activation_of_module(m: nn.Module) -> Optional[str]:
    if type(m) in _ACT_MODULES:
        return _ACT_MODULES[type(m)]
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
        return "relu6"
    return None


def activation_of_node(node: fx.Node, modules: dict) -> Optional[str]:
    """The activation a graph node applies to its first input, or None."""
    if node.op == "call_module":
        return activation_of_module(modules[node.target])
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            return _ACT_FUNCTIONS[node.target]
        if node.target is F.gelu:
            return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
        if node.target is F.hardtanh:
            lo, hi = (list(node.args[1:3]) + [node.kwargs.get("min_val", -1.0),
                                                node.kwargs.get("max_val", 1.0)])[:2]
            return "relu6" if (lo, hi) == (0.0, 6.0) else None
        return None
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target] if len(node.args) == 1 else None
    return None


@functools.cache
def _stochastic_depth():
    """torchvision's stochastic_depth (FX keeps it as a call), if torchvision is installed."""
    try:
        from torchvision.ops import stochastic_depth
        return stochastic_depth
    except ImportError:
        return None


def identity_at_inference(m: nn.Module) -> bool:
    """Identity, dropout, or stochastic depth / drop path in eval mode."""
    return isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)) or (
        type(m).__name__ in ("StochasticDepth", "DropPath") and not m.training)


def inference_passthrough(node: fx.Node, modules: dict) -> Optional[fx.Node]:
    """The input of a node that is the identity at inference (see identity_at_inference;
    also F.dropout and torchvision's stochastic_depth called with training off), else None."""
    if node.op == "call_module":
        ok = (identity_at_inference(modules[node.target]) and len(node.args) == 1
              and not node.kwargs)
        return node.args[0] if ok else None
    if node.op != "call_function" or not node.args:
        return None
    if node.target in (F.dropout, F.dropout2d, F.alpha_dropout):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return node.args[0] if training is False else None
    if _stochastic_depth() is not None and node.target is _stochastic_depth():
        training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
        return node.args[0] if training is False else None
    return None


def residual_operands(node: fx.Node) -> Optional[tuple]:
    """(a, b) for a node computing a + b of two graph values with no scaling, else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or len(node.args) != 2 or set(node.kwargs) - {"out"} or node.kwargs.get("out"):
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return a, b


def adds_in_place(node: fx.Node) -> bool:
    """Whether an add that residual_operands matched writes into its first operand."""
    return node.target == "add_" or node.target is operator.iadd


_MUL_FUNCTIONS = (operator.mul, torch.mul)


def _is_hw(dims) -> bool:
    return isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]


def global_pool_input(node: fx.Node, modules: dict) -> Optional[fx.Node]:
    """The input of a global average pool that keeps (N, C, 1, 1), else None."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_module":
        m = modules[node.target]
        ok = (isinstance(m, nn.AdaptiveAvgPool2d)
              and m.output_size in (1, (1, 1), [1, 1]) and len(args) == 1)
        return args[0] if ok else None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return args[0] if size in (1, (1, 1), [1, 1]) else None
    is_mean = ((node.op == "call_method" and node.target == "mean")
               or (node.op == "call_function" and node.target is torch.mean))
    if is_mean and len(args) >= 2:
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        ok = _is_hw(args[1]) and keep is True and set(kwargs) <= {"keepdim"}
        return args[0] if ok else None
    return None


def mul_operands(node: fx.Node) -> Optional[tuple]:
    """(a, b) for a node computing a * b of two graph values, else None."""
    is_mul = ((node.op == "call_function" and node.target in _MUL_FUNCTIONS)
              or (node.op == "call_method" and node.target == "mul"))
    if not is_mul or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.setitem)


@functools.lru_cache(maxsize=None)
def _inplace_position(fn) -> Optional[int]:
    """The position of a function's `inplace` parameter, if it has one."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def may_mutate(node: fx.Node, modules: dict) -> bool:
    """Whether a node may write into one of its inputs (an in-place op, an `out=`, a module
    with inplace=True). Conservative: passes that move or share memory must not cross it."""
    if node.op == "call_method":
        return node.target.endswith("_") or "out" in node.kwargs
    if node.op == "call_module":
        m = modules.get(node.target)
        return bool(getattr(m, "inplace", False)) or "out" in node.kwargs
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    if getattr(node.target, "_cnnfuse_writes", False):
        return True
    position = _inplace_position(node.target) if callable(node.target) else None
    return position is not None and len(node.args) > position and bool(node.args[position])


_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                  "divisor_override")


def _pair(v) -> Optional[tuple]:
    """(a, b) from an int or a sequence of one or two ints; None for anything else (a size
    computed in the graph, say)."""
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return (v[0], v[-1])
    return None


def pool_window(node: fx.Node, modules: dict) -> Optional[tuple]:
    """(input, mode, kernel, stride, (pad_h, pad_w)) for a 2-D max or average pool that
    `ops.pool_conv2d` computes: no dilation, indices or divisor override, and floor-mode
    output sizes (ceil mode only at stride 1, where the two agree). mode: max, avg (padding
    counted in the divisor) or avg_valid. Else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if not isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) or len(node.args) != 1 or node.kwargs:
            return None
        names = _MAX_POOL_ARGS if isinstance(m, nn.MaxPool2d) else _AVG_POOL_ARGS
        p = {name: getattr(m, name) for name in names}
        is_max = isinstance(m, nn.MaxPool2d)
    elif node.op == "call_function" and node.target in (F.max_pool2d, F.avg_pool2d):
        is_max = node.target is F.max_pool2d
        names = _MAX_POOL_ARGS if is_max else _AVG_POOL_ARGS
        if len(node.args) - 1 > len(names) or set(node.kwargs) - set(names):
            return None
        p = dict(zip(names, node.args[1:]), **node.kwargs)
    else:
        return None
    x = node.args[0]
    if not isinstance(x, fx.Node) or "kernel_size" not in p:
        return None
    kernel = _pair(p["kernel_size"])
    stride = _pair(p.get("stride") or kernel) if kernel else None
    padding = _pair(p.get("padding", 0))
    if kernel is None or stride is None or padding is None:
        return None
    if (_pair(p.get("dilation", 1)) != (1, 1) or p.get("return_indices")
            or p.get("divisor_override") is not None
            or (p.get("ceil_mode") and stride != (1, 1))
            or padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2):
        return None
    mode = "max" if is_max else "avg" if p.get("count_include_pad", True) else "avg_valid"
    return x, mode, kernel, stride, padding
