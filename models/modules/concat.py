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

from ...ops._eager import active, cached
from ...ops.conv2d import output_hw


def _part_shape(part) -> tuple:
    if isinstance(part, torch.Tensor):
        return tuple(part.shape), part.dtype, part.device
    x, channels, kernel, stride, padding, dilation = part  # a conv about to write its part
    oh, ow = output_hw(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
    return (x.shape[0], channels, oh, ow), x.dtype, x.device


def _layout(parts: tuple, groups: int) -> tuple:
    """What concat_buffer's result depends on, checked: (buffer shape, dtype, device, each
    part's shape and dtype, interleaved)."""
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
    # Shuffling g equal parts interleaves them: part r owns channels r, r + g, r + 2g, ...
    interleaved = groups > 1 and len(parts) == groups and len(set(channels)) == 1
    return (n, sum(channels), h, w), dtype, devices[0], shapes, dtypes, interleaved


class _BufferPlan:
    """concat_buffer for one geometry of parts, decided once: the buffer's shape, dtype and
    device, each part's view of it as as_strided arguments (channels_last: channel c of
    image i at i·HWC + c, a channel slice or every g-th channel alike), and the parts a conv
    computes in another dtype than the result, which get a scratch tensor of their own."""
    __slots__ = ("shape", "dtype", "device", "views", "scratch", "interleaved")

    def __init__(self, parts: tuple, groups: int):
        shape, self.dtype, self.device, shapes, dtypes, self.interleaved = _layout(parts, groups)
        n, c, h, w = self.shape = shape
        self.views, start = [], 0
        for s in shapes:
            offset, step = (len(self.views), groups) if self.interleaved else (start, 1)
            self.views.append((s, (h * w * c, step, w * c, c), offset))
            start += s[1]
        self.scratch = tuple((i, s, dt) for i, (p, s, dt) in enumerate(zip(parts, shapes, dtypes))
                             if not isinstance(p, torch.Tensor) and dt != self.dtype)

    def __call__(self) -> tuple:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device,
                             memory_format=torch.channels_last)
        views = [buffer.as_strided(*v) for v in self.views]
        if self.scratch:
            for i, shape, dtype in self.scratch:
                views[i] = torch.empty(shape, dtype=dtype, device=self.device,
                                       memory_format=torch.channels_last)
        return (buffer, self.interleaved, *views)


class _Plans:
    """The plans of every concatenation buffer, by the parts' geometry (module-wide: the
    graphs call free functions)."""


_PLANS = _Plans()


def _first_tensor(parts: tuple):
    p = parts[0]
    return p if isinstance(p, torch.Tensor) else p[0]


@fx.wrap
def concat_buffer(parts: tuple, groups: int) -> tuple:
    """(buffer, interleaved, view of each part). parts are tensors, or (conv input,
    out_channels, kernel, stride, padding, dilation) for the parts a conv will write.

    The buffer is channels_last, of the parts' promoted dtype (as torch.cat promotes); a part
    a conv computes in another dtype than that gets a scratch tensor instead of its view
    (concat_result copies it in). Raises ValueError for parts that differ outside the channel
    dimension or lie on different devices.

    Plain eager calls look the plan up by every part's shape, dtype and device (and the conv
    geometry of the parts a conv writes): only the allocation and the views run per call."""
    if active(_first_tensor(parts)):
        key = [groups]
        for p in parts:
            if isinstance(p, torch.Tensor):
                key.append((p.shape, p.dtype, p.device))
            else:
                x = p[0]
                key.append((x.shape, x.dtype, x.device, p[1:]))
        return cached(_PLANS, tuple(key), lambda: _BufferPlan(parts, groups))()
    # Traced, compiled or under a dispatch mode: the same, spelled as slices for the tracer.
    shape, dtype, device, shapes, dtypes, interleaved = _layout(parts, groups)
    buffer = torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    if interleaved:
        views = [buffer[:, r::groups] for r in range(groups)]
    else:
        starts = [sum(s[1] for s in shapes[:i]) for i in range(len(parts))]
        views = [buffer.narrow(1, st, s[1]) for st, s in zip(starts, shapes)]
    # A conv computing in another dtype than the result writes a scratch tensor instead,
    # copied (and converted) into its view once written.
    views = [torch.empty(s, dtype=dt, device=device, memory_format=torch.channels_last)
             if not isinstance(p, torch.Tensor) and dt != dtype else v
             for p, s, dt, v in zip(parts, shapes, dtypes, views)]
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
    dtype = buffer.dtype
    for r, part in enumerate(written):
        if part.dtype is not dtype:  # a scratch part (see concat_buffer)
            start = sum(p.shape[1] for p in written[:r])
            (buffer[:, r::groups] if interleaved else
             buffer.narrow(1, start, part.shape[1])).copy_(part)
    if groups == 1 or interleaved:
        return buffer
    n, c, h, w = buffer.shape
    return buffer.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _GrowingPlan:
    """growing_buffer for one geometry of `first` and the layers' channels, decided once:
    the buffer's shape, dtype and device and every view of it as as_strided arguments."""
    __slots__ = ("shape", "dtype", "device", "parts", "prefixes")

    def __init__(self, first: torch.Tensor, channels: tuple):
        if first.dim() != 4:
            raise ValueError(f"dense block: the first part has shape {tuple(first.shape)}; "
                             "it must be (N, C, H, W)")
        n, c0, h, w = first.shape
        sizes = (c0,) + tuple(channels)
        c = sum(sizes)
        self.shape, self.dtype, self.device = (n, c, h, w), first.dtype, first.device
        stride = (h * w * c, 1, w * c, c)  # channels_last
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.parts = tuple(((n, k, h, w), stride, s) for s, k in zip(starts, sizes))
        self.prefixes = tuple(((n, s + k, h, w), stride, 0) for s, k in zip(starts, sizes))

    def __call__(self) -> tuple:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device,
                             memory_format=torch.channels_last)
        return (tuple([buffer.as_strided(*v) for v in self.parts]),
                tuple([buffer.as_strided(*v) for v in self.prefixes]))


@fx.wrap
def growing_buffer(first: torch.Tensor, channels: tuple) -> tuple:
    """A dense block's buffer (channels_last, first's dtype and device): `first`'s channels,
    then each layer's. Returns (views of each part, views of each prefix: [first],
    [first, layer 1], ...). Raises ValueError for a `first` that is not 4-d.

    Plain eager calls look the plan up by first's shape, dtype and device and the channels:
    only the allocation and the views run per call."""
    if active(first):
        key = ("dense", first.shape, first.dtype, first.device, channels)
        return cached(_PLANS, key, lambda: _GrowingPlan(first, channels))()
    if first.dim() != 4:
        raise ValueError(f"dense block: the first part has shape {tuple(first.shape)}; "
                         "it must be (N, C, H, W)")
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
