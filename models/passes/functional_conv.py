"""Functional convs: `F.conv2d` calls the trace inlined (a Conv2d subclass whose forward
transforms its weight, or a model calling F.conv2d on its own parameters). When the weight and
bias depend on parameters and buffers only (eval-mode constants: a standardised or normalised
weight), they are computed once here and the call becomes an nn.Conv2d module, which the next
pass fuses like any other. A weight computed from the input is counted and listed."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import FusionGraph

_CONV_FUNCTIONS = (F.conv2d, torch.conv2d)
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def conv_args(node: fx.Node) -> Optional[dict]:
    """The arguments of an F.conv2d call by name, or None for another node."""
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None
    if len(node.args) > len(_ARGS) or set(node.kwargs) - set(_ARGS):
        return None
    return {**_DEFAULTS, **dict(zip(_ARGS, node.args)), **node.kwargs}


def _owner(g: FusionGraph, node: fx.Node) -> Optional[str]:
    """The module whose parameter the weight is computed from (the site explain names)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            return n.target.rpartition(".")[0]
        todo += n.all_input_nodes
    return None


def constant_value(g: FusionGraph, value):
    """The value of a graph argument that depends on no placeholder (parameters, buffers and
    arithmetic on them), evaluated now; raises LookupError when it does depend on one."""
    if isinstance(value, (list, tuple)):
        return type(value)(constant_value(g, v) for v in value)
    if not isinstance(value, fx.Node):
        return value
    if value.op == "get_attr":
        obj = g.gm
        for part in value.target.split("."):
            obj = getattr(obj, part)
        return obj
    if value.op not in ("call_function", "call_method", "call_module"):
        raise LookupError(value.name)
    args = constant_value(g, tuple(value.args))
    kwargs = {k: constant_value(g, v) for k, v in value.kwargs.items()}
    if value.op == "call_function":
        return value.target(*args, **kwargs)
    if value.op == "call_method":
        return getattr(args[0], value.target)(*args[1:], **kwargs)
    return g.modules[value.target](*args, **kwargs)


def _pair(v) -> Optional[tuple]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return v[0], v[-1]
    return None


def _from_weight_of_conv(g: FusionGraph, site: Optional[str]) -> bool:
    """Whether `site` is a Conv2d of the model (the GraphModule keeps only the attributes the
    graph reads, in plain containers, so the model itself is asked)."""
    root = g.report.root() if g.report.root is not None else None
    if site is None or root is None:
        return isinstance(g.modules.get(site), nn.Conv2d)
    try:
        return isinstance(root.get_submodule(g.prefix + site), nn.Conv2d)
    except AttributeError:
        return False


def run(g: FusionGraph) -> None:
    taken = set()
    for node in list(g.graph.nodes):
        args = conv_args(node)
        if args is None:
            continue
        site = _owner(g, args["weight"]) or None  # (a parameter of the traced root: no site)
        of_conv = _from_weight_of_conv(g, site)
        if not of_conv:
            g.report.conv_sites += 1  # a conv that no Conv2d module counted
        where = g.prefix + site if site is not None else f"{g.prefix}{node.name}"
        try:
            with torch.no_grad():
                weight = constant_value(g, args["weight"])
                bias = constant_value(g, args["bias"])
        except LookupError:
            g.report.skip(where, "F.conv2d whose weight is computed from the input; kept")
            continue
        stride, dilation = _pair(args["stride"]), _pair(args["dilation"])
        padding = args["padding"] if args["padding"] in ("same", "valid") else _pair(
            args["padding"])
        groups = args["groups"]
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 4 and stride and dilation
                and padding is not None and isinstance(groups, int)
                and (bias is None or isinstance(bias, torch.Tensor))):
            g.report.skip(where, "F.conv2d with arguments the fused conv does not take; kept")
            continue
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                         stride, padding, dilation, groups, bias is not None,
                         device=weight.device, dtype=weight.dtype).eval()
        conv.weight.data = weight.detach().clone()
        if bias is not None:
            conv.bias.data = bias.detach().clone()
        with g.graph.inserting_before(node):
            # (named once its module exists, below)
            call = g.graph.create_node("call_module", site or node.name, (args["input"],))
        node.replace_all_uses_with(call)
        g.graph.erase_node(node)
        g.erase_unused([a for a in (args["weight"], args["bias"]) if isinstance(a, fx.Node)]
                       + _ancestors(args["weight"]) + _ancestors(args["bias"]))
        # In the Conv2d's own place when its forward was inlined and nothing else reads its
        # parameters (explain then names its path), else beside it.
        if not (of_conv and site not in g.calls and site not in taken
                and not any(n.op == "get_attr" and n.target.startswith(site + ".")
                            for n in g.graph.nodes)):
            if of_conv:  # (a conv of its own beside the Conv2d's, which counted only one)
                g.report.conv_sites += 1
            name = (site.replace(".", "_") if site else node.name) + "_functional_conv"
            while name in g.modules:
                name += "_"
            site = name
        taken.add(site)
        call.target = site
        g.replace_module(site, conv)
        g.calls[site] = 1
        g.report.add("functional conv as a module")


def _ancestors(node) -> list:
    out, todo = [], [node] if isinstance(node, fx.Node) else []
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in out:
                out.append(a)
                todo.append(a)
    return out

