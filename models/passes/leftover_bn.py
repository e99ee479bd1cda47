"""The BatchNorms no pass took, listed for `explain` with the reason (once per module)."""
from torch import nn

from ..graph import FusionGraph
from .conv_bn_act import bn_epilogue


def reason(g: FusionGraph, node) -> str:
    bn = g.modules[node.target]
    calls = g.calls.get(node.target, 1)
    if calls > 1:
        return f"BatchNorm module is called at {calls} places; kept"
    why = bn_epilogue(bn)[1]
    if why:
        return f"{why}; kept"
    return "BatchNorm not directly after a conv (pre-activation); kept"


def run(g: FusionGraph) -> None:
    seen = set()
    for node in g.modules_of(nn.BatchNorm2d):
        if node.target not in seen:
            seen.add(node.target)
            g.report.skip(g.site(node), reason(g, node))
