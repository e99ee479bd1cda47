"""Pool projection: a max or average pool that only a 1x1 conv reads (Inception's pool
projection) becomes one FusedPoolConv2d in the conv's place."""
import torch.nn.functional as F
from torch import nn

from ..graph import FusionGraph
from ..modules import FusedConv2d, FusedPoolConv2d
from ..modules.pool_conv2d import can_take
from ..patterns import pool_window


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        if pool_window(node, g.modules):
            _fuse(g, node)
        elif _ceil_mode_pool(g, node):
            conv_node = g.sole_user(node)
            conv = g.module(conv_node) if conv_node is not None else None
            if isinstance(conv, FusedConv2d) and can_take(conv):
                g.report.skip(g.node_site(node), "ceil-mode pool at stride > 1 before a 1x1 "
                              "conv: not paired, pool_conv2d takes floor-mode windows only")


def _ceil_mode_pool(g: FusionGraph, node) -> bool:
    m = g.module(node)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return bool(m.ceil_mode) and m.stride not in (1, (1, 1))
    return (node.op == "call_function" and node.target in (F.max_pool2d, F.avg_pool2d)
            and bool(node.kwargs.get("ceil_mode"))
            and node.kwargs.get("stride", node.args[2] if len(node.args) > 2 else None)
            not in (1, (1, 1)))


def _fuse(g: FusionGraph, pool_node) -> None:
    x, mode, kernel, stride, padding = pool_window(pool_node, g.modules)
    conv_node = g.sole_user(pool_node)
    conv = g.module(conv_node) if conv_node is not None else None
    if not (isinstance(conv, FusedConv2d) and can_take(conv) and not conv_node.kwargs
            and pool_node not in conv_node.args[1:]
            and g.called_once(conv_node)  # (a pool module stays as it is)
            and not g.mutation_between(pool_node, conv_node)):  # x is now read there
        return
    g.replace_module(conv_node.target, FusedPoolConv2d(mode, kernel, stride, padding, conv))
    conv_node.args = (x,) + tuple(conv_node.args[1:])
    g.graph.erase_node(pool_node)
    g.report.add("pool + 1x1 in one op")
