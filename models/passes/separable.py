"""Depthwise + 1x1: a depthwise conv whose output only a 1x1 conv reads (MobileNetV2's and
MnasNet's blocks, Xception's separable convs, ShuffleNet's branches) becomes one
FusedSeparableConv2d in the 1x1 conv's place."""
from ..graph import FusionGraph
from ..modules import FusedConv2d, FusedSeparableConv2d
from ..modules.separable import can_pair


def run(g: FusionGraph) -> None:
    for node in g.modules_of(FusedConv2d):
        _fuse(g, node)


def _fuse(g: FusionGraph, dw_node) -> None:
    pw_node = g.sole_user(dw_node)
    dw, pw = g.module(dw_node), g.module(pw_node) if pw_node is not None else None
    if not (isinstance(pw, FusedConv2d) and can_pair(dw, pw) and len(dw_node.args) == 1
            and not dw_node.kwargs and not pw_node.kwargs
            and dw_node not in pw_node.args[1:]
            and g.called_once(dw_node) and g.called_once(pw_node)
            and not g.mutation_between(dw_node, pw_node)):  # x is now read there
        return
    g.replace_module(pw_node.target, FusedSeparableConv2d(dw, pw))
    pw_node.args = (dw_node.args[0],) + tuple(pw_node.args[1:])
    g.graph.erase_node(dw_node)
    g.report.add("depthwise + 1x1 in one op")
