"""What the fusion passes recognise: activations in module, function and method form,
residual adds, SE products, pools, concatenations and channel shuffles. Tables, not code per
model: every family written with these ops is covered."""
import functools
import inspect
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ref.activation import canonical

_ACT_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid", nn.SELU: "selu", nn.Mish: "mish",
    nn.Tanh: "tanh",
}
# Modules with parameters: (activation, the attributes that are its parameters, in order).
_ACT_MODULES_WITH_PARAMETERS = {
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)), nn.ELU: ("elu", ("alpha",)),
    nn.CELU: ("celu", ("alpha",)), nn.Hardtanh: ("hardtanh", ("min_val", "max_val")),
    nn.Softplus: ("softplus", ("beta", "threshold")),
}
_ACT_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
}
# Functional forms with parameters: function -> (activation, what follows the input in its
# signature as (name, default)); "inplace" is a flag, not a parameter of the activation.
_INPLACE_FLAG = ("inplace", False)
_ACT_FUNCTIONS_WITH_PARAMETERS = {
    F.leaky_relu: ("leaky_relu", (("negative_slope", 0.01), _INPLACE_FLAG)),
    F.leaky_relu_: ("leaky_relu", (("negative_slope", 0.01),)),
    F.elu: ("elu", (("alpha", 1.0), _INPLACE_FLAG)),
    F.elu_: ("elu", (("alpha", 1.0),)),
    F.celu: ("celu", (("alpha", 1.0), _INPLACE_FLAG)),
    torch.celu: ("celu", (("alpha", 1.0),)),
    torch.celu_: ("celu", (("alpha", 1.0),)),
    F.selu: ("selu", (_INPLACE_FLAG,)),
    torch.selu: ("selu", ()),
    torch.selu_: ("selu", ()),
    F.mish: ("mish", (_INPLACE_FLAG,)),
    torch.tanh: ("tanh", ()),
    F.tanh: ("tanh", ()),
    torch.tanh_: ("tanh", ()),
    F.hardtanh: ("hardtanh", (("min_val", -1.0), ("max_val", 1.0), _INPLACE_FLAG)),
    F.hardtanh_: ("hardtanh", (("min_val", -1.0), ("max_val", 1.0))),
    F.softplus: ("softplus", (("beta", 1.0), ("threshold", 20.0))),
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


@functools.cache
def _timm_activations() -> dict:
    """timm's activation modules whose forward is one of the table's functions (as read in
    timm.layers.activations and activations_me): Swish x·sigmoid(x), Mish x·tanh(softplus(x)),
    HardSwish x·relu6(x + 3)/6, HardSigmoid relu6(x + 3)/6, GELU, GELUTanh, Sigmoid, Tanh, and
    the *Me (custom autograd) forms of the first four. HardMish and QuickGELU compute other
    functions; timm's PReLU is nn.PReLU's (see _prelu_types)."""
    try:
        from timm.layers import activations as a
    except ImportError:
        return {}
    table = {a.Swish: "silu", a.Mish: "mish", a.HardSwish: "hardswish",
             a.HardSigmoid: "hardsigmoid", a.GELU: "gelu", a.GELUTanh: "gelu_tanh",
             a.Sigmoid: "sigmoid", a.Tanh: "tanh"}
    try:
        from timm.layers import activations_me as me
        table.update({me.SwishMe: "silu", me.MishMe: "mish", me.HardSwishMe: "hardswish",
                      me.HardSigmoidMe: "hardsigmoid"})
    except ImportError:
        pass
    return table


@functools.cache
def _prelu_types() -> tuple:
    """nn.PReLU and timm's PReLU (whose forward is F.prelu(x, weight), nn.PReLU's own)."""
    try:
        from timm.layers.activations import PReLU
        return (nn.PReLU, PReLU)
    except ImportError:
        return (nn.PReLU,)


def _spelled(base: str, params) -> Optional[str]:
    """The canonical spelling, or None where a value is not a number the formula takes."""
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in params):
        return None
    try:
        return canonical(base, *params)
    except ValueError:
        return None


def _prelu(m: nn.Module) -> Optional[str]:
    """A PReLU with one weight a is leaky_relu(a) (PyTorch computes both as x > 0 ? x : a·x,
    so they agree at 0 too); the weight is read now, at fuse time."""
    if m.num_parameters != 1 or m.weight.numel() != 1:
        return None
    try:
        a = float(m.weight.detach().reshape(()))
    except (RuntimeError, NotImplementedError):  # a meta tensor has no value to read
        return None
    return _spelled("leaky_relu", (a,))


