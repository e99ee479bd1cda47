"""An activation alone that only fused convs read (an NFNet block's first activation, once
its scalar factor is in the weights) moves into their load stage: the `input_affine`
prologue with the identity as the affine. After the fused pairs (depthwise + 1x1, pool +
1x1), which take their own input as it is: Xception's ReLU before a separable conv stays, and
the pair stays one op."""
import torch
from torch import nn

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..patterns import activation_of_node, may_mutate


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        if not getattr(node, "_erased", False):
            _fuse_activation(g, node)


def _identity_bn(channels: int, like: torch.Tensor) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm computing x exactly (scale 1, shift 0)."""
    return nn.BatchNorm2d(channels, eps=0.0, affine=False, device=like.device).eval()


def _fuse_activation(g: FusionGraph, act_node) -> None:
    act = activation_of_node(act_node, g.modules)
    x = act_node.args[0] if act is not None and act_node.args else None
    # activation_of_node has checked that any further arguments are fuse-time constants
    if x is None or not hasattr(x, "op") or (
            act_node.op == "call_module" and not g.called_once(act_node)):
        return
    # An in-place activation also changes x for its other readers: it must stay.
    if may_mutate(act_node, g.modules) and len(x.users) > 1:
        return
    readers = list(act_node.users)
    convs = [g.module(u) for u in readers]
    if not readers or not all(
            isinstance(m, FusedConv2d) and set(u.kwargs) <= {"out"}
            and u.args[:1] == (act_node,) and act_node not in u.args[1:] and g.called_once(u)
            and m.input_affine is None and not m.has_input_scale
            and act_node not in u.kwargs.values() for u, m in zip(readers, convs)):
        return
    if any(g.mutation_between(act_node, u) for u in readers):
        return
    for u, m in zip(readers, convs):
        m.absorb_input_bn(_identity_bn(m.in_channels, m.weight), act)
        u.args = (x,) + tuple(u.args[1:])
    g.graph.erase_node(act_node)
    g.report.add(f"activation {act} in conv's load")
