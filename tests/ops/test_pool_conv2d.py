"""cnnfuse.ops.pool_conv2d (max or average pool → 1x1 conv in one op) against fp64
references: reference path, the fused Triton kernel (interpreter on the CPU), the two-op path,
the op contract; floor and ceil mode."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from cnnfuse import ops
from cnnfuse.ref.pool_conv2d import pool_padding, torch_padding

from ..util import DTYPE_IDS, DTYPES, assert_within_torch_error, triton_runnable

# (n, c, h, w, k, mode, window, stride, padding (h, w), ceil_mode)
CASES = [
    (2, 6, 7, 9, 5, "max", (3, 3), 1, (1, 1), False),          # GoogLeNet's pool projection
    (1, 40, 8, 7, 17, "avg", (3, 3), 1, (1, 1), False),        # Inception-v3: padding counted
    (2, 8, 6, 5, 4, "avg_valid", (3, 3), 1, (1, 1), False),    # Inception-v4: not counted
    (1, 70, 9, 9, 33, "max", (3, 3), 2, (0, 0), False),        # Inception-v3's stem
    (1, 5, 8, 11, 3, "avg_valid", (3, 5), (2, 1), (1, 2), False),
    (3, 4, 5, 5, 6, "avg", (5, 5), 3, (0, 0), False),          # Inception's auxiliary head
    # Ceil mode. Rows: H 7 gives no extra window, W 8 one (BN-Inception's stem pool).
    (1, 5, 7, 8, 6, "max", (3, 3), 2, (0, 0), True),
    # ResNet-D's shortcut pool: the last row's window overhangs by one, W 6 has none.
    (2, 6, 7, 6, 5, "avg_valid", (2, 2), 2, (0, 0), True),
    # count_include_pad: H 6's last window [5, 8) is clipped to [-1, 7) for its divisor
    (1, 7, 6, 5, 4, "avg", (3, 3), 2, (1, 1), True),
    # H 5: ceil((5 + 2 - 3) / 3) + 1 = 3, less one as the last window would start in the
    # right padding; W 9 gains a window, [8, 11) clipped to [-1, 10) for its divisor
    (1, 4, 5, 9, 3, "avg", (3, 3), 3, (1, 1), True),
    (2, 3, 5, 6, 4, "max", (3, 3), 3, (1, 1), True),           # the same rule, W 6 gains one
    (1, 6, 4, 8, 5, "avg_valid", (2, 3), (3, 2), (1, 0), True),  # H 4 trimmed, W 8 gains one
    (1, 5, 7, 9, 3, "avg", (2, 2), (3, 2), (1, 0), True),      # H 7 trimmed, W 9 gains one
    (1, 5, 7, 8, 4, "avg", (3, 3), 3, (0, 0), True),           # overhangs of 2 and 1
]
IDS = [f"n{c[0]}c{c[1]}x{c[2]}x{c[3]}-k{c[4]}-{c[5]}{c[6][0]}x{c[6][1]}s{c[7]}"
       + ("-ceil" if c[9] else "") for c in CASES]
CEIL = [i for i, c in enumerate(CASES) if c[9]]


def make(case, dtype, seed=0):
    n, c, h, w, k, *_ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 1, 1, generator=g) / c ** 0.5).to(dtype)
    bias = torch.randn(k, generator=g).to(dtype)
    return x, weight, bias


def torch_pool(case, x):
    *_, mode, window, stride, padding, ceil = case
    if mode == "max":
        return F.max_pool2d(x, window, stride, padding, ceil_mode=ceil)
    return F.avg_pool2d(x, window, stride, padding, ceil_mode=ceil,
                        count_include_pad=mode == "avg")


def torch_chain(case, x, weight, bias, r, dtype):
    """The pool and the conv as PyTorch runs them in `dtype`, rounding in between."""
    pooled = torch_pool(case, x.to(dtype))
    y = F.conv2d(pooled, weight.to(dtype), bias.to(dtype)) + r.to(dtype)
    return F.silu(y)


def run(case, x, weight, bias, r=None, **kw):
    *_, mode, window, stride, padding, ceil = case
    return ops.pool_conv2d(x, weight, bias, mode=mode, kernel_size=window, stride=stride,
                           padding=padding, ceil_mode=ceil, activation="silu", residual=r, **kw)


def out_shape(case):
    """(N, K, OH, OW) as PyTorch's pool sizes it."""
    n, c, h, w, k = case[:5]
    return (n, k, *torch_pool(case, torch.empty(1, 1, h, w)).shape[2:])


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_against_fp64(mode, case, dtype, backend):
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    check(case, dtype, "cpu")


