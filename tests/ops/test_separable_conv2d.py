"""cnnfuse.ops.separable_conv2d (depthwise conv → 1x1 conv in one op) against fp64 references:
reference path, the fused Triton kernel (interpreter on the CPU), the two-op path, the op
contract."""
import pytest
import torch
import torch.nn.functional as F

from cnnfuse import ops

from ..util import DTYPE_IDS, DTYPES, assert_within_torch_error, triton_runnable

# (n, c, h, w, k, dw kernel, stride, padding (l, r, t, b), dilation)
CASES = [
    (2, 6, 7, 9, 5, (3, 3), 1, (1, 1, 1, 1), 1),
    (1, 16, 11, 10, 24, (5, 5), 2, (2, 2, 2, 2), 1),
    (2, 8, 6, 6, 4, (3, 3), 1, (2, 2, 2, 2), 2),
    (1, 70, 9, 9, 33, (3, 3), 2, (0, 1, 0, 1), 1),   # asymmetric 'same', several channel blocks
    (1, 5, 8, 7, 3, (1, 7), 1, (3, 3, 0, 0), 1),
]
IDS = [f"n{c[0]}c{c[1]}x{c[2]}x{c[3]}-k{c[4]}-{c[5][0]}x{c[5][1]}s{c[6]}" for c in CASES]


def make(case, dtype, seed=0):
    n, c, h, w, k, ks, stride, pad, dil = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    dw = (torch.randn(c, 1, *ks, generator=g) / (ks[0] * ks[1]) ** 0.5).to(dtype)
    db = torch.randn(c, generator=g).to(dtype)
    pw = (torch.randn(k, c, 1, 1, generator=g) / c ** 0.5).to(dtype)
    pb = torch.randn(k, generator=g).to(dtype)
    return x, dw, db, pw, pb


def torch_chain(case, x, dw, db, pw, pb, r, dtype):
    """The two convs as PyTorch runs them in `dtype`, rounding in between."""
    *_, stride, pad, dil = case
    mid = F.conv2d(F.pad(x.to(dtype), pad), dw.to(dtype), db.to(dtype), stride, 0, dil,
                   x.shape[1])
    y = F.conv2d(F.relu6(mid), pw.to(dtype), pb.to(dtype))
    return torch.relu(y + r.to(dtype)) if r is not None else torch.relu(y)


def run(case, x, dw, db, pw, pb, r=None, **kw):
    *_, stride, pad, dil = case
    return ops.separable_conv2d(x, dw, db, pw, pb, stride, list(pad), dil, dw_activation="relu6",
                                activation="relu", residual=r, **kw)


def out_shape(case):
    n, c, h, w, k, ks, stride, pad, dil = case
    oh = (h + pad[2] + pad[3] - dil * (ks[0] - 1) - 1) // stride + 1
    ow = (w + pad[0] + pad[1] - dil * (ks[1] - 1) - 1) // stride + 1
    return n, k, oh, ow


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_against_fp64(mode, case, dtype, backend):
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    check(case, dtype, "cpu")


def check(case, dtype, device):
    x, dw, db, pw, pb = (t.to(device) for t in make(case, dtype))
    r = torch.randn(out_shape(case)).to(device, dtype)
    ours = run(case, x, dw, db, pw, pb, r)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    ref64 = torch_chain(case, *(t.cpu() for t in (x, dw, db, pw, pb, r)), torch.float64)
    same = torch_chain(case, x, dw, db, pw, pb, r, dtype if device == "cuda" else torch.float32)
    assert_within_torch_error(ours.cpu(), same.to(dtype).cpu(), ref64)


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
def test_interleaved_slice_of_a_poisoned_buffer(mode, backend):
    """Written into every other channel of a wider NaN-filled buffer (a ShuffleNet store),
    from a channel-slice input; nothing else is touched."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    case = CASES[0]
    n, k, oh, ow = out_shape(case)
    wide, dw, db, pw, pb = make(case[:1] + (case[1] + 3,) + case[2:], torch.float32)
    x = wide[:, 3:]
    dw, db = dw[3:], db[3:]
    pw = pw[:, 3:].contiguous()
    buf = torch.full((n, 2 * k, oh, ow), float("nan")).contiguous(
        memory_format=torch.channels_last)
    got = run(case, x, dw, db, pw, pb, out=buf[:, 1::2])
    assert got.shape == (n, k, oh, ow)
    assert torch.isnan(buf[:, 0::2]).all() and torch.isfinite(buf[:, 1::2]).all()
    expected = torch_chain(case, x.double(), dw.double(), db.double(), pw.double(), pb.double(),
                           None, torch.float64)
    assert (buf[:, 1::2].double() - expected).abs().max() < 1e-4


def test_opcheck():
    case = CASES[1]
    x, dw, db, pw, pb = make(case, torch.float32)
    *_, stride, pad, dil = case
    args = (x, dw, db, [stride] * 2, list(pad), [dil] * 2, "relu6", pw, pb, "relu", None)
    torch.library.opcheck(torch.ops.cnnfuse.separable_conv2d.default, args)
    n, k, oh, ow = out_shape(case)
    out = torch.zeros(n, k + 2, oh, ow).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.cnnfuse.separable_conv2d_into.default, args + (out, 1))


@pytest.mark.parametrize("bad, error, match", [
    (dict(dw=torch.randn(12, 1, 3, 3)), ValueError, "one per input channel"),
    (dict(pw=torch.randn(4, 6, 3, 3)), ValueError, "expected \\(K, 6, 1, 1\\)"),
    (dict(pw=torch.randn(4, 6, 1, 1).half()), TypeError, "weight has dtype"),
    (dict(pb=torch.randn(3)), ValueError, "bias has 3 elements"),
])
def test_bad_input(bad, error, match):
    kw = dict(x=torch.randn(2, 6, 7, 9), dw=torch.randn(6, 1, 3, 3), db=None,
              pw=torch.randn(4, 6, 1, 1), pb=None)
    kw.update(bad)
    with pytest.raises(error, match=match):
        ops.separable_conv2d(kw["x"], kw["dw"], kw["db"], kw["pw"], kw["pb"], 1, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda(mode, case, dtype, backend):
    backend(mode)
    check(case, dtype, "cuda")
