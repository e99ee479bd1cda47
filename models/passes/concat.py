"""Concat-free outputs: `torch.cat(parts, 1)` (Inception's branches, SqueezeNet's expand
convs), and the channel shuffle that may follow it (ShuffleNet v2), become one buffer that
each part's conv writes into directly: a channel slice, or every g-th channel when a shuffle
of g equal parts follows. Other parts are copied in; a cat read only by another is spliced
into it, so Inception-v3/v4's split branches write into the block's buffer."""
import operator

from ..graph import FusionGraph
from ..modules import FusedConv2d, FusedPoolConv2d, FusedSeparableConv2d
from ..modules.concat import concat_buffer, concat_result, copy_into
from ..modules.permute import interleave_channels
from ..patterns import cat_parts, channel_shuffle_after


def run(g: FusionGraph) -> None:
    # Outer concatenations first, so one nested in another (Inception-v3's last blocks) is
    # spliced into it and its convs write into the outer buffer.
    spliced = set()
    for node in reversed(list(g.graph.nodes)):
        if node not in spliced and cat_parts(node):
            spliced.update(_fuse(g, node))


def _fuse(g: FusionGraph, cat) -> list:
    """Rewrites `cat`; returns the inner concatenations spliced into it."""
    groups, chain = _shuffle_after(cat) or (1, [])
    parts, inner = _flat_parts(cat)
    writers = [p for p in parts if _writes_slice(g, p, parts)
               and not g.mutation_between(p, cat)]  # a writer moves down to the cat
    if not writers:
        return []
    # Writers run once the buffer exists: next to the cat, which alone reads them.
    for p in writers:
        cat.prepend(p)
    with g.graph.inserting_before(writers[0]):
        specs = []
        for p in parts:
            m = g.modules.get(p.target) if p in writers else None
            specs.append((p.args[0], m.out_channels, m.kernel_size, m.stride, m.padding,
                          m.dilation) if m is not None else p)
        alloc = g.graph.call_function(concat_buffer, (tuple(specs), groups))
        buffer, interleaved, *views = [g.graph.call_function(operator.getitem, (alloc, i))
                                       for i in range(len(parts) + 2)]
    written = []
    with g.graph.inserting_before(cat):
        for p, view in zip(parts, views):
            if p in writers:
                p.kwargs = {**p.kwargs, "out": view}
                written.append(p)
            else:
                written.append(g.graph.call_function(copy_into, (view, p)))
                g.report.skip(g.node_site(p), "copied into its concatenation's slice: only a "
                              "fused conv (or fused pair) read by nothing else writes its "
                              "slice directly")
        result = g.graph.call_function(concat_result,
                                       (buffer, interleaved, groups, tuple(written)))
    (chain[-1] if chain else cat).replace_all_uses_with(result)
    g.reshape_not_view(result)
    for node in reversed(chain):
        g.graph.erase_node(node)
    cat.replace_all_uses_with(result)  # shape queries read the result just as well
    g.erase_unused(inner + [cat])  # the outer first: it reads the inner
    g.report.add("conv writes its concat slice", len(writers))
    if chain:
        g.report.add("channel shuffle in conv stores")
    return inner


def _shuffle_after(cat):
    """(groups, nodes) of the channel shuffle that alone reads the cat: the view/transpose
    idiom, or the interleave an nn.ChannelShuffle or F.channel_shuffle became."""
    found = channel_shuffle_after(cat)
    if found:
        return found
    user = next(iter(cat.users)) if len(cat.users) == 1 else None
    if (user is not None and user.op == "call_function" and user.target is interleave_channels
            and user.args[0] is cat and len(user.args) == 3 and user.args[2] is False
            and isinstance(user.args[1], int) and user.args[1] > 1):
        return user.args[1], [user]
    return None


def _flat_parts(cat) -> tuple:
    """The parts of `cat` with every concatenation read only by it spliced in, and those inner
    concatenations."""
    parts, inner = [], []
    for p in cat_parts(cat):
        if (cat_parts(p) and len(p.users) == 1 and cat_parts(cat).count(p) == 1
                and not _shuffle_after(p)):
            sub, subinner = _flat_parts(p)
            parts += sub
            inner += [p] + subinner
        else:
            parts.append(p)
    return parts, inner


def _writes_slice(g: FusionGraph, part, parts) -> bool:
    return (isinstance(g.module(part), (FusedConv2d, FusedSeparableConv2d, FusedPoolConv2d))
            and len(part.users) == 1 and parts.count(part) == 1 and g.called_once(part)
            and "out" not in part.kwargs)