def activation_of_module(m: nn.Module) -> Optional[str]:
    """The activation a module computes, in cnnfuse.ref.activation's canonical spelling, or
    None. Exact types only: a subclass may have a forward of its own."""
    t = type(m)
    if t in _ACT_MODULES:
        return _ACT_MODULES[t]
    if t in _ACT_MODULES_WITH_PARAMETERS:
        base, attrs = _ACT_MODULES_WITH_PARAMETERS[t]
        return _spelled(base, [getattr(m, a) for a in attrs])
    if t is nn.GELU:
        return {"tanh": "gelu_tanh", "none": "gelu"}.get(m.approximate)
    if t in _prelu_types():
        return _prelu(m)
    return _timm_activations().get(t)


def unfused_activation_reason(m: nn.Module) -> Optional[str]:
    """Why an activation module stays, where there is more to say than that no kernel
    computes it (a PReLU with a weight per channel), else None."""
    if type(m) in _prelu_types() and m.num_parameters != 1:
        return (f"PReLU with {m.num_parameters} per-channel weights: the fused epilogues take "
                "one slope (a PReLU with one weight fuses); kept")
    return None


def _call_parameters(node: fx.Node, spec: tuple) -> Optional[list]:
    """The values of a call's parameters after its input (defaults filled in), or None when
    the call has arguments the spec does not name or a value not known at fuse time."""
    names = [name for name, _ in spec]
    if len(node.args) - 1 > len(spec) or set(node.kwargs) - set(names):
        return None
    values = dict(spec)
    values.update(zip(names, node.args[1:]))
    values.update(node.kwargs)
    if any(isinstance(v, fx.Node) for v in values.values()):
        return None
    if "inplace" in values and not isinstance(values.pop("inplace"), bool):
        return None
    return [values[name] for name in names if name != "inplace"]


def _prelu_call(node: fx.Node, modules: dict) -> Optional[str]:
    """F.prelu(x, weight) with weight a one-element parameter of the model (what a traced
    PReLU subclass, timm's, leaves in the graph): leaky_relu of its value now."""
    if len(node.args) != 2 or node.kwargs:
        return None
    weight = node.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    owner, _, name = weight.target.rpartition(".")
    value = getattr(modules.get(owner), name, None)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.is_meta:
        return None
    return _spelled("leaky_relu", (float(value.detach().reshape(())),))


def activation_of_node(node: fx.Node, modules: dict) -> Optional[str]:
    """The activation a graph node applies to its first input (canonical spelling), or None.
    Function and method forms count with their parameters given by position or keyword, in
    place or not; a parameter that is a graph value (a tensor, a traced size) does not."""
    if node.op == "call_module":
        return activation_of_module(modules[node.target])
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            return _ACT_FUNCTIONS[node.target]
        if node.target in _ACT_FUNCTIONS_WITH_PARAMETERS:
            base, spec = _ACT_FUNCTIONS_WITH_PARAMETERS[node.target]
            params = _call_parameters(node, spec)
            return None if params is None else _spelled(base, params)
        if node.target is F.prelu:
            return _prelu_call(node, modules)
        if node.target is F.gelu:
            params = _call_parameters(node, (("approximate", "none"),))
            return None if params is None else {"tanh": "gelu_tanh", "none": "gelu"}.get(
                params[0] if isinstance(params[0], str) else None)
        return None
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target] if len(node.args) == 1 and not node.kwargs else None
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


# Ops whose result may share storage with their (first) input: a write through one is a write
# through the other. Casts and .contiguous() return the input itself when nothing changes.
_VIEW_METHODS = frozenset((
    "view", "view_as", "reshape", "reshape_as", "narrow", "select", "expand", "expand_as",
    "transpose", "t", "permute", "squeeze", "unsqueeze", "flatten", "unflatten", "split",
    "split_with_sizes", "chunk", "unbind", "tensor_split", "hsplit", "vsplit", "dsplit",
    "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold", "as_strided",
    "detach", "contiguous", "to", "type", "type_as", "float", "half", "bfloat16", "double",
    "cpu", "cuda", "real", "imag", "view_as_real", "view_as_complex", "alias", "__getitem__",
    "requires_grad_", "data"))
