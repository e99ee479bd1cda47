"""Attention product: `(1 + m) * t` (Residual Attention's (1 + M) · T, any `(m + 1) * t` or
`t * (1 + m)` whose sum nothing else reads) becomes one `one_plus_gate` call: eager's
arithmetic, the product written into the sum's buffer instead of a second temporary. No conv
epilogue multiplies by a tensor, so the product runs as its own elementwise ops; explain
lists it."""
import numbers
import operator

import torch
from torch import fx

from ..graph import FusionGraph
from ..modules.gate import one_plus_gate
from ..patterns import mul_operands

# (the count's name as explain has always shown it; the product now takes eager's two
# elementwise ops, into one buffer)
KEY = "(1 + mask) * trunk into one buffer"


def _one_plus(node) -> fx.Node:
    """m for a node computing 1 + m or m + 1 (not in place), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs):
        return None
    a, b = node.args
    for one, m in ((a, b), (b, a)):
        if (isinstance(one, numbers.Real) and not isinstance(one, bool) and one == 1
                and isinstance(m, fx.Node)):
            return m
    return None


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        operands = mul_operands(node) if not getattr(node, "_erased", False) else None
        if not operands:
            continue
        for s, t in (operands, operands[::-1]):
            m = _one_plus(s)
            # the sum read by the product alone; m now read at the product: nothing in
            # between may write into it
            if m is not None and t is not s and list(s.users) == [node] and not (
                    g.mutation_between(s, node)):
                break
        else:
            continue
        with g.graph.inserting_before(node):
            gated = g.graph.call_function(one_plus_gate, (t, m))
        gated.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_all_uses_with(gated)
        g.graph.erase_node(node)
        g.graph.erase_node(s)
        g.reshape_not_view(gated)
        g.report.add(KEY)
        g.report.skip(g.node_site(gated), "(1 + mask) * trunk runs as one elementwise "
                      "pass for 1 + m and one for the product into its buffer, not in a "
                      "conv: no epilogue multiplies by a tensor")