def check(case, dtype, device):
    x, weight, bias = (t.to(device) for t in make(case, dtype))
    r = torch.randn(out_shape(case)).to(device, dtype)
    ours = run(case, x, weight, bias, r)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    ref64 = torch_chain(case, *(t.cpu() for t in (x, weight, bias, r)), torch.float64)
    same = torch_chain(case, x, weight, bias, r, dtype if device == "cuda" else torch.float32)
    assert_within_torch_error(ours.cpu(), same.to(dtype).cpu(), ref64)


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
def test_slice_of_a_poisoned_buffer(mode, backend):
    """Written into a channel slice of a wider NaN-filled buffer, from a channel-slice input
    whose neighbours are NaN too (a max over them would show)."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    case = CASES[0]
    x, weight, bias = make(case, torch.float32)
    wide = torch.full((2, 10, 7, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    wide[:, 2:8] = x
    n, k, oh, ow = out_shape(case)
    out = torch.full((n, k + 5, oh, ow), float("nan")).contiguous(
        memory_format=torch.channels_last)
    r = torch.randn(n, k, oh, ow)
    assert run(case, wide[:, 2:8], weight, bias, r, out=out, out_channel_offset=3) is out
    assert out[:, :3].isnan().all() and out[:, 3 + k:].isnan().all()
    assert_within_torch_error(out[:, 3:3 + k], torch_chain(case, x, weight, bias, r,
                                                           torch.float32),
                              torch_chain(case, x, weight, bias, r, torch.float64))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in a dot
@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
def test_max_keeps_nan_and_inf(mode, backend):
    """A NaN in a window makes its max NaN, and a window of -inf has max -inf, as PyTorch's."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    case = CASES[0]
    x, weight, bias = make(case, torch.float32)
    x[0, 1, 3, 4] = float("nan")
    x[1, :, 2:6, 2:7] = float("-inf")
    weight = weight.abs()  # so an -inf input gives an -inf output, not NaN from -inf + inf
    r = torch.zeros(out_shape(case))
    got = run(case, x, weight, bias, r)
    want = torch_chain(case, x, weight, bias, r, torch.float32)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got == float("-inf"), want == float("-inf"))


def test_opcheck():
    case = CASES[4]
    x, weight, bias = make(case, torch.float32)
    r = torch.randn(out_shape(case))
    args = (x, "avg_valid", [3, 5], [2, 1], [2, 2, 1, 1], weight, bias, "relu", r)
    torch.library.opcheck(torch.ops.cnnfuse.pool_conv2d.default, args)
    n, k, oh, ow = out_shape(case)
    out = torch.zeros(n, k + 2, oh, ow).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.cnnfuse.pool_conv2d_into.default, args + (out, 1))


