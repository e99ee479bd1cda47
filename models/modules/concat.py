"""The buffers of concatenations without torch.cat, as the rewritten graphs call them: the
producers write straight into their channel slices.

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

import torch
from torch import fx

from ...ops.conv2d import output_hw


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


ready._cnnfuse_view = True  # for patterns.may_alias_input: it is the buffer's prefix view
