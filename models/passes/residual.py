"""Residual add: `+`, `+=`, `torch.add`, `add_` of a fused conv's output that nothing else
reads becomes the conv's epilogue, with the activation after the add."""
from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..patterns import adds_in_place, residual_operands
from .conv_bn_act import GraphChain, absorb_activation


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        if residual_operands(node):
            _fuse(g, node)


def _fuse(g: FusionGraph, add) -> None:
    a, b = residual_operands(add)
    in_place = adds_in_place(add)
    for conv_node, other in ((a, b), (b, a)):
        fused = g.module(conv_node)
        if (isinstance(fused, FusedConv2d) and not fused.has_residual
                and fused.activation == "none" and len(conv_node.users) == 1
                and conv_node is not other
                # an in-place add into `other` is visible to whatever else reads it,
                # the tensors it is a view of included (`x += shortcut` into a fresh x that
                # only the add reads is not)
                and not (in_place and other is a and not g.private_to(other, add))):
            break
    else:
        return
    # The conv now runs at the add: nothing in between may write its input (or anything).
    if g.mutation_between(conv_node, add):
        return
    with g.graph.inserting_before(add):
        new = g.graph.call_module(conv_node.target, (conv_node.args[0], other))
    fused.has_residual = True
    add.replace_all_uses_with(new)
    g.graph.erase_node(add)
    g.graph.erase_node(conv_node)
    g.report.add("residual add")
    absorb_activation(fused, GraphChain(g, new), g.report)
