"""Pre-activation BatchNorm: a BatchNorm (+ activation) read only by convs (pre-activation
blocks, DenseNet's layers and transitions; ResNet-v2's first BatchNorm + ReLU of a block,
which both its first conv and its downsample conv read) moves into the load stage of each of
them, their `input_affine` prologue."""
from torch import nn

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..patterns import activation_of_node
from ..report import BN_IN_LOAD
from .conv_bn_act import bn_epilogue


def run(g: FusionGraph) -> None:
    for node in g.modules_of(nn.BatchNorm2d):
        _fuse(g, node)


def _takes_prologue(g: FusionGraph, user, value, bn) -> bool:
    """Whether `user` is a fused conv reading `value` as its input only (a residual operand
    stays as is) that has no prologue yet."""
    conv = g.module(user)
    return (isinstance(conv, FusedConv2d) and not user.kwargs and user.args[:1] == (value,)
            and value not in user.args[1:] and g.called_once(user)
            and conv.input_affine is None and not conv.has_input_scale
            and conv.in_channels == bn.num_features)


def _fuse(g: FusionGraph, bn_node) -> None:
    bn = g.modules[bn_node.target]
    act, reason = bn_epilogue(bn)
    if reason or len(bn_node.args) != 1 or bn_node.kwargs or g.calls[bn_node.target] > 1:
        return
    erased, value = [bn_node], bn_node
    user = g.sole_user(bn_node)
    if act == "none" and user is not None:
        act_of_user = activation_of_node(user, g.modules)
        if act_of_user is not None:
            act, erased, value = act_of_user, [user, bn_node], user
    readers = list(value.users)
    if not readers or not all(_takes_prologue(g, u, value, bn) for u in readers):
        return
    # Each conv now reads the BatchNorm's input where it ran: nothing in between may write
    # (the absorbed activation itself may be in place: it goes away).
    if any(g.mutation_between(bn_node, u, ignore=erased) for u in readers):
        return
    for u in readers:
        g.module(u).absorb_input_bn(bn, act)
        u.args = (bn_node.args[0],) + tuple(u.args[1:])
    for node in erased:
        g.graph.erase_node(node)
    g.report.add(BN_IN_LOAD)
    if act != "none":
        g.report.add(f"activation {act} in conv's load")
    if len(readers) > 1:
        g.report.add("batchnorm + act in the load of several convs")
