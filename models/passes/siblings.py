"""Sibling convs merged into one: convs that read the same tensor with the same geometry and
activation (Inception's 1x1 reduces) become one conv over the concatenated weights, whose
output channel slices their readers take in place. One pass over the shared input instead of
one per sibling, and one launch. Runs after the concatenation passes: their writers keep
writing directly."""
from typing import Optional

import torch
from torch import fx

from ..graph import FusionGraph
from ..modules import FusedConv2d


def _signature(m: FusedConv2d) -> Optional[tuple]:
    if (m.groups != 1 or m.has_residual or m.has_input_scale or m.input_affine is not None
            or m.returns_pooled):
        return None
    return (m.in_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.activation,
            m.weight.dtype)


def merged(convs: list) -> FusedConv2d:
    """One FusedConv2d computing every conv of `convs` (same signature) side by side."""
    first = convs[0]
    out = FusedConv2d(first.in_channels, sum(c.out_channels for c in convs), first.kernel_size,
                      first.stride, first.padding, first.dilation, 1, bias=True,
                      activation=first.activation)
    out.weight.data = torch.cat([c.weight.data for c in convs])
    out.pack_weight()
    out.bias.data = torch.cat([c.bias.data if c.bias is not None else
                               torch.zeros(c.out_channels, dtype=c.weight.dtype,
                                           device=c.weight.device) for c in convs])
    out.folded_bn = all(c.folded_bn for c in convs)
    return out


def sibling_groups(graph: fx.Graph, modules: dict, calls: dict) -> list:
    """[(input node, [conv nodes])] of convs that can merge, each group in graph order."""
    groups = []
    for node in graph.nodes:
        by_signature = {}
        for user in node.users:
            m = modules.get(user.target) if user.op == "call_module" else None
            if (isinstance(m, FusedConv2d) and user.args == (node,) and not user.kwargs
                    and calls.get(user.target, 1) == 1 and _signature(m) is not None):
                by_signature.setdefault(_signature(m), []).append(user)
        order = {n: i for i, n in enumerate(graph.nodes)} if by_signature else {}
        groups += [(node, sorted(users, key=order.get)) for users in by_signature.values()
                   if len(users) > 1]
    return groups


def run(g: FusionGraph) -> None:
    done = set()
    while True:  # again after each merge: a merged conv's slices may feed another group
        groups = [(source, nodes) for source, nodes in sibling_groups(g.graph, g.modules, g.calls)
                  if (source, nodes[0]) not in done]
        if not groups:
            return
        source, nodes = groups[0]
        done.add((source, nodes[0]))
        # The merged conv runs where the first sibling did: nothing in between may write.
        if g.mutation_between(nodes[0], nodes[-1]):
            continue
        convs = [g.modules[n.target] for n in nodes]
        # On the root: a container (Sequential) with an extra child would run it if called.
        name = nodes[0].target.replace(".", "_") + "_merged"
        g.replace_module(name, merged(convs))
        with g.graph.inserting_before(nodes[0]):
            whole = g.graph.call_module(name, (source,))
        start = 0
        for node, conv in zip(nodes, convs):
            with g.graph.inserting_before(node):
                part = g.graph.call_method("narrow", (whole, 1, start, conv.out_channels))
            part.meta["cnnfuse_fresh"] = True  # eager had a tensor of its own (layout pass)
            node.replace_all_uses_with(part)
            g.graph.erase_node(node)
            g.reshape_not_view(part)
            start += conv.out_channels
        g.report.add("sibling convs merged", len(nodes))