def test_ceil_mode_is_extra_right_padding():
    """pool_padding's extra right padding gives PyTorch's ceil-mode output size at every input
    size (the rule that drops a last window starting in the right padding included), and
    torch_padding inverts it."""
    for k, s, h in itertools.product(range(1, 6), range(1, 5), range(1, 14)):
        for p in range(k // 2 + 1):
            x = torch.empty(1, 1, h, 1)
            for ceil in (False, True):
                pads = pool_padding((k, 1), (s, 1), (p, 0), ceil)
                size = (h + pads[2] + pads[3] - k) // s + 1
                try:
                    want = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=ceil).shape[2]
                except RuntimeError:  # no window fits: the op raises ValueError then
                    assert size < 1, (k, s, p, h, ceil)
                    continue
                assert size == want, (k, s, p, h, ceil)
                assert torch_padding((k, 1), (s, 1), pads) == ((p, 0), ceil and pads[3] > p)


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", [CASES[i] for i in (8, 13)], ids=[IDS[i] for i in (8, 13)])
def test_ceil_overhang_reads_nothing_past_the_input(mode, case, backend):
    """x a crop of a NaN-filled map (an overhang read past the input would show), written
    into a channel slice of a NaN-filled buffer."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    x, weight, bias = make(case, torch.float32)
    n, c, h, w = x.shape
    wide = torch.full((n, c, h + 3, w + 3), float("nan")).contiguous(
        memory_format=torch.channels_last)
    wide[:, :, :h, :w] = x
    _, k, oh, ow = out_shape(case)
    out = torch.full((n, k + 4, oh, ow), float("nan")).contiguous(
        memory_format=torch.channels_last)
    r = torch.randn(n, k, oh, ow)
    assert run(case, wide[:, :, :h, :w], weight, bias, r, out=out, out_channel_offset=1) is out
    assert out[:, :1].isnan().all() and out[:, 1 + k:].isnan().all()
    assert_within_torch_error(out[:, 1:1 + k], torch_chain(case, x, weight, bias, r,
                                                           torch.float32),
                              torch_chain(case, x, weight, bias, r, torch.float64))


def test_ceil_opcheck():
    case = CASES[9]
    x, weight, bias = make(case, torch.float32)
    r = torch.randn(out_shape(case))
    pads = pool_padding((3, 3), (3, 3), (1, 1), True)
    assert pads == [1, 2, 1, 2]
    args = (x, "avg", [3, 3], [3, 3], pads, weight, bias, "none", r)
    torch.library.opcheck(torch.ops.cnnfuse.pool_conv2d.default, args)
    assert torch.ops.cnnfuse.pool_conv2d(*args).shape == out_shape(case)
    # the public op takes the schema's form too, as ceil mode
    assert torch.equal(ops.pool_conv2d(x, weight, bias, mode="avg", kernel_size=3, stride=3,
                                       padding=pads, residual=r),
                       ops.pool_conv2d(x, weight, bias, mode="avg", kernel_size=3, stride=3,
                                       padding=1, ceil_mode=True, residual=r))


@pytest.mark.parametrize("bad, error, match", [
    (dict(mode="min"), ValueError, "mode='min'"),
    (dict(padding=(1, 3, 1, 1)), ValueError, "no PyTorch pool's"),
    (dict(padding=(1, 2, 1, 2), stride=2, ceil_mode=True), ValueError, "already says"),
    (dict(ceil_mode=1), TypeError, "ceil_mode must be a bool"),
    (dict(kernel_size=7, padding=0, ceil_mode=True), ValueError, "too small.* in ceil mode"),
    (dict(padding=2), ValueError, "exceeds half the pool window"),
    (dict(weight=torch.randn(4, 6, 3, 3)), ValueError, r"expected \(K, 6, 1, 1\)"),
    (dict(weight=torch.randn(4, 6, 1, 1).half()), TypeError, "weight has dtype"),
    (dict(kernel_size=9), ValueError, "too small"),
    (dict(bias=torch.randn(3)), ValueError, "bias has 3 elements"),
])
def test_bad_input(bad, error, match):
    kw = dict(x=torch.randn(2, 6, 5, 5), weight=torch.randn(4, 6, 1, 1), bias=None,
              mode="max", kernel_size=3, padding=1)
    kw.update(bad)
    with pytest.raises(error, match=match):
        ops.pool_conv2d(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda(mode, case, dtype, backend):
    backend(mode)
    check(case, dtype, "cuda")
