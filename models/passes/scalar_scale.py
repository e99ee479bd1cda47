"""Scalar multiplies next to convs (NFNets: `out * alpha + shortcut` after a block's last conv,
`act(x) * beta` before its first): convolution is linear, so a constant factor folds into
the conv's weights, exactly up to rounding, and the multiply disappears.

- conv(x) * c, read by nothing else: the conv's weight and bias times c (its residual add
  then lands in the epilogue).
- a * c read only by fused convs as their input: each conv's weight times c, and they read a
  (zero padding stays zero)."""
import numbers
import operator
from typing import Optional

import torch
from torch import fx

from ..graph import FusionGraph
from ..modules import FusedConv2d

_MULS = (operator.mul, torch.mul)


def scalar_product(node: fx.Node) -> Optional[tuple]:
    """(tensor node, factor) for `t * c`, `c * t`, torch.mul or `.mul` with c a real number;
    None otherwise (in place included: it writes into t)."""
    is_mul = ((node.op == "call_function" and node.target in _MULS)
              or (node.op == "call_method" and node.target == "mul"))
    if not is_mul or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, numbers.Real) and not isinstance(b, bool):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, numbers.Real) and not isinstance(a, bool):
        return b, float(a)
    return None


def _plain_output(g: FusionGraph, node) -> Optional[FusedConv2d]:
    m = g.module(node)
    ok = (type(m) is FusedConv2d and m.activation == "none" and not m.has_residual
          and not m.returns_pooled and g.called_once(node) and len(node.users) == 1
          and "out" not in node.kwargs)
    return m if ok else None


def _reads_as_input(g: FusionGraph, user, value) -> bool:
    m = g.module(user)
    return (type(m) is FusedConv2d and user.args[:1] == (value,) and value not in user.args[1:]
            and value not in user.kwargs.values() and g.called_once(user)
            and m.input_affine is None and not m.has_input_scale)


@torch.no_grad()
def _scale(conv: FusedConv2d, c: float, bias: bool) -> None:
    conv.weight.data = (conv.weight.double() * c).to(conv.weight.dtype)
    conv.pack_weight()
    if bias and conv.bias is not None:
        conv.bias.data = (conv.bias.double() * c).to(conv.bias.dtype)


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        found = scalar_product(node) if not getattr(node, "_erased", False) else None
        if found is None:
            continue
        t, c = found
        producer = _plain_output(g, t)
        if producer is not None:
            _scale(producer, c, bias=True)
            g.absorb(node, t)
            g.report.add("scalar multiply folded into conv weights")
            continue
        readers = list(node.users)
        if (readers and all(_reads_as_input(g, u, node) for u in readers)
                and not any(g.mutation_between(node, u) for u in readers)):
            for u in readers:
                _scale(g.module(u), c, bias=False)
                u.args = (t,) + tuple(u.args[1:])
            g.graph.erase_node(node)
            g.report.add("scalar multiply folded into conv weights")

