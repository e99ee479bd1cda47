"""cnnfuse.ops.se_gate: both FC layers of a squeeze-and-excitation block in one kernel,
against fp64 (Triton interpreted on the CPU, natively on a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from cnnfuse import ops
from cnnfuse.ref import ACTIVATIONS, apply_activation

from ..util import DTYPE_IDS, DTYPES, assert_within_torch_error, triton_runnable

# (N, C, R): EfficientNet's 4x reduction at odd sizes, SE-ResNet's 16x, more images than a block
SHAPES = [(2, 24, 6), (3, 40, 10), (1, 96, 4), (17, 33, 9), (2, 300, 75)]


def make(n, c, r, dtype, device="cpu"):
    g = torch.Generator().manual_seed(n * 1000 + c)
    pooled = torch.randn(n, c, generator=g)
    w1 = (torch.randn(r, c, generator=g) / c ** 0.5).to(dtype)
    b1 = torch.randn(r, generator=g).to(dtype)
    w2 = (torch.randn(c, r, generator=g) / r ** 0.5).to(dtype)
    b2 = torch.randn(c, generator=g).to(dtype)
    return [t.to(device) for t in (pooled, w1, b1, w2, b2)]


def torch_gate(pooled, w1, b1, w2, b2, act, gate_act, dtype):
    """The block as PyTorch runs it: two 1x1 convs on the pooled map, rounding in `dtype`."""
    p = pooled.to(dtype)[:, :, None, None]
    h = apply_activation(F.conv2d(p, w1.to(dtype)[:, :, None, None], b1.to(dtype)), act)
    g = apply_activation(F.conv2d(h, w2.to(dtype)[:, :, None, None], b2.to(dtype)), gate_act)
    return g[:, :, 0, 0]


def check(shape, dtype, act="silu", gate_act="sigmoid", device="cpu"):
    args = make(*shape, dtype, device)
    ours = ops.se_gate(*args, activation=act, gate_activation=gate_act)
    assert ours.dtype == dtype and ours.shape == shape[:2]
    cpu = [t.cpu() for t in args]
    assert_within_torch_error(ours.cpu(), torch_gate(*args, act, gate_act, dtype).cpu(),
                              torch_gate(*cpu, act, gate_act, torch.float64))


@pytest.mark.parametrize("mode", ["reference", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}c{}r{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_against_fp64(mode, shape, dtype, backend):
    if mode == "triton" and not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend(mode)
    check(shape, dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activations(act, backend):
    if not triton_runnable():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    backend("triton")
    check((3, 40, 10), torch.float32, act, "hardsigmoid")


def test_without_biases(backend):
    backend("triton" if triton_runnable() else "reference")
    pooled, w1, _, w2, _ = make(2, 24, 6, torch.float32)
    ours = ops.se_gate(pooled, w1, None, w2, None, activation="relu")
    torch.testing.assert_close(ours, torch.sigmoid(torch.relu(pooled @ w1.t()) @ w2.t()))


def test_opcheck():
    torch.library.opcheck(torch.ops.cnnfuse.se_gate.default,
                          (*make(2, 24, 6, torch.float32), "relu", "sigmoid"))


@pytest.mark.parametrize("index, bad, error, match", [
    (1, torch.randn(6, 23), ValueError, "w1 has shape"),
    (3, torch.randn(6, 24), ValueError, "w2 has shape"),
    (2, torch.randn(5), ValueError, "b1 has 5 elements"),
    (3, torch.randn(24, 6).half(), TypeError, "w2 has dtype"),
    (0, torch.randn(2, 24, 1, 1), ValueError, "pooled must be 2-D"),
])
def test_bad_input(index, bad, error, match):
    args = make(2, 24, 6, torch.float32)
    args[index] = bad
    with pytest.raises(error, match=match):
        ops.se_gate(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES + [(256, 1152, 48), (1, 2048, 128)],
                         ids=lambda s: "n{}c{}r{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda(shape, dtype):
    check(shape, dtype, device="cuda")
