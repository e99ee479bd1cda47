"""Dense blocks in one buffer: concatenations whose parts lists extend one another (DenseNet:
[x], [x, f1], [x, f1, f2], ...) become prefix views of one buffer that each f's conv writes
once, instead of a copy of all earlier features per layer."""
import operator

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..modules.concat import copy_into, growing_buffer, ready
from ..patterns import cat_parts


def _families(g: FusionGraph) -> dict:
    families = {}
    for node in g.graph.nodes:
        parts = cat_parts(node, min_parts=1)
        if parts:
            families.setdefault(parts[0], []).append((node, parts))
    return families


def run(g: FusionGraph) -> None:
    tried = set()
    while True:  # found afresh after each rewrite: a block's output starts the next block
        todo = [(first, cats) for first, cats in _families(g).items() if first not in tried]
        if not todo:
            return
        first, cats = todo[0]
        tried.add(first)
        cats.sort(key=lambda c: len(c[1]))
        longest = cats[-1][1]
        members = {c for c, _ in cats}
        if (len(cats) < 3 or len(set(longest)) != len(longest)
                or any(parts != longest[:len(parts)] for _, parts in cats)
                or not all(_writes_slice(g, p, members) for p in longest[1:])):
            continue
        # Every concatenation becomes a prefix view of one buffer, and `first` is copied in
        # once: nothing may write into any of them, or into a view of them or of what they
        # are views of (`c[:, :k].mul_(0)` would change every other prefix); and at most one
        # may reach the caller, who may write into it.
        if g.written(members | {first}) or sum(g.escapes(c) for c in members) > 1:
            continue
        _rewrite(g, first, cats, longest)


def _rewrite(g: FusionGraph, first, cats, longest) -> None:
    with g.graph.inserting_before(first.next):
        channels = tuple(g.modules[p.target].out_channels for p in longest[1:])
        alloc = g.graph.call_function(growing_buffer, (first, channels))
        views, prefixes = [g.graph.call_function(operator.getitem, (alloc, i)) for i in (0, 1)]
        view0 = g.graph.call_function(operator.getitem, (views, 0))
        written = [g.graph.call_function(copy_into, (view0, first))]
    for i, p in enumerate(longest[1:], 1):
        with g.graph.inserting_before(p):
            view = g.graph.call_function(operator.getitem, (views, i))
        p.kwargs = {**p.kwargs, "out": view}
        written.append(p)
    for cat, parts in cats:
        with g.graph.inserting_before(cat):
            prefix = g.graph.call_function(operator.getitem, (prefixes, len(parts) - 1))
            view = g.graph.call_function(ready, (prefix, tuple(written[:len(parts)])))
        cat.replace_all_uses_with(view)
        g.reshape_not_view(view)
        g.graph.erase_node(cat)
    g.report.add("conv writes its concat slice", len(longest) - 1)
    g.report.add("dense block in one buffer")


def _writes_slice(g: FusionGraph, part, members) -> bool:
    return (isinstance(g.module(part), FusedConv2d) and g.called_once(part)
            and "out" not in part.kwargs and all(u in members for u in part.users))
