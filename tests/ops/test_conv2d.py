"""cnnfuse.ops.conv2d against fp64 references: reference path, Triton kernel (interpreter on
the CPU, natively on a GPU), the library-conv + C++ epilogue path, the op contract."""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnfuse
from cnnfuse import ops
from cnnfuse.ops.conv2d import CUDNN_FUSED_CODES
from cnnfuse.ref import ACTIVATIONS, apply_activation

from ..util import (DTYPE_IDS, DTYPES, assert_mean_of, assert_within_torch_error,
                    needs_triton, triton_runnable)


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    k: int
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # left, right, top, bottom
    dilation: tuple = (1, 1)
    groups: int = 1

    def __str__(self):
        s = f"n{self.n}c{self.c}x{self.h}x{self.w}-k{self.k}-{self.kernel[0]}x{self.kernel[1]}"
        if self.stride != (1, 1):
            s += f"-s{self.stride[0]}{self.stride[1]}"
        if any(self.padding):
            s += "-p" + "".join(map(str, self.padding))
        if self.dilation != (1, 1):
            s += f"-d{self.dilation[0]}{self.dilation[1]}"
        if self.groups != 1:
            s += f"-g{self.groups}"
        return s


CASES = [
    Case(2, 5, 9, 11, 7, (3, 3), padding=(1, 1, 1, 1)),
    Case(1, 3, 17, 13, 19, (1, 1)),
    Case(3, 33, 6, 5, 17, (1, 1), stride=(2, 2)),
    Case(1, 6, 13, 12, 9, (5, 5), padding=(2, 2, 2, 2)),
    Case(1, 3, 23, 21, 10, (7, 7), stride=(2, 2), padding=(3, 3, 3, 3)),
    Case(1, 3, 29, 27, 8, (11, 11), stride=(4, 4), padding=(2, 2, 2, 2)),
    Case(2, 7, 10, 9, 6, (1, 7), padding=(3, 3, 0, 0)),
    Case(2, 7, 9, 10, 6, (7, 1), padding=(0, 0, 3, 3)),
    Case(1, 9, 8, 7, 11, (1, 3), padding=(1, 1, 0, 0)),
    Case(1, 9, 7, 8, 11, (3, 1), padding=(0, 0, 1, 1)),
    Case(2, 4, 11, 10, 5, (3, 3), stride=(2, 1), padding=(0, 1, 1, 0)),   # asymmetric 'same'
    Case(1, 5, 12, 12, 6, (3, 3), padding=(2, 2, 2, 2), dilation=(2, 2)),
    Case(1, 70, 5, 4, 40, (3, 3), padding=(1, 1, 1, 1)),                  # several c blocks
    Case(2, 8, 7, 9, 12, (3, 3), padding=(1, 1, 1, 1), groups=4),
    Case(2, 32, 7, 6, 32, (3, 3), padding=(1, 1, 1, 1), groups=8),           # ResNeXt: 4 per group
    Case(1, 48, 6, 7, 40, (3, 3), stride=(2, 2), padding=(1, 1, 1, 1), groups=8),  # 6 in, 5 out
    Case(1, 64, 5, 5, 96, (1, 1), groups=2),                              # groups wider than a tile
    Case(1, 12, 6, 6, 12, (3, 3), padding=(1, 1, 1, 1), groups=12),       # depthwise through Triton
]
CASE_IDS = [str(c) for c in CASES]


