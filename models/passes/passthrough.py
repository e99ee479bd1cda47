"""Identity, eval-mode dropout and stochastic depth compute nothing at inference: dropping them
exposes their neighbours to the other passes (the residual add after an MBConv's stochastic
depth lands in the project conv's epilogue). So does adding a literal zero (MobileOne's
missing branches: `out = 0 + BN(x)`, `out += 0`): in place, t += 0 is t itself; out of
place, 0 + t is replaced by t where the sum is t's only reader, so later in-place updates
(`out += conv(x)`) write into a tensor no one else sees, as they wrote into the sum. A zero
can change the dtype (0.0 + an integer tensor is float; `t += 0.0` on one raises in eager),
so only an integer zero is dropped in place, and out of place only from a tensor certainly
floating (a conv's, normalisation's or linear layer's output, or an activation of one)."""
import numbers
import operator

import torch
from torch import fx, nn

from ..graph import FusionGraph
from ..patterns import activation_of_node, inference_passthrough

# modules whose output is floating point whatever else holds (they take no integer input)
_FLOATING = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear,
             nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


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


def _floating(g: FusionGraph, t, depth: int = 8) -> bool:
    """Whether node t is certainly a floating-point tensor (activations keep their input's
    dtype: ReLU of an integer tensor is an integer tensor)."""
    m = g.module(t) if isinstance(t, fx.Node) else None
    if m is None or depth == 0:
        return False
    if isinstance(m, _FLOATING) or type(m).__module__.startswith("cnnfuse."):
        return True
    return (activation_of_node(t, g.modules) is not None and bool(t.args)
            and _floating(g, t.args[0], depth - 1))


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        source = inference_passthrough(node, g.modules)
        if isinstance(source, fx.Node):
            g.absorb(node, source)
            continue
        if (node.op == "call_function" and node.target is operator.iadd and len(node.args) == 2
                and isinstance(node.args[0], fx.Node) and _is_zero(node.args[1])
                and (isinstance(node.args[1], int) or _floating(g, node.args[0]))):
            g.absorb(node, node.args[0])  # t += 0 is t, unchanged (MobileOne's missing branch)
            continue
        t = _plus_zero(node)
        # (0 + t may promote an integer t to float, or alias a view: only a fresh floating
        # tensor that only the sum reads is replaced by itself)
        if t is not None and _floating(g, t) and g.private_to(t, node):
            g.absorb(node, t)
