"""The original's memory layout at the edges: the fused ops compute in channels_last whatever
the input's layout, where eager convolutions, concatenations and products return a tensor in
their input's layout (contiguous NCHW for an NCHW input) unless the model's own weights are
channels_last. A `.view` that works on eager's tensor may fail on the fused one, and a
backbone's feature maps would come back in another layout. So every tensor a fused op makes
that the graph returns or that a `.view` reads is put back into eager's layout there, once,
and all its readers read that (a copy only when the layouts differ; aliasing among the
readers stays as eager's). A channel shuffle spelled view → transpose → contiguous → view
returns contiguous NCHW in eager whatever its input's layout (channel_permutation marks where
that result, or a conv reading it, ends up), and so does everything computed from it up to
the next conv; there the fused tensor is made contiguous, or for that conv (which read an
NCHW tensor in eager) given the model's own layout. Runs last."""
import operator

import torch
from torch._prims_common import suggest_memory_format
from torch import fx

from ..graph import FusionGraph
from ..patterns import may_alias_input


def eager_layout(t, like, model_channels_last: bool, only_dense: bool = False):
    """`t` in the layout eager PyTorch gives a conv output for input `like`: channels_last
    when the model's weights or `like` are channels_last, else contiguous. Anything that is
    not a 4-d tensor is returned as it is; for an input of neither layout, the format its
    strides' order suggests (as PyTorch's conv chooses); with only_dense
    (where the producer is not known), so is anything but a dense tensor of the other
    layout (a view of the input, say, stays the view it is in eager)."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 4 and isinstance(like, torch.Tensor)
            and like.dim() == 4):
        return t
    if model_channels_last or (not like.is_contiguous()
                               and like.is_contiguous(memory_format=torch.channels_last)):
        fmt = torch.channels_last
    elif like.is_contiguous():
        fmt = torch.contiguous_format
    else:
        # a view of neither layout (a channel chunk): the format PyTorch's conv suggests
        # for it from its strides' order
        fmt = suggest_memory_format(like)
    if t.is_contiguous(memory_format=fmt):
        return t
    other = (torch.contiguous_format if fmt == torch.channels_last else torch.channels_last)
    if only_dense and not t.is_contiguous(memory_format=other):
        return t
    return t.contiguous(memory_format=fmt)


def fixed_layout(t, channels_last: bool):
    """`t` (a 4-d tensor; anything else as it is) in channels_last or contiguous NCHW: the
    layout eager gives a value computed from a contiguous channel shuffle."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 4):
        return t
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


# node.meta key set by channel_permutation: "contiguous" (eager's result is contiguous NCHW)
# or "from_contiguous" (a conv whose eager input was)
EAGER_FORMAT = "cnnfuse_eager_format"


def _eager_formats(g: FusionGraph, fused: dict) -> dict:
    """node -> "contiguous" or "model" (the model weights' layout) where eager's layout does
    not depend on the input's, past a contiguous channel shuffle; up to the next conv
    (made by cnnfuse), which gives the model's layout, then that conv's readers follow it."""
    formats = {}
    for node in g.graph.nodes:
        mark = node.meta.get(EAGER_FORMAT)
        inputs = [formats[a] for a in node.all_input_nodes if a in formats]
        if mark == "contiguous":
            formats[node] = "contiguous"
        elif mark == "from_contiguous":
            formats[node] = "model"
        elif inputs and fused.get(node) is not None and node.op != "output":
            kind = node.op == "call_module" and _made_by_cnnfuse(node, g)
            formats[node] = "model" if kind or "contiguous" not in inputs else "contiguous"
    return formats


def _made_by_cnnfuse(node: fx.Node, g: FusionGraph) -> bool:
    if node.meta.get("cnnfuse_fresh"):
        return True
    if node.op == "call_module":
        return type(g.modules.get(node.target)).__module__.startswith("cnnfuse.")
    # (a dense block's prefix views too: eager's concatenations were tensors of their own)
    return node.op == "call_function" and getattr(node.target, "__module__", "").startswith(
        "cnnfuse.")


def _views_of(node: fx.Node, g: FusionGraph, fused: dict) -> list:
    """`node` and its views, and theirs, transitively (not what it is a view of), short of
    those restored on their own (a merged conv's slices)."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        todo += [u for u in n.users if u.args and u.args[0] is n and u not in out
                 and may_alias_input(u, g.modules) and not fused.get(u)]
    return out


def run(g: FusionGraph) -> None:
    placeholders = [n for n in g.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    like = placeholders[0]
    fused = {}  # node -> whether it has a fused op's layout where eager's may differ
    for node in g.graph.nodes:
        if _made_by_cnnfuse(node, g):
            fused[node] = "out" not in node.kwargs  # a slice writer: its concat is restored
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(
                node.args[0], fx.Node) and isinstance(node.args[1], int) and _made_by_cnnfuse(
                    node.args[0], g):
            fused[node] = True  # (y, pooled)[0]; a slice y[:, k:] is a view (below)
        elif node.op in ("placeholder", "get_attr", "output") or may_alias_input(
                node, g.modules):
            fused[node] = False  # a view: restoring its base restores it
        else:  # elementwise ops, pools, BatchNorm: their inputs' layout
            fused[node] = any(fused.get(a, False) for a in node.all_input_nodes)
    sites = []
    for node in g.graph.nodes:
        if fused.get(node) and any(
                u.op == "output" or (u.op == "call_method" and u.target == "view"
                                     and u.args[0] is v)
                for v in _views_of(node, g, fused) for u in v.users):
            sites.append(node)
    formats = _eager_formats(g, fused)
    for node in sites:
        with g.graph.inserting_after(node):
            if node in formats:
                restored = g.graph.call_function(fixed_layout, (
                    node, formats[node] == "model" and g.model_channels_last))
            else:
                restored = g.graph.call_function(eager_layout, (
                    node, like, g.model_channels_last))
        node.replace_all_uses_with(restored, delete_user_cb=lambda u: u is not restored)
    if sites:
        g.report.add("outputs in the original's layout", len(sites))
