"""cnnfuse.ops.depthwise_conv2d: the CUDA C++ kernel's CPU build (the same strip functions
the GPU runs) against fp64, every variant, both weight layouts; and on a GPU against cuDNN."""
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnfuse import ops
from cnnfuse.ops.depthwise_conv2d import depthwise_conv2d_into, pack_weight
from cnnfuse.ref import ACTIVATIONS

from ..util import DTYPE_IDS, DTYPES, assert_mean_of, assert_within_torch_error
from .test_conv2d import Case, make, out_hw, torch_conv


def dw(n, c, h, w, kernel, stride=1, pad=0, dilation=1, mult=1):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = (pad,) * 4 if isinstance(pad, int) else pad
    return Case(n, c, h, w, c * mult, kernel, (stride, stride) if isinstance(stride, int)
                else stride, pad, (dilation, dilation), groups=c)


# 16 and 24 channels take the 16-byte path in every dtype; OW >= 4 takes strips of 4 on the CPU.
CASES = [
    dw(2, 16, 9, 11, 3, pad=1),                       # fixed 3x3 s1, strip tail (11 = 2*4 + 3)
    dw(1, 24, 12, 13, 3, stride=2, pad=1),            # fixed 3x3 s2
    dw(2, 16, 11, 10, 5, pad=2),                      # fixed 5x5 s1
    dw(1, 16, 14, 15, 5, stride=2, pad=(1, 2, 1, 2)),  # fixed 5x5 s2, asymmetric 'same'
    dw(1, 24, 9, 8, 7, pad=3),                        # fixed 7x7 s1
    dw(2, 16, 13, 12, 7, stride=2, pad=3),            # fixed 7x7 s2
    dw(3, 16, 5, 3, 3, pad=1),                        # fixed, one output per item (OW < 4)
    dw(1, 7, 9, 10, 3, pad=1),                        # 7 channels: scalar path
    dw(2, 16, 10, 9, (1, 7), pad=(3, 3, 0, 0)),       # 1xk: generic, wide
    dw(2, 16, 9, 10, (7, 1), pad=(0, 0, 3, 3)),       # kx1
    dw(1, 16, 12, 12, 3, pad=2, dilation=2),          # dilation: generic
    dw(1, 8, 11, 11, 3, stride=(2, 1), pad=1),        # unequal strides: generic
    dw(1, 16, 13, 13, 9, pad=4),                      # 9x9: generic
    dw(2, 6, 9, 9, 3, stride=2, pad=1, mult=2),       # channel multiplier 2
    dw(1, 3, 8, 7, 5, pad=2, mult=3),                 # channel multiplier 3
]
CASE_IDS = [str(c) for c in CASES]


def check(case, dtype, activation, residual, packed=True, device="cpu", nchw_residual=False,
          **kw):
    x, w, b, r = make(case, dtype, residual)
    w = pack_weight(w) if packed else w.contiguous()
    if r is not None and not nchw_residual:  # an NCHW operand forces the scalar path
        r = r.contiguous(memory_format=torch.channels_last)
    x, w, b = x.to(device), w.to(device), b.to(device)
    r = r.to(device) if r is not None else None
    ours = ops.depthwise_conv2d(x, w, b, case.stride, case.padding, case.dilation[0],
                                activation=activation, residual=r, **kw)
    ref64 = torch_conv(case, x.cpu(), w.cpu(), b.cpu(), None if r is None else r.cpu(),
                       activation, torch.float64)
    same = torch_conv(case, x, w, b, r, activation, dtype).cpu()
    return ours, same, ref64


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_against_fp64(case, dtype):
    ours, same, ref64 = check(case, dtype, "relu6", residual=True)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    assert_within_torch_error(ours, same, ref64)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[8], CASES[13]],
                         ids=[str(CASES[i]) for i in (0, 3, 8, 13)])
def test_standard_weight_layout(case):
    """(K, 1, KH, KW) weights as stored by nn.Conv2d: read per channel, same result."""
    assert_within_torch_error(*check(case, torch.float16, "silu", True, packed=False))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_epilogue(activation, residual):
    assert_within_torch_error(*check(CASES[1], torch.float32, activation, residual))


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[str(CASES[0]), str(CASES[5])])
def test_nchw_residual(case):
    assert_within_torch_error(*check(case, torch.bfloat16, "relu", True, nchw_residual=True))


