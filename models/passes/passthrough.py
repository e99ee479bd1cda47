"""Identity, eval-mode dropout and stochastic depth compute nothing at inference: dropping them
exposes their neighbours to the other passes (the residual add after an MBConv's stochastic
depth lands in the project conv's epilogue). So does adding a literal zero (MobileOne's
missing branches: `out = 0 + BN(x)`, `out += 0`): in place, t += 0 is t itself; out of
place, 0 + t is replaced by t where the sum is t's only reader, so later in-place updates
(`out += conv(x)`) write into a tensor no one else sees, as they wrote into the sum."""
import numbers
import operator

import torch
from torch import fx

from ..graph import FusionGraph
from ..patterns import inference_passthrough


def _plus_zero(node: fx.Node):
    """t for a node computing 0 + t or t + 0 (not in place), else None."""
    if not (node.op == "call_function" and node.target in (operator.add, torch.add)
            and len(node.args) == 2 and not node.kwargs):
        return None
    for zero, t in (node.args, node.args[::-1]):
        if _is_zero(zero) and isinstance(t, fx.Node):
            return t
    return None


def _is_zero(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == 0


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        source = inference_passthrough(node, g.modules)
        if isinstance(source, fx.Node):
            g.absorb(node, source)
            continue
        if (node.op == "call_function" and node.target is operator.iadd and len(node.args) == 2
                and isinstance(node.args[0], fx.Node) and _is_zero(node.args[1])):
            g.absorb(node, node.args[0])  # t += 0 is t, unchanged (MobileOne's missing branch)
            continue
        t = _plus_zero(node)
        # (0 + t may promote an integer t to float, or alias a view: only a fresh tensor that
        # only the sum reads is replaced by itself)
        if t is not None and t.op == "call_module" and g.private_to(t, node):
            g.absorb(node, t)
