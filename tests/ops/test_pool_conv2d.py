"""cnnfuse.ops.pool_conv2d (max or average pool → 1x1 conv in one op) against fp64
references: reference path, the fused Triton kernel (interpreter on the CPU), the two-op path,
the op contract."""
import pytest
import torch
import torch.nn.functional as F

from cnnfuse import ops

from ..util import DTYPE_IDS, DTYPES, assert_within_torch_error, triton_runnable

# (n, c, h, w, k, mode, window, stride, padding (h, w))
CASES = [
    (2, 6, 7, 9, 5, "max", (3, 3), 1, (1, 1)),          # GoogLeNet's pool projection
    (1, 40, 8, 7, 17, "avg", (3, 3), 1, (1, 1)),        # Inception-v3: padding counted
    (2, 8, 6, 5, 4, "avg_valid", (3, 3), 1, (1, 1)),    # Inception-v4: padding not counted
    (1, 70, 9, 9, 33, "max", (3, 3), 2, (0, 0)),        # Inception-v3's stem, several blocks
    (1, 5, 8, 11, 3, "avg_valid", (3, 5), (2, 1), (1, 2)),
    (3, 4, 5, 5, 6, "avg", (5, 5), 3, (0, 0)),          # Inception's auxiliary head
]
IDS = [f"n{c[0]}c{c[1]}x{c[2]}x{c[3]}-k{c[4]}-{c[5]}{c[6][0]}x{c[6][1]}s{c[7]}" for c in CASES]


def make(case, dtype, seed=0):
    n, c, h, w, k, *_ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 1, 1, generator=g) / c ** 0.5).to(dtype)
    bias = torch.randn(k, generator=g).to(dtype)
    return x, weight, bias


def torch_chain(case, x, weight, bias, r, dtype):
    """The pool and the conv as PyTorch runs them in `dtype`, rounding in between."""
    *_, mode, window, stride, padding = case
    x = x.to(dtype)
    if mode == "max":
        pooled = F.max_pool2d(x, window, stride, padding)
    else:
        pooled = F.avg_pool2d(x, window, stride, padding, count_include_pad=mode == "avg")
    y = F.conv2d(pooled, weight.to(dtype), bias.to(dtype)) + r.to(dtype)
    return F.silu(y)


def run(case, x, weight, bias, r=None, **kw):
    *_, mode, window, stride, padding = case
    return ops.pool_conv2d(x, weight, bias, mode=mode, kernel_size=window, stride=stride,
                           padding=padding, activation="silu", residual=r, **kw)


def out_shape(case):
    n, c, h, w, k, mode, window, stride, padding = case
    stride = (stride, stride) if isinstance(stride, int) else stride
    return (n, k, (h + 2 * padding[0] - window[0]) // stride[0] + 1,
            (w + 2 * padding[1] - window[1]) // stride[1] + 1)


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


@pytest.mark.parametrize("bad, error, match", [
    (dict(mode="min"), ValueError, "mode='min'"),
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