def make(case: Case, dtype, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=g).to(dtype)
    w = (torch.randn(case.k, case.c // case.groups, *case.kernel, generator=g)
         / math.sqrt(case.c // case.groups * case.kernel[0] * case.kernel[1])).to(dtype)
    b = torch.randn(case.k, generator=g).to(dtype)
    r = None
    if residual:
        oh, ow = out_hw(case)
        r = torch.randn(case.n, case.k, oh, ow, generator=g).to(dtype)
    return (x.contiguous(memory_format=torch.channels_last),
            w.contiguous(memory_format=torch.channels_last), b, r)


def out_hw(case: Case):
    left, right, top, bottom = case.padding
    oh = (case.h + top + bottom - case.dilation[0] * (case.kernel[0] - 1) - 1) // case.stride[0] + 1
    ow = (case.w + left + right - case.dilation[1] * (case.kernel[1] - 1) - 1) // case.stride[1] + 1
    return oh, ow


def torch_conv(case: Case, x, w, b, r, activation, dtype):
    """The same computation as PyTorch runs it: in `dtype` (float64 for the reference),
    rounding after every step."""
    xx = F.pad(x.to(dtype), case.padding)
    y = F.conv2d(xx, w.to(dtype), b.to(dtype), case.stride, 0, case.dilation, case.groups)
    if r is not None:
        y = y + r.to(dtype)
    return apply_activation(y, activation)


def run(case: Case, x, w, b, r, activation, **kw):
    return ops.conv2d(x, w, b, case.stride, case.padding, case.dilation, case.groups,
                      activation=activation, residual=r, **kw)


def check(case, dtype, activation, residual, device="cpu"):
    x, w, b, r = make(case, dtype, residual)
    x, w, b = x.to(device), w.to(device), b.to(device)
    r = r.to(device) if r is not None else None
    ours = run(case, x, w, b, r, activation)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    ref64 = torch_conv(case, x.cpu(), w.cpu(), b.cpu(), r.cpu() if r is not None else None,
                       activation, torch.float64)
    same = torch_conv(case, x, w, b, r, activation, dtype)
    assert_within_torch_error(ours.cpu(), same.cpu(), ref64)


# ------------------------------------------------------------------ reference (CPU path)

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference(case, dtype, backend):
    backend("reference")
    check(case, dtype, "relu", residual=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_activations(activation, backend):
    backend("reference")
    check(CASES[0], torch.float32, activation, residual=False)


# ------------------------------------------------------------------ Triton kernel

@needs_triton
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton(case, dtype, backend):
    backend("triton")
    check(case, dtype, "relu", residual=True)


@needs_triton
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_epilogue(activation, residual, backend):
    backend("triton")
    check(CASES[0], torch.float16, activation, residual)


@needs_triton
def test_triton_no_bias_nchw_input(backend):
    backend("triton")
    case = CASES[0]
    x, w, _, _ = make(case, torch.float32)
    x = x.contiguous()  # NCHW
    ours = run(case, x, w, None, None, "none")
    ref64 = F.conv2d(x.double(), w.double(), None, 1, 1)
    assert_within_torch_error(ours, F.conv2d(x, w, None, 1, 1), ref64)


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
def test_out_slice(mode, backend):
    """The result lands in its channel slice; every other channel keeps its poison."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    case = CASES[0]
    x, w, b, r = make(case, torch.float32, residual=True)
    oh, ow = out_hw(case)
    out = torch.full((case.n, 3 + case.k + 4, oh, ow), float("nan")).to(
        memory_format=torch.channels_last)
    got = run(case, x, w, b, r, "silu", out=out, out_channel_offset=3)
    assert got is out
    assert out[:, :3].isnan().all() and out[:, 3 + case.k:].isnan().all()
    expected = torch_conv(case, x, w, b, r, "silu", torch.float64)
    assert_within_torch_error(out[:, 3:3 + case.k], torch_conv(case, x, w, b, r, "silu",
                                                                 torch.float32), expected)


def test_library_conv_path(backend):
    """PyTorch's conv + cnnfuse's C++ epilogue: the path grouped convs take on a GPU."""
    backend("cuda")
    for case in (CASES[0], CASES[-1], CASES[10]):
        check(case, torch.float32, "hardswish", residual=True)


@needs_triton
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 2), c=st.integers(1, 40), k=st.integers(1, 40), h=st.integers(1, 12),
       w=st.integers(1, 12), kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3),
       sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 3)] * 4), activation=st.sampled_from(ACTIVATIONS),
       residual=st.booleans(), dtype=st.sampled_from(DTYPES), groups=st.sampled_from([1, 1, 2, 3]))
def test_triton_random_configurations(n, c, k, h, w, kh, kw, sh, sw, dh, dw, pads, activation,
                                      residual, dtype, groups):
    import os
    os.environ["CNNFUSE_BACKEND"] = "triton"
    try:
        case = Case(n, c * groups, h + dh * (kh - 1), w + dw * (kw - 1), k * groups, (kh, kw),
                    (sh, sw), pads, (dh, dw), groups)
        check(case, dtype, activation, residual)
    finally:
        del os.environ["CNNFUSE_BACKEND"]


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", [CASES[2], CASES[-4], CASES[-1]],
                         ids=[str(CASES[2]), str(CASES[-4]), str(CASES[-1])])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_input_scale(mode, case, dtype, backend):
    """A squeeze-excitation gate applied as x loads: conv(x · s) with x · s rounded to dtype."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    scale_check(case, dtype, "cpu")


def scale_check(case, dtype, device, activation="relu", pooled=False):
    """With `pooled`, also the return_pooled call: its y is the same, its means are y's."""
    x, w, b, r = (t.to(device) for t in make(case, dtype, residual=True))
    scale = torch.rand(case.n, case.c, device=device).to(dtype)
    ours = run(case, x, w, b, r, activation, input_scale=scale)
    if pooled:
        y, means = run(case, x, w, b, r, activation, input_scale=scale, return_pooled=True)
        assert_mean_of(means.cpu(), y.cpu())
        assert torch.equal(y, ours)
    xs = (x.float() * scale.float()[:, :, None, None]).to(dtype)
    ref64 = torch_conv(case, xs.cpu(), w.cpu(), b.cpu(), r.cpu(), activation, torch.float64)
    assert_within_torch_error(ours.cpu(),
                              torch_conv(case, xs, w, b, r, activation, dtype).cpu(), ref64)


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[10], CASES[-1]],
                         ids=[str(c) for c in (CASES[0], CASES[2], CASES[10], CASES[-1])])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("input_activation", ["relu", "none", "silu"])
def test_input_affine(mode, case, dtype, input_activation, backend):
    """A pre-activation BatchNorm + activation applied as x loads; padded taps stay zero
    (the shift would make them nonzero if the prologue ran on the padding)."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    affine_check(case, dtype, input_activation, "cpu")


def affine_check(case, dtype, input_activation, device):
    x, w, b, r = (t.to(device) for t in make(case, dtype, residual=True))
    g = torch.Generator().manual_seed(3)
    affine = torch.stack([torch.rand(case.c, generator=g) + 0.5,
                          torch.rand(case.c, generator=g) + 0.25]).to(device)
    ours = run(case, x, w, b, r, "relu", input_affine=affine, input_activation=input_activation)

    def pre(t, dt):  # BatchNorm then activation, rounded as eager rounds them
        y = (t.to(dt) * affine[0].to(dt).view(1, -1, 1, 1) + affine[1].to(dt).view(1, -1, 1, 1))
        return apply_activation(y, input_activation).to(t.dtype if dt != torch.float64 else dt)
    ref64 = torch_conv(case, pre(x.cpu(), torch.float64), w.cpu(), b.cpu(), r.cpu(), "relu",
                       torch.float64)
    same = torch_conv(case, pre(x, torch.float32), w, b, r, "relu", dtype)
    assert_within_torch_error(ours.cpu(), same.cpu(), ref64)


# Pooled cases: a tile spanning several images (3x3 maps), a strided conv, a grouped one, and
# a depthwise one (the C++ kernel under "cuda").
POOL_CASES = [Case(4, 16, 3, 3, 20, (1, 1)), CASES[2], CASES[10], CASES[14], CASES[-1]]


@pytest.mark.parametrize("mode", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[str(c) for c in POOL_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pooled(mode, case, dtype, backend):
    """return_pooled: y as without it, and its mean over height and width, summed in the
    epilogue (atomically per image in a row tile on Triton, per block on the C++ kernel)."""
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    scale_check(case, dtype, "cpu", "silu", pooled=True)


def test_pooled_with_out_is_refused():
    x, w, _, _ = make(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="return_pooled does not combine with out="):
        ops.conv2d(x, w, padding=1, out=torch.empty(2, 7, 9, 11), return_pooled=True)


# ------------------------------------------------------------------ op contract

def test_opcheck():
    case = CASES[10]
    x, w, b, r = make(case, torch.float32, residual=True)
    scale = torch.rand(case.n, case.c)
    affine = torch.rand(2, case.c)
    args = (x, w, b, list(case.stride), list(case.padding), list(case.dilation), 1, "relu", r,
            scale, affine, "relu")
    torch.library.opcheck(torch.ops.cnnfuse.conv2d.default, args)
    oh, ow = out_hw(case)
    out = torch.zeros(case.n, case.k + 2, oh, ow).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.cnnfuse.conv2d_into.default, args + (out, 1))
    torch.library.opcheck(torch.ops.cnnfuse.conv2d_pooled.default, args)


def test_torch_compile_fullgraph():
    case = CASES[0]
    x, w, b, r = make(case, torch.float32, residual=True)

    def block(x, w, b, r):
        return run(case, x, w, b, r, "relu") * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, r), block(x, w, b, r))


def test_padding_forms():
    x, w, _, _ = make(CASES[0], torch.float32)
    same = ops.conv2d(x, w, padding="same")
    torch.testing.assert_close(same, ops.conv2d(x, w, padding=1))
    torch.testing.assert_close(ops.conv2d(x, w, padding=(1, 1)), same)
    torch.testing.assert_close(ops.conv2d(x, w, padding=(1, 1, 1, 1)), same)
    assert ops.conv2d(x, w, padding="valid").shape[2:] == (7, 9)


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.randn(5, 9, 11)), ValueError, "x must be 4-D"),
    (dict(weight=torch.randn(7, 4, 3, 3)), ValueError, "x has 5 channels"),
    (dict(weight=torch.randn(7, 5, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(x=torch.randn(2, 5, 9, 11, dtype=torch.float64),
          weight=torch.randn(7, 5, 3, 3, dtype=torch.float64)), TypeError, "x has dtype"),
    (dict(bias=torch.randn(6)), ValueError, "bias has 6 elements"),
    (dict(residual=torch.randn(2, 7, 8, 11)), ValueError, "residual has shape"),
    (dict(residual=torch.randn(2, 7, 9, 11).half()), TypeError, "residual has dtype"),
    (dict(activation="swish"), ValueError, "activation='swish'"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=(1, 1, 1)), ValueError, "padding"),
    (dict(groups=2), ValueError, "groups=2"),
    (dict(out=torch.empty(2, 9, 9, 11, dtype=torch.float16)), TypeError, "out has dtype"),
    (dict(out=torch.empty(2, 9, 8, 11)), ValueError, "out has shape"),
    (dict(out=torch.empty(2, 9, 9, 11), out_channel_offset=3), ValueError, "out_channel_offset"),
    (dict(weight=torch.randn(7, 5, 3, 3, device="meta")), ValueError, "weight is on meta"),
    (dict(x=torch.randn(2, 5, 2, 2), padding=0), ValueError, "too small"),
    (dict(input_scale=torch.rand(2, 4)), ValueError, "input_scale has shape"),
    (dict(input_scale=torch.rand(2, 5).half()), TypeError, "input_scale has dtype"),
    (dict(input_affine=torch.rand(5, 2)), ValueError, "input_affine has shape"),
    (dict(input_affine=torch.rand(2, 5).half()), TypeError, "input_affine has dtype"),
    (dict(input_activation="relu"), ValueError, "input_activation needs input_affine"),
    (dict(input_affine=torch.rand(2, 5), input_activation="swish"), ValueError,
     "input_activation: activation='swish'"),
])
def test_bad_input(bad, error, match):
    kw = dict(x=torch.randn(2, 5, 9, 11), weight=torch.randn(7, 5, 3, 3), bias=None,
              padding=1, residual=None, activation="none")
    kw.update(bad)
    with pytest.raises(error, match=match):
        ops.conv2d(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), **kw)


def test_version_and_public_api():
    assert cnnfuse.__version__
    assert callable(cnnfuse.ops.conv2d) and callable(cnnfuse.fuse) and callable(cnnfuse.explain)


# ------------------------------------------------------------------ GPU: against cuDNN

@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["auto", "triton", "cuda"])
def test_cuda_against_cudnn(case, dtype, mode, backend):
    backend(mode)
    x, w, b, r = (t.cuda() for t in make(case, dtype, residual=True))
    oh, ow = out_hw(case)
    out = torch.full((case.n, case.k + 5, oh, ow), float("nan"), dtype=dtype, device="cuda")
    out = out.contiguous(memory_format=torch.channels_last)
    run(case, x, w, b, r, "relu", out=out, out_channel_offset=2)
    torch.cuda.synchronize()
    assert out[:, :2].isnan().all() and out[:, 2 + case.k:].isnan().all()
    ref64 = torch_conv(case, x.cpu(), w.cpu(), b.cpu(), r.cpu(), "relu", torch.float64)
    cudnn = torch_conv(case, x, w, b, r, "relu", dtype).cpu()
    assert_within_torch_error(out[:, 2:2 + case.k].cpu(), cudnn, ref64)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("case", [CASES[2], CASES[-4], CASES[-1]],
                         ids=[str(CASES[2]), str(CASES[-4]), str(CASES[-1])])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_input_scale(mode, case, dtype, backend):
    backend(mode)
    scale_check(case, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("case", [CASES[0], CASES[10], CASES[-1]],
                         ids=[str(c) for c in (CASES[0], CASES[10], CASES[-1])])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_input_affine(mode, case, dtype, backend):
    backend(mode)
    affine_check(case, dtype, "relu", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("case", POOL_CASES + [Case(8, 64, 14, 14, 96, (1, 1))],
                         ids=[str(c) for c in POOL_CASES] + ["n8c64x14x14-k96-1x1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_pooled(mode, case, dtype, backend):
    backend(mode)
    scale_check(case, dtype, "cuda", "silu", pooled=True)


@pytest.mark.cuda
def test_cuda_graph_capture():
    case = CASES[0]
    x, w, b, r = (t.cuda().half() for t in make(case, torch.float32, residual=True))
    run(case, x, w, b, r, "relu")  # tunes and compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run(case, x, w, b, r, "relu")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, torch_conv(case, x, w, b, r, "relu", torch.float16))


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS[:max(CUDNN_FUSED_CODES) + 1])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[10], CASES[-1]],
                         ids=[str(c) for c in (CASES[0], CASES[2], CASES[10], CASES[-1])])
def test_cudnn_fused_backend(case, activation):
    """The cuDNN runtime-fusion graph on its own; shapes cuDNN has no engine for are skipped
    (the autotuner then never offers it)."""
    from cnnfuse._ext import has_cudnn_frontend
    from cnnfuse.ref import activation_code
    if not has_cudnn_frontend():
        pytest.skip("cnnfuse._C built without the cuDNN frontend")
    x, w, b, r = (t.cuda() for t in make(case, torch.float16, residual=True))
    try:
        y = torch.ops.cnnfuse.conv2d_cudnn(x, w, b, list(case.stride), list(case.padding),
                                           list(case.dilation), case.groups,
                                           activation_code(activation), r)
    except RuntimeError as exc:
        if "cudnn_fused: no engine" in str(exc):
            pytest.skip(str(exc)[:120])
        raise
    ref64 = torch_conv(case, x.cpu(), w.cpu(), b.cpu(), r.cpu(), activation, torch.float64)
    cudnn = torch_conv(case, x, w, b, r, activation, torch.float16).cpu()
    assert_within_torch_error(y.cpu(), cudnn, ref64)


def test_cudnn_fused_is_not_offered_an_activation_its_graph_lacks():
    """The parametrised activations have no cuDNN graph: conv2d's choice leaves it out for
    them (the op itself refuses them on a GPU with a clear error)."""
    from cnnfuse.ref import activation_code
    assert activation_code("gelu_tanh") in CUDNN_FUSED_CODES
    for name in ("leaky_relu(0.2)", "elu", "celu", "selu", "mish", "tanh", "hardtanh",
                 "softplus"):
        assert activation_code(name) not in CUDNN_FUSED_CODES
