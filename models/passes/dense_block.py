"""Dense blocks in one buffer: concatenations whose parts lists extend one another (DenseNet:
[x], [x, f1], [x, f1, f2], ...) become prefix views of one buffer that each f's conv writes
once, instead of a copy of all earlier features per layer."""
import operator

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..modules.concat import copy_into, growing_buffer, ready
from ..patterns import cat_parts, may_mutate


def run(g: FusionGraph) -> None:
    families = {}
    for node in g.graph.nodes:
        parts = cat_parts(node, min_parts=1)
        if parts:
            families.setdefault(parts[0], []).append((node, parts))
    for first, cats in families.items():
        cats.sort(key=lambda c: len(c[1]))
        longest = cats[-1][1]
        members = {c for c, _ in cats}
        # Every concatenation becomes a view of one buffer, and `first` is copied in once:
        # nothing may write into either afterwards.
        readers = [u for c in members for u in c.users] + list(first.users)
        if (len(cats) < 3 or len(set(longest)) != len(longest)
                or any(parts != longest[:len(parts)] for _, parts in cats)
                or not all(_writes_slice(g, p, members) for p in longest[1:])
                or any(may_mutate(u, g.modules) for u in readers)):
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