@pytest.mark.parametrize("offset", [8, 3], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_into_poisoned_slice(offset, layout):
    """A slice of a wider buffer: aligned NHWC slices keep the 16-byte path, the others take
    the scalar one; every channel outside the slice keeps its poison."""
    case = CASES[0]
    oh, ow = out_hw(case)
    out = torch.full((case.n, case.k + 12, oh, ow), float("nan"), dtype=torch.float16)
    if layout == "nhwc":
        out = out.contiguous(memory_format=torch.channels_last)
    ours, same, ref64 = check(case, torch.float16, "hardswish", True, out=out,
                              out_channel_offset=offset)
    assert ours is out
    assert out[:, :offset].isnan().all() and out[:, offset + case.k:].isnan().all()
    assert_within_torch_error(out[:, offset:offset + case.k], same, ref64)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pooled(case, dtype):
    """return_pooled: the means of what the kernel stored, per image and channel, summed over
    the blocks each image's strips are split into; y is what the unpooled call gives."""
    (y, pooled), same, ref64 = check(case, dtype, "hardswish", residual=True,
                                     return_pooled=True)
    assert pooled.dtype == torch.float32 and pooled.shape == (case.n, case.k)
    assert_mean_of(pooled, y)
    assert torch.equal(y, check(case, dtype, "hardswish", residual=True)[0])


def test_pool_buffer_is_overwritten():
    """The kernel adds block sums into the pool, so it zeroes it first: poison is not kept."""
    case = CASES[0]
    x, w, b, _ = make(case, torch.float16)
    oh, ow = out_hw(case)
    out = torch.empty(case.n, case.k, oh, ow, dtype=torch.float16).to(
        memory_format=torch.channels_last)
    pool = torch.full((case.n, case.k), float("nan"))
    torch.ops.cnnfuse.depthwise_conv2d(x, pack_weight(w), b, list(case.stride),
                                       list(case.padding), list(case.dilation), 1, None, out, pool)
    assert_mean_of(pool, out)


def test_empty_output():
    """An image with no rows: nothing to compute, no division by the zero-sized grid."""
    x, w = torch.randn(1, 8, 0, 5), pack_weight(torch.randn(8, 1, 3, 3))
    out, pool = torch.empty(1, 8, 0, 5), torch.full((1, 8), float("nan"))
    torch.ops.cnnfuse.depthwise_conv2d(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 0, None, out,
                                       pool)
    assert (pool == 0).all()


def test_conv2d_routes_depthwise_to_the_kernel(backend, monkeypatch):
    """conv2d with groups == C runs this kernel under CNNFUSE_BACKEND=cuda (its CPU build)."""
    conv2d_module = sys.modules["cnnfuse.ops.conv2d"]  # the package exports a function of that name
    backend("cuda")
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return depthwise_conv2d_into(*args)

    monkeypatch.setattr(conv2d_module, "depthwise_conv2d_into", counted)
    case = CASES[2]
    x, w, b, r = make(case, torch.float32, residual=True)
    got = ops.conv2d(x, w, b, case.stride, case.padding, case.dilation, case.groups,
                     activation="gelu", residual=r)
    assert len(calls) == 1
    assert_within_torch_error(got, torch_conv(case, x, w, b, r, "gelu", torch.float32),
                              torch_conv(case, x, w, b, r, "gelu", torch.float64))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 2), c=st.sampled_from([1, 3, 8, 16, 24, 40]), mult=st.integers(1, 2),
       h=st.integers(1, 12), w=st.integers(1, 12), kh=st.integers(1, 7), kw=st.integers(1, 7),
       square=st.booleans(), sh=st.integers(1, 3), sw=st.integers(1, 3), dil=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 3)] * 4), activation=st.sampled_from(ACTIVATIONS),
       residual=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_random_configurations(n, c, mult, h, w, kh, kw, square, sh, sw, dil, pads, activation,
                               residual, dtype):
    if square:  # the fixed variants need square kernels and equal strides
        kw, sw = kh, sh
    case = Case(n, c, h + dil * (kh - 1), w + dil * (kw - 1), c * mult, (kh, kw), (sh, sw), pads,
                (dil, dil), groups=c)
    assert_within_torch_error(*check(case, dtype, activation, residual))


def test_opcheck():
    case = CASES[1]
    x, w, b, r = make(case, torch.float32, residual=True)
    oh, ow = out_hw(case)
    out = torch.zeros(case.n, case.k + 2, oh, ow).to(memory_format=torch.channels_last)
    args = (x, pack_weight(w), b, list(case.stride), list(case.padding), list(case.dilation), 1,
            r, out.narrow(1, 1, case.k))
    torch.library.opcheck(torch.ops.cnnfuse.depthwise_conv2d.default, args)
    pool = torch.zeros(case.n, case.k)
    torch.library.opcheck(torch.ops.cnnfuse.depthwise_conv2d.default, args + (pool,))


