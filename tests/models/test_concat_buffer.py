"""The concatenation buffers' per-geometry plans: a plain eager call reuses what the first
call with the same parts' shapes, dtypes and devices decided, and never a plan made for parts
that differ in any of them. Each plan's buffer and views are checked against the slices the
traced path takes (the decision made afresh), and by writing every part through its view
and comparing the buffer with torch.cat."""
import pytest
import torch

from cnnfuse.models.modules import concat
from cnnfuse.models.modules.concat import concat_buffer, concat_result, growing_buffer


def _cl(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype).to(device).contiguous(
        memory_format=torch.channels_last)


def _spec(x, channels, kernel=(1, 1), stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    return (x, channels, kernel, stride, padding, dilation)


def _geometry(t: torch.Tensor, base: torch.Tensor) -> tuple:
    offset = t.storage_offset() - base.storage_offset()
    return tuple(t.shape), t.stride(), offset, t.dtype, t.device


def _uncached(fn, *args):
    """fn's result as the traced path decides it (no plan looked up or stored)."""
    real = concat.active
    concat.active = lambda x: False
    try:
        return fn(*args)
    finally:
        concat.active = real


def _check_buffer(parts, groups):
    got = concat_buffer(parts, groups)
    want = _uncached(concat_buffer, parts, groups)
    buffer, interleaved, views = got[0], got[1], got[2:]
    assert interleaved == want[1]
    assert _geometry(buffer, buffer) == _geometry(want[0], want[0])
    assert buffer.is_contiguous(memory_format=torch.channels_last)
    assert len(views) == len(want) - 2
    for v, w in zip(views, want[2:]):
        assert (v.dtype == buffer.dtype) == (w.dtype == want[0].dtype)
        if v.dtype == buffer.dtype:
            assert _geometry(v, buffer) == _geometry(w, want[0])
        else:  # a scratch tensor of its own, for a conv computing in another dtype
            assert _geometry(v, v) == _geometry(w, w)
    return got


def _values(parts, views):
    """Write each part's values through its view; the parts as tensors, for torch.cat."""
    tensors = []
    for p, v in zip(parts, views):
        t = p if isinstance(p, torch.Tensor) else torch.randn(v.shape, dtype=v.dtype)
        v.copy_(t)
        tensors.append(t)
    return tensors


def _cat(tensors, groups):
    y = torch.cat(tensors, 1)
    if groups == 1:
        return y
    n, c, h, w = y.shape
    return y.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_plan_is_never_reused_for_parts_that_differ(groups):
    x = _cl(2, 3, 5, 7)
    base = [_spec(x, 4), _spec(x, 4)]
    variants = {
        "same": base,
        "batch": [_spec(_cl(3, 3, 5, 7), 4), _spec(_cl(3, 3, 5, 7), 4)],
        "height": [_spec(_cl(2, 3, 6, 7), 4), _spec(_cl(2, 3, 6, 7), 4)],
        "channels": [_spec(x, 4), _spec(x, 6)],
        "conv stride": [_spec(x, 4, stride=(2, 2)), _spec(x, 4, stride=(2, 2))],
        "dtype": [_spec(x.double(), 4), _spec(x.double(), 4)],
        "mixed dtypes": [_spec(x, 4), _spec(x.half(), 4)],
        "tensor part": [_spec(x, 4), _cl(2, 4, 5, 7)],
        "tensor part of another dtype": [_spec(x, 4), _cl(2, 4, 5, 7, dtype=torch.float64)],
        "device": [_spec(x.to("meta"), 4), _spec(x.to("meta"), 4)],
    }
    for name, parts in variants.items():
        for _ in range(2):  # the first call makes the plan, the second uses it
            got = _check_buffer(tuple(parts), groups)
        if got[0].device.type == "meta":
            continue
        tensors = _values(parts, got[2:])
        y = concat_result(got[0], got[1], groups, tuple(got[2:]))
        assert torch.equal(y, _cat([t.to(y.dtype) for t in tensors], groups)), name


def test_interleaved_only_for_as_many_equal_parts_as_groups():
    x = _cl(1, 2, 3, 3)
    assert concat_buffer((_spec(x, 3), _spec(x, 3)), 2)[1] is True
    assert concat_buffer((_spec(x, 3), _spec(x, 3), _spec(x, 3)), 2)[1] is False
    assert concat_buffer((_spec(x, 2), _spec(x, 4)), 2)[1] is False


def test_mismatched_parts_raise_after_a_plan_for_matching_ones():
    x = _cl(2, 3, 5, 7)
    concat_buffer((_spec(x, 4), _cl(2, 4, 5, 7)), 1)
    with pytest.raises(ValueError, match="part 1 has shape"):
        concat_buffer((_spec(x, 4), _cl(2, 4, 5, 6)), 1)
    with pytest.raises(ValueError, match="part 1 has shape"):
        concat_buffer((_spec(x, 4), _cl(3, 4, 5, 7)), 1)
    with pytest.raises(ValueError, match="part 1 has shape"):
        concat_buffer((_spec(x, 4), _spec(x, 4, stride=(2, 2))), 1)
    with pytest.raises(ValueError, match="part 1 is on meta"):
        concat_buffer((_spec(x, 4), _cl(2, 4, 5, 7, device="meta")), 1)
    with pytest.raises(ValueError, match="part 1 has shape"):
        concat_buffer((_spec(x, 4), torch.randn(2, 4, 5)), 1)


def test_growing_buffer_plans_differ_by_geometry():
    for first, channels in [(_cl(2, 3, 4, 5), (2, 2)), (_cl(2, 3, 4, 5), (2, 2)),
                            (_cl(1, 3, 4, 5), (2, 2)), (_cl(2, 3, 4, 6), (2, 2)),
                            (_cl(2, 3, 4, 5), (2, 3, 1)),
                            (_cl(2, 3, 4, 5, dtype=torch.float16), (2, 2)),
                            (_cl(2, 3, 4, 5, device="meta"), (2, 2))]:
        (parts, prefixes) = growing_buffer(first, channels)
        want_parts, want_prefixes = _uncached(growing_buffer, first, channels)
        base, want_base = prefixes[-1], want_prefixes[-1]
        assert base.is_contiguous(memory_format=torch.channels_last)
        assert [_geometry(v, base) for v in parts + prefixes] == [
            _geometry(v, want_base) for v in want_parts + want_prefixes]
        if first.device.type == "meta":
            continue
        tensors = _values([first] + [None] * len(channels), parts)
        assert torch.equal(base, torch.cat(tensors, 1))
        for k, p in enumerate(prefixes, 1):
            assert torch.equal(p, torch.cat(tensors[:k], 1))
    with pytest.raises(ValueError, match="must be \\(N, C, H, W\\)"):
        growing_buffer(torch.randn(2, 3, 4), (2,))
