"""Concatenations without torch.cat: the producers write straight into their channel slices.

`torch.cat(parts, dim=1)`, and the channel shuffle that may follow it (ShuffleNet's view →
transpose(1, 2) → contiguous → view with g groups), become one buffer allocated before the
parts are produced. A part that is a fused conv read by nothing else stores its output in its
view of the buffer: a channel slice, or every g-th channel when a shuffle of g equal parts
follows, which is the shuffle done by the store's index map. Any other part is copied in.
That saves the cat's read and write of every conv output, and the shuffle's whole copy.

Dense connectivity (DenseNet: each layer reads the cat of everything before it in its block)
gets one buffer per block: each layer's conv writes its slice once and every concatenation
is a prefix view of the buffer, instead of a copy of all earlier features per layer.
"""
import operator
from typing import Optional

import torch
from torch import fx

from ..ops.conv2d import output_hw


def _part_shape(part) -> tuple:
    if isinstance(part, torch.Tensor):
        return tuple(part.shape), part.dtype, part.device
    x, channels, kernel, stride, padding, dilation = part  # a conv about to write its part
    oh, ow = output_hw(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
    return (x.shape[0], channels, oh, ow), x.dtype, x.device


@fx.wrap
def concat_buffer(parts: tuple, groups: int) -> tuple:
    """(buffer, interleaved, view of each part). parts are tensors, or (conv input,
    out_channels, kernel, stride, padding, dilation) for the parts a conv will write."""
    shapes, dtypes, devices = zip(*(_part_shape(p) for p in parts))
    n, _, h, w = shapes[0]
    for i, s in enumerate(shapes):
        if len(s) != 4 or (s[0], s[2], s[3]) != (n, h, w):
            raise ValueError(f"concatenation: part {i} has shape {s}, part 0 {shapes[0]}; "
                             "all must agree outside the channel dimension")
        if dtypes[i] != dtypes[0] or devices[i] != devices[0]:
            raise TypeError(f"concatenation: part {i} is {dtypes[i]} on {devices[i]}, part 0 "
                            f"{dtypes[0]} on {devices[0]}")
    channels = [s[1] for s in shapes]
    buffer = torch.empty((n, sum(channels), h, w), dtype=dtypes[0], device=devices[0],
                         memory_format=torch.channels_last)
    # Shuffling g equal parts interleaves them: part r owns channels r, r + g, r + 2g, ...
    interleaved = groups > 1 and len(parts) == groups and len(set(channels)) == 1
    if interleaved:
        return (buffer, True) + tuple(buffer[:, r::groups] for r in range(groups))
    starts = [sum(channels[:i]) for i in range(len(parts))]
    return (buffer, False) + tuple(buffer.narrow(1, s, c) for s, c in zip(starts, channels))


@fx.wrap
def copy_into(view: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    return view.copy_(part)


@fx.wrap
def concat_result(buffer: torch.Tensor, interleaved: bool, groups: int,
                  written: tuple) -> torch.Tensor:
    """The concatenation once every part is written (`written` orders it after the writes).
    A shuffle whose groups are not the parts runs as the copy it always was."""
    if groups == 1 or interleaved:
        return buffer
    n, c, h, w = buffer.shape
    return buffer.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@fx.wrap
def growing_buffer(first: torch.Tensor, channels: tuple) -> tuple:
    """A dense block's buffer: `first`'s channels, then each layer's. Returns (views of each
    part, views of each prefix: [first], [first, layer 1], ...)."""
    n, c0, h, w = first.shape
    sizes = (c0,) + tuple(channels)
    buffer = torch.empty((n, sum(sizes), h, w), dtype=first.dtype, device=first.device,
                         memory_format=torch.channels_last)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return (tuple(buffer.narrow(1, s, c) for s, c in zip(starts, sizes)),
            tuple(buffer.narrow(1, 0, s + c) for s, c in zip(starts, sizes)))


@fx.wrap
def ready(view: torch.Tensor, written: tuple) -> torch.Tensor:
    """`view` once the writes in `written` are done (the tuple only orders the graph)."""
    return view


def cat_parts(node: fx.Node, min_parts: int = 2) -> Optional[list]:
    """The parts of a `torch.cat(parts, dim=1)` node, or None."""
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(parts, (list, tuple)) or len(parts) < min_parts:
        return None
    return list(parts) if all(isinstance(p, fx.Node) for p in parts) else None


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_method(node, names) -> bool:
    return node is not None and node.op == "call_method" and node.target in names


def channel_shuffle_after(cat: fx.Node) -> Optional[tuple]:
    """(groups, nodes from the first view to the last) when the cat is read only by a channel
    shuffle: view(n, g, c/g, h, w) → transpose(1, 2) → [contiguous] → view/reshape(n, c, h, w)
    or flatten(1, 2); shape queries (`.size()`) may read it too."""
    views = [u for u in cat.users if _is_method(u, ("view", "reshape"))]
    others = [u for u in cat.users if u not in views]
    if len(views) != 1 or not all(_is_method(u, ("size",)) or (
            u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
            for u in others):
        return None
    split = views[0]
    dims = split.args[1:] if len(split.args) > 2 else tuple(split.args[1])
    if len(dims) != 5 or not isinstance(dims[1], int) or dims[1] < 2:
        return None
    chain, node = [split], _sole_user(split)
    swap = node is not None and (
        (node.op == "call_function" and node.target is torch.transpose) or
        _is_method(node, ("transpose",))) and set(node.args[1:3]) == {1, 2}
    if not swap:
        return None
    chain.append(node)
    node = _sole_user(node)
    if _is_method(node, ("contiguous",)):
        chain.append(node)
        node = _sole_user(node)
    if node is None or not (_is_method(node, ("view", "reshape")) and (
            len(node.args) == 5 or (len(node.args) == 2 and len(node.args[1]) == 4))
            or (node.op == "call_function" and node.target is torch.flatten
                and tuple(node.args[1:3]) == (1, 2))
            or (_is_method(node, ("flatten",)) and tuple(node.args[1:3]) == (1, 2))):
        return None
    return dims[1], chain + [node]


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erase the given nodes, and the shape arithmetic that fed only them, once unread."""
    pending, erased = list(nodes), set()
    while pending:
        node = pending.pop()
        if node in erased or node.users:
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        pending += [a for a in inputs if _is_method(a, ("size",)) or (
            a.op == "call_function" and a.target in (operator.getitem, operator.floordiv,
                                                     operator.mul, getattr))]
