"""BatchNorm after a channel concatenation of convs (timm's MixedConv2d: a conv per channel
split, 3x3, 5x5, ..., concatenated; any cat of conv outputs): the BatchNorm is per channel,
so each conv folds the slice of it that covers its own output channels, and the activation
after it moves into every conv's epilogue. The concatenation stays (the concat pass then has
each conv write its slice)."""
from torch import nn

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..patterns import activation_of_node, cat_parts
from ..report import BN_IN_SLICES
from .conv_bn_act import bn_epilogue, kept_activation


def bn_slice(bn: nn.BatchNorm2d, start: int, length: int) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d computing channels [start, start + length) of `bn`."""
    part = nn.BatchNorm2d(length, eps=bn.eps, affine=bn.weight is not None,
                          device=bn.running_mean.device, dtype=bn.running_mean.dtype).eval()
    part.running_mean.copy_(bn.running_mean[start:start + length])
    part.running_var.copy_(bn.running_var[start:start + length])
    if bn.weight is not None:
        part.weight.data.copy_(bn.weight[start:start + length])
    if bn.bias is not None:
        part.bias.data.copy_(bn.bias[start:start + length])
    return part


def run(g: FusionGraph) -> None:
    for node in g.modules_of(nn.BatchNorm2d):
        _fuse(g, node)


def _producers(g: FusionGraph, cat, parts):
    """The fused convs that alone produce each part, or None."""
    convs = []
    for p in parts:
        m = g.module(p)
        if not (type(m) is FusedConv2d and m.activation == "none" and not m.has_residual
                and not m.returns_pooled and g.called_once(p) and parts.count(p) == 1
                and list(p.users) == [cat] and "out" not in p.kwargs):
            return None
        convs.append(m)
    return convs


def _fuse(g: FusionGraph, bn_node) -> None:
    bn = g.modules[bn_node.target]
    cat = bn_node.args[0] if len(bn_node.args) == 1 and not bn_node.kwargs else None
    parts = cat_parts(cat, min_parts=1) if cat is not None else None
    if parts is None or len(cat.users) != 1 or g.calls[bn_node.target] > 1:
        return
    act, why = bn_epilogue(bn)
    kept = kept_activation(bn) if why else None
    convs = _producers(g, cat, parts)
    if (why and kept is None) or convs is None or sum(
            c.out_channels for c in convs) != bn.num_features:
        return
    start = 0
    for conv in convs:
        conv.fold_bn(bn_slice(bn, start, conv.out_channels))
        start += conv.out_channels
    g.report.add(BN_IN_SLICES)
    if kept is not None:  # the activation stays, as a module in the BatchNorm's place
        g.replace_module(bn_node.target, kept)
        return
    g.absorb(bn_node, cat)
    if act == "none":  # an activation module after the BatchNorm, read by nothing else
        user = g.sole_user(cat)
        act = activation_of_node(user, g.modules) if user is not None else None
        if act is None:
            return
        g.absorb(user, cat)
    for conv in convs:
        conv.activation = act
    g.report.add(f"activation {act}")
