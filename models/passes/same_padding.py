"""TensorFlow 'SAME' padding into the conv: a `same_pad` (what `conv_subclasses` made of a
Conv2dSame) read only by the fused conv of that geometry becomes one FusedConv2dSame, which
pads by each call's input size inside the kernel. Last, so every earlier pass saw a plain
zero-padding conv after an explicit pad; a pad read otherwise (a fused pair, several readers)
stays, exact but one more pass over memory."""
from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..modules.conv2d_same import FusedConv2dSame, same_pad


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        if node.op == "call_function" and node.target is same_pad:
            _fuse(g, node)


def _fuse(g: FusionGraph, pad) -> None:
    x, kernel, stride, dilation = (list(pad.args) + [None] * 4)[:4]
    conv_node = g.sole_user(pad)
    conv = g.module(conv_node) if conv_node is not None else None
    if not (type(conv) is FusedConv2d and not any(conv.padding) and not pad.kwargs
            and (conv.kernel_size, conv.stride, conv.dilation) == (kernel, stride, dilation)
            and pad not in conv_node.args[1:] and pad not in conv_node.kwargs.values()
            and g.called_once(conv_node)):
        site = g.site(conv_node) if conv is not None else f"{g.prefix}{pad.name}"
        g.report.skip(site, "TensorFlow 'SAME' padding kept as a pad before the fused conv "
                      "(the conv is part of a fused pair or the pad has other readers)")
        return
    g.replace_module(conv_node.target, FusedConv2dSame.from_fused(conv))
    conv_node.args = (x,) + tuple(conv_node.args[1:])
    g.graph.erase_node(pad)
    g.report.add("tf 'same' padding in the conv")
