"""Pool projection: a max or average pool that only a 1x1 conv reads (Inception's pool
projection, BN-Inception's ceil-mode stem pool, ResNet-D's ceil-mode average pool before its
shortcut's 1x1 conv) becomes one FusedPoolConv2d in the conv's place."""
from ..graph import FusionGraph
from ..modules import FusedConv2d, FusedPoolConv2d
from ..modules.pool_conv2d import can_take
from ..patterns import pool_window


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        if pool_window(node, g.modules):
            _fuse(g, node)


def _fuse(g: FusionGraph, pool_node) -> None:
    x, mode, kernel, stride, padding, ceil_mode = pool_window(pool_node, g.modules)
    conv_node = g.sole_user(pool_node)
    conv = g.module(conv_node) if conv_node is not None else None
    if not (isinstance(conv, FusedConv2d) and can_take(conv) and not conv_node.kwargs
            and pool_node not in conv_node.args[1:]
            and g.called_once(conv_node)  # (a pool module stays as it is)
            and not g.mutation_between(pool_node, conv_node)):  # x is now read there
        return
    g.replace_module(conv_node.target,
                     FusedPoolConv2d(mode, kernel, stride, padding, conv, ceil_mode))
    conv_node.args = (x,) + tuple(conv_node.args[1:])
    g.graph.erase_node(pool_node)
    g.report.add("pool + 1x1 in one op")
