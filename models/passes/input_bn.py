"""Pre-activation BatchNorm: a BatchNorm (+ activation) that feeds only a conv (pre-activation
blocks, DenseNet's layers and transitions) moves into that conv's load stage, its
`input_affine` prologue."""
from torch import nn

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..patterns import activation_of_node
from .conv_bn_act import bn_epilogue


def run(g: FusionGraph) -> None:
    for node in g.modules_of(nn.BatchNorm2d):
        _fuse(g, node)


def _fuse(g: FusionGraph, bn_node) -> None:
    bn = g.modules[bn_node.target]
    act, reason = bn_epilogue(bn)
    if reason or len(bn_node.args) != 1 or bn_node.kwargs or g.calls[bn_node.target] > 1:
        return
    erased, user = [bn_node], g.sole_user(bn_node)
    if act == "none" and user is not None:
        act_of_user = activation_of_node(user, g.modules)
        if act_of_user is not None:
            act, erased, user = act_of_user, [user, bn_node], g.sole_user(user)
    conv = g.module(user) if user is not None else None
    # sole_user: the conv reads it as its input only (a residual operand stays as is)
    if not (isinstance(conv, FusedConv2d) and not user.kwargs
            and erased[0] not in user.args[1:]
            and g.called_once(user) and conv.input_affine is None
            and not conv.has_input_scale and conv.in_channels == bn.num_features):
        return
    # The conv now reads the BatchNorm's input where it ran: nothing in between may write
    # (the absorbed activation itself may be in place: it goes away).
    if g.mutation_between(bn_node, user, ignore=erased):
        return
    conv.absorb_input_bn(bn, act)
    user.args = (bn_node.args[0],) + tuple(user.args[1:])
    for node in erased:
        g.graph.erase_node(node)
    g.report.add("batchnorm + act in conv's load")
