"""A BatchNorm no conv took (after a pool, a concatenation of non-convs, the input, DenseNet's
final norm5, DPN's last bn_ac), with the activation after it, as one pass over memory instead
of eager's two: FusedBatchNormAct, a depthwise 1x1 conv whose weight is the BatchNorm's scale
and whose bias is its shift. It accumulates in fp32 and rounds once, as eager BatchNorm does
(bias_act would round x · scale before adding the shift, which cancels against it)."""
from torch import nn

from ..graph import FusionGraph
from ..modules.bn_act import FusedBatchNormAct
from ..report import BN_ALONE
from .conv_bn_act import GraphChain, absorb_activation, bn_epilogue, kept_activation


def run(g: FusionGraph) -> None:
    for node in g.modules_of(nn.BatchNorm2d):
        bn = g.modules[node.target]
        act, why = bn_epilogue(bn)
        kept = kept_activation(bn) if why else None
        if ((why and kept is None) or len(node.args) != 1 or node.kwargs
                or g.calls[node.target] > 1 or bn.running_mean is None):
            continue
        conv = FusedBatchNormAct.from_bn(bn, act if kept is None else "none")
        if kept is not None:  # the activation stays, as a module after the pass
            name = node.target + "_act"
            g.replace_module(name, kept)
            with g.graph.inserting_after(node):
                after = g.graph.call_module(name, (node,))
            node.replace_all_uses_with(after, delete_user_cb=lambda user: user is not after)
            g.calls[name] = 1
        g.replace_module(node.target, conv)
        g.report.add(BN_ALONE)
        g.report.skip(g.site(node), "BatchNorm after something no conv folds it into; runs "
                      "alone, as one affine + activation pass (FusedBatchNormAct)")
        if act not in (None, "none") and kept is None:
            g.report.add(f"activation {act}")
        elif kept is None:
            absorb_activation(conv, GraphChain(g, node), g.report)
