"""cnnfuse.ops.bias_act: the C++ epilogue (CPU here, CUDA on a GPU) against fp64."""
import pytest
import torch

from cnnfuse import ops
from cnnfuse._ext import _C
from cnnfuse.ref import ACTIVATIONS, apply_activation

from ..util import DTYPE_IDS, DTYPES, assert_within_torch_error

SHAPES = [(2, 7, 5, 3), (1, 16, 4, 4), (3, 24, 1, 7)]  # 16/24 channels take the wide path on GPU


def make(shape, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    bias = torch.randn(shape[1], generator=g).to(device)
    res = torch.randn(shape, generator=g).to(dtype).to(device)
    return (x.contiguous(memory_format=torch.channels_last), bias,
            res.contiguous(memory_format=torch.channels_last))


def expected(x, bias, res, activation, dtype):
    y = x.to(dtype) + bias.to(dtype).view(1, -1, 1, 1) + res.to(dtype)
    return apply_activation(y, activation)


def test_extension_has_cpu_kernel():
    assert _C is not None, "cnnfuse._C did not build"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cnnfuse::bias_act", "CPU")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_against_fp64(shape, dtype, activation):
    x, bias, res = make(shape, dtype)
    ours = ops.bias_act(x, bias, res, activation=activation)
    assert_within_torch_error(ours, expected(x, bias, res, activation, dtype),
                              expected(x, bias, res, activation, torch.float64))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_into_slice_of_nchw_and_nhwc(device):
    x, bias, res = make((2, 8, 5, 3), torch.float16, device)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = torch.full((2, 13, 5, 3), float("nan"), dtype=torch.float16, device=device)
        out = out.contiguous(memory_format=layout)
        ops.bias_act(x.contiguous(), bias, res, activation="relu6", out=out, out_channel_offset=4)
        assert out[:, :4].isnan().all() and out[:, 12:].isnan().all()
        assert_within_torch_error(out[:, 4:12].cpu(), expected(x, bias, res, "relu6",
                                                               torch.float16).cpu(),
                                  expected(x, bias, res, "relu6", torch.float64).cpu())


def scaled(x, gate, bias, res, activation, dtype):
    """An SE block's tail as eager runs it: x · gate rounded to x's dtype, then the add."""
    xs = (x.to(dtype) * gate.to(dtype)[:, :, None, None]).to(x.dtype)
    return expected(xs, bias, res, activation, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gate_dtype", ["float32", "same"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_scale(shape, dtype, gate_dtype, device):
    """scale: a per-image, per-channel gate; NCHW x and a strided gate take the scalar path."""
    x, bias, res = make(shape, dtype, device)
    gate = torch.rand(shape[1], shape[0], device=device).t()  # (N, C), not contiguous
    gate = gate if gate_dtype == "float32" else gate.to(dtype)
    for xx in (x, x.contiguous()):
        out = torch.full_like(x, float("nan"))
        ops.bias_act(xx, bias, res, activation="relu", scale=gate, out=out)
        assert_within_torch_error(out.cpu(), scaled(x, gate, bias, res, "relu", dtype).cpu(),
                                  scaled(x, gate, bias, res, "relu", torch.float64).cpu())


def test_opcheck():
    x, bias, res = make((2, 7, 5, 3), torch.float32)
    out = torch.empty(2, 9, 5, 3).narrow(1, 1, 7)
    torch.library.opcheck(torch.ops.cnnfuse.bias_act.default, (x, bias, res, 3, out))
    torch.library.opcheck(torch.ops.cnnfuse.bias_act.default,
                          (x, bias, res, 3, out, torch.rand(2, 7)))


def test_bad_input():
    x, bias, res = make((2, 7, 5, 3), torch.float32)
    with pytest.raises(ValueError, match="bias has 3 elements"):
        ops.bias_act(x, torch.zeros(3))
    with pytest.raises(TypeError, match="residual has dtype"):
        ops.bias_act(x, bias, res.half())
    with pytest.raises(ValueError, match="unknown activation code"):
        torch.ops.cnnfuse.bias_act(x, bias, res, 42, torch.empty_like(x))
    with pytest.raises(ValueError, match="scale has shape"):
        ops.bias_act(x, scale=torch.rand(7, 2))
    with pytest.raises(TypeError, match="scale has dtype"):
        ops.bias_act(x, scale=torch.rand(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale must be"):
        torch.ops.cnnfuse.bias_act(x, None, None, 0, torch.empty_like(x), torch.rand(2, 6))
    with pytest.raises(TypeError, match="scale must be float32"):
        torch.ops.cnnfuse.bias_act(x, None, None, 0, torch.empty_like(x),
                                   torch.rand(2, 7).half())


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda(shape, dtype, activation):
    x, bias, res = make(shape, dtype, "cuda")
    out = torch.full_like(x, float("nan"))
    ops.bias_act(x, bias, res, activation=activation, out=out)
    assert_within_torch_error(out.cpu(), expected(x, bias, res, activation, dtype).cpu(),
                              expected(x, bias, res, activation, torch.float64).cpu())
