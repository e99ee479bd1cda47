"""The tensor-tensor elementwise ops and up-samplings no pass fused (an add of two tensors
neither of which a fused conv's epilogue takes, a product that is no SE gate, a bilinear
interpolation), listed for `explain` with the reason: they run as eager passes over memory.
Shape arithmetic (sizes added or multiplied) is not listed."""
import operator

import torch.nn.functional as F
from torch import fx, nn

from ..graph import FusionGraph
from ..patterns import mul_operands, residual_operands

_UPSAMPLE = (nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d)
_SHAPE_FUNCTIONS = (operator.getitem, operator.add, operator.sub, operator.mul,
                    operator.floordiv, operator.truediv, operator.neg, getattr, len)


def _shape_value(node, seen=None) -> bool:
    """Whether a value is a size or arithmetic on sizes (not a tensor)."""
    if not isinstance(node, fx.Node):
        return True
    seen = set() if seen is None else seen
    if node in seen:
        return True
    seen.add(node)
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return all(_shape_value(a, seen) for a in node.args)
    return False


def reason(g: FusionGraph, node):
    """Why an elementwise node or up-sampling stays eager, or None if it is neither."""
    ops = residual_operands(node) or mul_operands(node)
    if ops is not None:
        if any(_shape_value(a) for a in ops):
            return None
        if residual_operands(node):
            return ("add of two tensors runs eager: neither is a fused conv's output that "
                    "only the add reads (or that conv already adds one)")
        return ("product of two tensors runs eager: neither an SE gate nor a channel gate "
                "computed only from the other factor's mean, and no conv epilogue multiplies by "
                "a tensor")
    m = g.module(node)
    if isinstance(m, _UPSAMPLE) or (node.op == "call_function" and node.target is F.interpolate):
        mode = node.kwargs.get("mode", getattr(m, "mode", "nearest"))
        return f"{mode} up-sampling runs eager: no fused kernel up-samples"
    return None


def run(g: FusionGraph) -> None:
    for node in g.graph.nodes:
        why = reason(g, node)
        if why:
            g.report.skip(g.node_site(node), why)