@pytest.mark.parametrize("bad, error, match", [
    (dict(weight=torch.randn(16, 2, 3, 3)), ValueError, "x has 16 channels"),
    (dict(weight=torch.randn(24, 1, 3, 3).half()), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(5)), ValueError, "bias has 5 elements"),
    (dict(activation="swish"), ValueError, "activation='swish'"),
])
def test_bad_input(bad, error, match):
    kw = dict(x=torch.randn(2, 16, 9, 9), weight=torch.randn(16, 1, 3, 3), bias=None, padding=1)
    kw.update(bad)
    with pytest.raises(error, match=match):
        ops.depthwise_conv2d(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), **kw)


def test_kernel_checks_its_arguments():
    x, w = torch.randn(1, 8, 5, 5), torch.randn(12, 1, 3, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        torch.ops.cnnfuse.depthwise_conv2d(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 0, None,
                                           torch.empty(1, 12, 5, 5))
    with pytest.raises(ValueError, match="out has shape"):
        torch.ops.cnnfuse.depthwise_conv2d(x, w[:8], None, [1, 1], [1, 1, 1, 1], [1, 1], 0,
                                           None, torch.empty(1, 8, 4, 5))
    out = torch.empty(1, 8, 5, 5)
    for pool, error, match in ((torch.empty(1, 12), ValueError, "pool must be a contiguous"),
                               (torch.empty(1, 16)[:, ::2], ValueError, "pool must be a contiguous"),
                               (torch.empty(1, 8).half(), TypeError, "pool must be float32")):
        with pytest.raises(error, match=match):
            torch.ops.cnnfuse.depthwise_conv2d(x, w[:8], None, [1, 1], [1, 1, 1, 1], [1, 1], 0,
                                               None, out, pool)


# ------------------------------------------------------------------ GPU: against cuDNN

# Batch 1 spreads one output per thread over the SMs; the large case takes strips of 4.
GPU_CASES = CASES + [dw(64, 96, 56, 56, 3, stride=1, pad=1), dw(32, 144, 56, 56, 5, stride=2,
                                                                 pad=2)]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "oihw"])
def test_cuda_against_cudnn(case, dtype, packed):
    x, w, b, r = (t.cuda() for t in make(case, dtype, residual=True))
    w = pack_weight(w) if packed else w.contiguous()
    oh, ow = out_hw(case)
    out = torch.full((case.n, case.k + 16, oh, ow), float("nan"), dtype=dtype, device="cuda")
    out = out.contiguous(memory_format=torch.channels_last)
    ops.depthwise_conv2d(x, w, b, case.stride, case.padding, case.dilation[0],
                         activation="silu", residual=r, out=out, out_channel_offset=8)
    torch.cuda.synchronize()
    assert out[:, :8].isnan().all() and out[:, 8 + case.k:].isnan().all()
    ref64 = torch_conv(case, x.cpu(), w.cpu(), b.cpu(), r.cpu(), "silu", torch.float64)
    cudnn = torch_conv(case, x, w, b, r, "silu", dtype).cpu()
    assert_within_torch_error(out[:, 8:8 + case.k].cpu(), cudnn, ref64)


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_pooled_against_cudnn(case, dtype):
    """The pool's block reduction and atomics against cuDNN's output averaged in float32."""
    x, w, b, _ = (t.cuda() if t is not None else None for t in make(case, dtype))
    y, pooled = ops.depthwise_conv2d(x, pack_weight(w), b, case.stride, case.padding,
                                     case.dilation[0], activation="silu", return_pooled=True)
    ref64 = torch_conv(case, x.cpu(), w.cpu(), b.cpu(), None, "silu", torch.float64)
    cudnn = torch_conv(case, x, w, b, None, "silu", dtype).cpu()
    assert_within_torch_error(y.cpu(), cudnn, ref64)
    assert_mean_of(pooled.cpu(), y.cpu())


@pytest.mark.cuda
def test_cuda_graph_capture():
    case = CASES[0]
    x, w, b, r = (t.cuda().half() for t in make(case, torch.float32, residual=True))
    w = pack_weight(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.depthwise_conv2d(x, w, b, case.stride, case.padding, activation="relu", residual=r)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, torch_conv(case, x, w, b, r, "relu", torch.float16))
