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
import functools
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
        if devices[i] != devices[0]:
            raise ValueError(f"concatenation: part {i} is on {devices[i]}, part 0 on "
                             f"{devices[0]}")
    dtype = functools.reduce(torch.promote_types, dtypes)  # as torch.cat promotes
    channels = [s[1] for s in shapes]
    buffer = torch.empty((n, sum(channels), h, w), dtype=dtype, device=devices[0],
                         memory_format=torch.channels_last)
    # Shuffling g equal parts interleaves them: part r owns channels r, r + g, r + 2g, ...
    interleaved = groups > 1 and len(parts) == groups and len(set(channels)) == 1
    if interleaved:
        views = [buffer[:, r::groups] for r in range(groups)]
    else:
        starts = [sum(channels[:i]) for i in range(len(parts))]
        views = [buffer.narrow(1, s, c) for s, c in zip(starts, channels)]
    # A conv computing in another dtype than the result writes a scratch tensor instead,
    # copied (and converted) into its view once written.
    views = [torch.empty(shape, dtype=dt, device=devices[0], memory_format=torch.channels_last)
             if not isinstance(p, torch.Tensor) and dt != dtype else v
             for p, shape, dt, v in zip(parts, shapes, dtypes, views)]
    return (buffer, interleaved) + tuple(views)


@fx.wrap
def copy_into(view: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    return view.copy_(part)


copy_into._cnnfuse_writes = True  # for patterns.may_mutate


@fx.wrap
def concat_result(buffer: torch.Tensor, interleaved: bool, groups: int,
                  written: tuple) -> torch.Tensor:
    """The concatenation once every part is written (`written`, in part order, also orders
    the graph). A shuffle whose groups are not the parts runs as the copy it always was."""
    start = 0
    for r, part in enumerate(written):
        if part.dtype != buffer.dtype:  # a scratch part (see concat_buffer)
            (buffer[:, r::groups] if interleaved else
             buffer.narrow(1, start, part.shape[1])).copy_(part)
        start += part.shape[1]
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
    if (dim != 1 or not isinstance(parts, (list, tuple)) or len(parts) < min_parts
            or node.kwargs.get("out") is not None):
        return None
    return list(parts) if all(isinstance(p, fx.Node) for p in parts) else None


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_method(node, names) -> bool:
    return node is not None and node.op == "call_method" and node.target in names


def _dim_of(node, tensor: fx.Node, i: int) -> bool:
    """Whether `node` is dimension i of `tensor`: t.size(i), t.size()[i] or t.shape[i]."""
    if not isinstance(node, fx.Node):
        return False
    if _is_method(node, ("size",)) and node.args == (tensor, i):
        return True
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != i:
        return False
    whole = node.args[0]
    return isinstance(whole, fx.Node) and whole.args[0] is tensor and (
        (_is_method(whole, ("size",)) and len(whole.args) == 1) or
        (whole.op == "call_function" and whole.target is getattr and whole.args[1] == "shape"))


def _shape_args(node: fx.Node) -> tuple:
    return tuple(node.args[1]) if len(node.args) == 2 and isinstance(
        node.args[1], (tuple, list)) else tuple(node.args[1:])


def channel_shuffle_after(cat: fx.Node) -> Optional[tuple]:
    """(groups, nodes from the first view to the last) when the cat is read only by a channel
    shuffle: view(n, g, c // g, h, w) → transpose(1, 2) → [contiguous] → view/reshape(n, c or
    -1, h, w) or flatten(1, 2), with n, c, h, w the cat's own sizes; shape queries may read
    the cat too."""
    views = [u for u in cat.users if _is_method(u, ("view", "reshape"))]
    others = [u for u in cat.users if u not in views]
    if len(views) != 1 or not all(_is_method(u, ("size",)) or (
            u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
            for u in others):
        return None
    split = views[0]
    dims = _shape_args(split)
    if len(dims) != 5 or not isinstance(dims[1], int) or dims[1] < 2:
        return None
    groups, per_group = dims[1], dims[2]
    per_group_ok = isinstance(per_group, fx.Node) and per_group.op == "call_function" and (
        per_group.target is operator.floordiv and _dim_of(per_group.args[0], cat, 1)
        and per_group.args[1] == groups)
    if not (_dim_of(dims[0], cat, 0) and per_group_ok and _dim_of(dims[3], cat, 2)
            and _dim_of(dims[4], cat, 3)):
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
    if node is None:
        return None
    if (node.op == "call_function" and node.target is torch.flatten) or _is_method(
            node, ("flatten",)):
        ok = tuple(node.args[1:3]) == (1, 2) and not node.kwargs
    else:
        out = _shape_args(node) if _is_method(node, ("view", "reshape")) else ()
        ok = len(out) == 4 and _dim_of(out[0], cat, 0) and (
            out[1] == -1 or _dim_of(out[1], cat, 1)) and _dim_of(out[2], cat, 2) and _dim_of(
            out[3], cat, 3)
    return (groups, chain + [node]) if ok else None


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erase the given nodes once nothing reads them (in any order), and the shape arithmetic
    that fed only them."""
    pending, erased, progress = list(nodes), set(), True
    while pending and progress:
        progress = False
        for node in list(pending):
            if node in erased:
                pending.remove(node)
            elif not node.users:
                inputs = node.all_input_nodes
                graph.erase_node(node)
                erased.add(node)
                pending.remove(node)
                progress = True
                pending += [a for a in inputs if a not in erased and (
                    _is_method(a, ("size",)) or (a.op == "call_function" and a.target in (
                        operator.getitem, operator.floordiv, operator.mul, getattr)))]