_VIEW_FUNCTIONS = frozenset(getattr(torch, n) for n in (
    "narrow", "select", "transpose", "t", "permute", "squeeze", "unsqueeze", "flatten",
    "unflatten", "split", "chunk", "unbind", "tensor_split", "hsplit", "vsplit", "dsplit",
    "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "as_strided", "detach",
    "reshape", "view_as_real", "view_as_complex", "alias_copy") if hasattr(torch, n)) | {
    operator.getitem, getattr}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def may_alias_input(node: fx.Node, modules: dict) -> bool:
    """Whether a node's result may share storage with its first input: a view, a no-op cast,
    an in-place op (it returns its input), a module that returns its input at inference, or
    one of cnnfuse's buffer views (`_cnnfuse_view`)."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS or may_mutate(node, modules)
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, _VIEW_MODULES) or identity_at_inference(m) or may_mutate(
            node, modules)
    if node.op == "call_function":
        return (node.target in _VIEW_FUNCTIONS or getattr(node.target, "_cnnfuse_view", False)
                or may_mutate(node, modules))
    return False


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
    """(input, mode, kernel, stride, (pad_h, pad_w), ceil_mode) for a 2-D max or average pool
    that `ops.pool_conv2d` computes: no dilation, indices or divisor override, padding at most
    half the window (as PyTorch requires), floor or ceil mode. mode: max, avg (padding counted
    in the divisor) or avg_valid. Else None."""
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
    flags = (p.get("ceil_mode", False), p.get("count_include_pad", True))
    if (_pair(p.get("dilation", 1)) != (1, 1) or p.get("return_indices")
            or p.get("divisor_override") is not None
            or not all(isinstance(f, (bool, int)) for f in flags)  # not one computed in the graph
            or padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2):
        return None
    mode = "max" if is_max else "avg" if p.get("count_include_pad", True) else "avg_valid"
    return x, mode, kernel, stride, padding, bool(p.get("ceil_mode", False))


def cat_parts(node: fx.Node, min_parts: int = 2) -> Optional[list]:
    """The parts of a `torch.cat(parts, dim=1)` node, or None."""
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if (dim != 1 or not isinstance(parts, (list, tuple)) or len(parts) < min_parts
            or node.kwargs.get("out") is not None):
        return None
    return list(parts) if all(isinstance(p, fx.Node) for p in parts) else None


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_method(node, names) -> bool:
    return node is not None and node.op == "call_method" and node.target in names


def _dim_of(node, tensor: fx.Node, i: int) -> bool:
    """Whether `node` is dimension i of `tensor`: t.size(i), t.size()[i] or t.shape[i]."""
    if not isinstance(node, fx.Node):
        return False
    if _is_method(node, ("size",)) and node.args == (tensor, i):
        return True
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != i:
        return False
    whole = node.args[0]
    return isinstance(whole, fx.Node) and whole.args[0] is tensor and (
        (_is_method(whole, ("size",)) and len(whole.args) == 1) or
        (whole.op == "call_function" and whole.target is getattr and whole.args[1] == "shape"))


def _shape_args(node: fx.Node) -> tuple:
    return tuple(node.args[1]) if len(node.args) == 2 and isinstance(
        node.args[1], (tuple, list)) else tuple(node.args[1:])


def channel_shuffle_after(cat: fx.Node) -> Optional[tuple]:
    """(groups, nodes from the first view to the last) when the cat is read only by a channel
    shuffle: view(n, g, c // g, h, w) → transpose(1, 2) → [contiguous] → view/reshape(n, c or
    -1, h, w) or flatten(1, 2), with n, c, h, w the cat's own sizes; shape queries may read
    the cat too."""
    views = [u for u in cat.users if _is_method(u, ("view", "reshape"))]
    others = [u for u in cat.users if u not in views]
    if len(views) != 1 or not all(_is_method(u, ("size",)) or (
            u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
            for u in others):
        return None
    split = views[0]
    dims = _shape_args(split)
    if len(dims) != 5 or not isinstance(dims[1], int) or dims[1] < 2:
        return None
    groups, per_group = dims[1], dims[2]
    per_group_ok = isinstance(per_group, fx.Node) and per_group.op == "call_function" and (
        per_group.target is operator.floordiv and _dim_of(per_group.args[0], cat, 1)
        and per_group.args[1] == groups)
    if not (_dim_of(dims[0], cat, 0) and per_group_ok and _dim_of(dims[3], cat, 2)
            and _dim_of(dims[4], cat, 3)):
        return None
    chain, node = [split], _sole_user(split)
    swap = node is not None and (
        (node.op == "call_function" and node.target is torch.transpose) or
        _is_method(node, ("transpose",))) and set(node.args[1:3]) == {1, 2}
    if not swap:
        return None
    chain.append(node)
    node = _sole_user(node)
    if _is_method(node, ("contiguous",)):
        chain.append(node)
        node = _sole_user(node)
    if node is None:
        return None
    if (node.op == "call_function" and node.target is torch.flatten) or _is_method(
            node, ("flatten",)):
        ok = tuple(node.args[1:3]) == (1, 2) and not node.kwargs
    else:
        out = _shape_args(node) if _is_method(node, ("view", "reshape")) else ()
        ok = len(out) == 4 and _dim_of(out[0], cat, 0) and (
            out[1] == -1 or _dim_of(out[1], cat, 1)) and _dim_of(out[2], cat, 2) and _dim_of(
            out[3], cat, 3)
    return (groups, chain + [node]) if ok else None
