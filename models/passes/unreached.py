"""Modules the traced forward never calls (an auxiliary classifier that runs only in
training mode): FX leaves them out of the graph, so the fused model drops them. Each is
listed, with the convs and BatchNorms it holds, so that explain's counts add up."""
from torch import nn

from ..graph import FusionGraph


def run(g: FusionGraph) -> None:
    root = g.report.root() if g.report.root is not None else None
    if root is None:
        return
    try:
        traced = root.get_submodule(g.prefix.rstrip(".")) if g.prefix else root
    except AttributeError:
        return
    kept = set(g.modules)  # the GraphModule holds what the graph calls or reads
    dropped = []
    for name, m in traced.named_modules():
        if not name or name in kept or any(name.startswith(d + ".") for d in dropped):
            continue
        if any(k.startswith(name + ".") for k in kept):
            continue  # partly used: its children are looked at one by one
        convs = sum(isinstance(c, nn.Conv2d) for c in m.modules())
        norms = sum(isinstance(c, nn.BatchNorm2d) for c in m.modules())
        if convs or norms:
            dropped.append(name)
            g.report.skip(g.prefix + name, f"never runs in the traced forward (eval mode), so "
                          f"the fused model leaves it out ({convs} convs, {norms} BatchNorms)")
