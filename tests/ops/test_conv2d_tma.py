"""The Triton conv kernel with its weight read through a tensor-memory-accelerator descriptor
(Conv2dConfig.tma, kernels/conv2d_args.py), under the interpreter: every variant that can take
the descriptor (dense, grouped inside one group, strides, dilation, padding, the stem, the
prologues, the load-stage windows, residual, channel slices, split-K) against fp64 references
into NaN-poisoned outputs, with odd channel counts whose tails are the descriptor's zero fill;
the pointer path where the geometry or the Triton build does not allow a descriptor; and the
config rules that pick it."""
import pytest
import torch
import torch.nn.functional as F

from cnnfuse.kernels import conv2d as K
from cnnfuse.kernels import conv2d_args as A
from cnnfuse.kernels.conv2d_configs import (Conv2dConfig, Conv2dProblem, candidate_configs,
                                            default_config, weight_tma_fits)
from cnnfuse.ref import activation_code

from ..util import assert_within_torch_error, needs_triton
from .test_conv2d import Case, torch_conv
from .test_conv2d_kernel import check, check_prologue, launch


class Launches(list):
    """W_TMA of each conv launch, in order; .x: X_TMA of each."""
    x: list


@pytest.fixture
def took(monkeypatch):
    seen = Launches()
    seen.x = []
    real = K.arguments

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(out[1]["W_TMA"])
        seen.x.append(out[1]["X_TMA"])
        return out
    monkeypatch.setattr(K, "arguments", spy)
    return seen


def tma(*tile, warps=4, split=1, x=False):
    return Conv2dConfig(*tile, warps, 1, split_k=split, tma=True, x_tma=x)


CASES = [  # (case, tile); K and C not multiples of the tile: K's tail and each tap's
    # channel tail are the descriptor's zero fill
    (Case(2, 24, 6, 5, 40, (3, 3), padding=(1, 1, 1, 1)), (32, 32, 16)),
    (Case(1, 40, 7, 6, 24, (3, 3), stride=(2, 2), padding=(1, 0, 1, 0)), (32, 16, 32)),
    (Case(2, 16, 9, 8, 16, (3, 2), padding=(2, 1, 0, 2), dilation=(2, 3)), (16, 16, 16)),
    (Case(1, 56, 5, 7, 33, (1, 1)), (32, 32, 32)),
    (Case(1, 8, 6, 6, 12, (1, 5), stride=(1, 2), padding=(2, 2, 0, 0)), (16, 16, 16)),
    (Case(2, 64, 5, 5, 32, (3, 3), padding=(1, 1, 1, 1), groups=2), (16, 16, 16)),  # KG 16
    (Case(1, 32, 6, 5, 64, (3, 3), stride=(2, 1), padding=(1, 1, 1, 1), groups=4),
     (16, 16, 16)),  # CG 8, KG 16: each 16-wide tile inside one group
]
IDS = ["3x3-odd-k", "3x3-s2-c40", "3x2-dilated", "1x1-c56", "1x5-s1x2", "grouped-kg16",
       "grouped-cg8-s2x1"]


@needs_triton
@pytest.mark.parametrize("case, tile", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_weight_descriptor(case, tile, dtype, took):
    check(case, dtype, tma(*tile), "relu", y_pad=(1, 2))
    assert took == [True]


@needs_triton
@pytest.mark.parametrize("split", [2, 5, 30])  # 30: more splits than the 27 steps
@pytest.mark.parametrize("case, tile", [CASES[1], CASES[5]], ids=["3x3-s2", "grouped"])
def test_weight_descriptor_with_split_k(case, tile, split, took):
    y = check(case, torch.float16, tma(*tile, split=split), x_pad=(8, 8), y_pad=(3, 5))
    same = launch(case, torch.float16, Conv2dConfig(*tile, 4, 1))[0]
    torch.testing.assert_close(y.float(), same.float(), atol=2e-2, rtol=1e-2)
    assert took == [True, False]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_stem_weight_descriptor(dtype, took):
    """The padded stem: each kernel row's (s, c) range is one box row, zero past S * 8."""
    case = Case(2, 3, 13, 12, 20, (7, 7), stride=(2, 2), padding=(3, 3, 3, 3))
    check(case, dtype, tma(32, 16, 32), "silu", y_pad=(1, 2))
    check(case, dtype, tma(32, 32, 16, split=3), "silu")
    assert took == [True, True]


@needs_triton
def test_weight_descriptor_with_prologue(took):
    """Input BatchNorm + ReLU and the SE scale as x loads, the weight by descriptor, split."""
    case = Case(2, 24, 5, 4, 20, (3, 3), padding=(1, 0, 0, 1))
    g = torch.Generator().manual_seed(7)
    scale = torch.rand(case.n, case.c, generator=g).half()
    affine = torch.stack([torch.rand(case.c, generator=g) + 0.5,
                          torch.rand(case.c, generator=g) - 0.5])
    y, x, w, b, r, _ = launch(case, torch.float16, tma(16, 16, 16, split=3),
                              prologue=(scale, affine))
    check_prologue(case, torch.float16, y, x, w, b, r, scale, affine)
    assert took == [True]


@needs_triton
def test_windows_with_weight_descriptor(took):
    """The 1x1 weight after a depthwise or pool window in the load stage, by descriptor."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 7, 6, generator=g).half().contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(9, 24, 1, 1, generator=g) / 5).half().contiguous(
        memory_format=torch.channels_last)
    dw = (torch.randn(24, 1, 3, 3, generator=g) / 3).half()
    y = torch.full((2, 9, 4, 3), float("nan")).half().contiguous(
        memory_format=torch.channels_last)
    K.separable_conv2d(x, dw, None, (2, 2), (1, 1, 1, 1), (1, 1), 0, w, None, None, y,
                       activation_code("relu"), tma(32, 16, 16, split=2))

    def dw_chain(dt):
        mid = F.conv2d(x.to(dt), dw.to(dt), None, 2, 1, 1, 24).to(
            x.dtype if dt != torch.float64 else dt)
        return F.relu(F.conv2d(mid, w.to(mid.dtype)))
    assert_within_torch_error(y, dw_chain(torch.float32).half(), dw_chain(torch.float64))
    y = torch.full((2, 9, 7, 6), float("nan")).half().contiguous(
        memory_format=torch.channels_last)
    K.pool_conv2d(x, "avg", (3, 3), (1, 1), (1, 1, 1, 1), w, None, None, y, 0,
                  tma(32, 16, 16))
    ref64 = F.conv2d(F.avg_pool2d(x.double(), 3, 1, 1), w.double())
    assert_within_torch_error(y, F.conv2d(F.avg_pool2d(x.float(), 3, 1, 1), w.float()).half(),
                              ref64)
    assert took == [True, True]


# ------------------------------------------------------------------ the activation too

X_CASES = [  # 1x1, stride 1, no padding: output pixels are x's pixels, one box per step
    (Case(2, 40, 5, 7, 24, (1, 1)), (32, 16, 16), (0, 0)),   # rows and channels past the box
    (Case(1, 24, 3, 11, 40, (1, 1)), (16, 32, 16), (8, 8)),  # an aligned channel slice of x
    (Case(3, 64, 4, 4, 16, (1, 1)), (32, 16, 32), (0, 0)),
]


@needs_triton
@pytest.mark.parametrize("case, tile, x_pad", X_CASES, ids=["c40-m70", "slice", "c64"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_activation_descriptor(case, tile, x_pad, split, dtype, took):
    check(case, dtype, tma(*tile, split=split, x=True), "gelu", x_pad=x_pad, y_pad=(2, 1),
          pooled=split == 1)
    assert took.x == [True] and took == [True]


@needs_triton
def test_activation_descriptor_only_where_x_is_a_box(took):
    """Strided, padded or 3x3 convs, odd slices, prologues: x stays on the pointer path."""
    for case, x_pad in ((Case(1, 16, 6, 6, 16, (1, 1), stride=(2, 2)), (0, 0)),
                        (Case(1, 16, 4, 4, 16, (1, 1), padding=(1, 0, 0, 1)), (0, 0)),
                        (Case(1, 16, 5, 5, 16, (3, 3), padding=(1, 1, 1, 1)), (0, 0)),
                        (Case(1, 16, 5, 5, 16, (1, 1)), (3, 5))):
        check(case, torch.float16, tma(16, 16, 16, x=True), x_pad=x_pad)
    case = Case(2, 16, 4, 4, 16, (1, 1))
    scale = torch.rand(case.n, case.c, generator=torch.Generator().manual_seed(4)).half()
    launch(case, torch.float16, tma(16, 16, 16, x=True), prologue=(scale, None))
    assert took.x == [False] * 5 and took == [True] * 5  # the weight by descriptor still


# ------------------------------------------------------------------ the pointer path

def _pointer_3x3(x, w, took):
    """A 3x3 conv (padding 1) of x by w at a TMA config, into a poisoned y: as PyTorch
    computes it, and by pointers."""
    y = torch.full((x.shape[0], w.shape[0], *x.shape[2:]), float("nan")).half().contiguous(
        memory_format=torch.channels_last)
    K.conv2d(x, w, None, None, y, (1, 1), (1, 1, 1, 1), (1, 1), 0, tma(16, 16, 16), False)
    ref64 = F.conv2d(x.double(), w.double(), None, 1, 1)
    assert_within_torch_error(y, F.conv2d(x.float(), w.float(), None, 1, 1).half(), ref64)
    assert took[-1] is False


@needs_triton
def test_wide_grouped_tiles_and_unaligned_weights_take_the_pointer_path(took):
    # a 32-wide tile over groups of 8 output channels: a block diagonal, not a box
    case = Case(1, 16, 5, 5, 32, (3, 3), padding=(1, 1, 1, 1), groups=4)
    check(case, torch.float16, tma(16, 32, 16))
    # 12 channels: the weight's k stride (108 elements, 216 bytes) is not 16-byte aligned
    check(Case(1, 12, 5, 5, 16, (3, 3), padding=(1, 1, 1, 1)), torch.float16, tma(16, 16, 16))
    assert took == [False, False]
    # a weight whose data starts 2 bytes into its storage
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 5, 5, generator=g).half().contiguous(
        memory_format=torch.channels_last)
    store = torch.randn(1 + 16 * 16 * 9, generator=g).half()
    w = store[1:].view(16, 3, 3, 16).permute(0, 3, 1, 2)
    assert w.data_ptr() % 16 and w.stride(1) == 1
    _pointer_3x3(x, w, took)


@needs_triton
def test_empty_batches_and_expanded_operands_take_the_pointer_path(took):
    """A descriptor needs a box and real strides: an empty batch and expanded (stride-0)
    operands stay on pointers and still compute what PyTorch does."""
    w = torch.randn(16, 16, 1, 1).half().contiguous(memory_format=torch.channels_last)
    x = torch.randn(0, 16, 4, 4).half().contiguous(memory_format=torch.channels_last)
    y = torch.empty(0, 16, 4, 4).half().contiguous(memory_format=torch.channels_last)
    K.conv2d(x, w, None, None, y, (1, 1), (0, 0, 0, 0), (1, 1), 0, tma(16, 16, 16, x=True),
             False)
    assert took.x == [False]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 1, 1, generator=g).half().expand(2, 16, 5, 5)
    w = torch.randn(1, 16, 3, 3, generator=g).half().expand(16, 16, 3, 3)
    _pointer_3x3(x, w, took)


@needs_triton
@pytest.mark.parametrize("how", ["no-descriptors", "CNNFUSE_TMA=0"])
def test_fallback_without_descriptors(how, monkeypatch, took):
    """A Triton without tensor descriptors (or TMA switched off): the same configs run on the
    pointer path, as correct as before."""
    if how == "no-descriptors":
        monkeypatch.setattr(A, "descriptors_supported", lambda: False)
    else:
        monkeypatch.setenv("CNNFUSE_TMA", "0")
    for case, tile in (CASES[0], CASES[5], CASES[3]):
        check(case, torch.float16, tma(*tile, split=2, x=True), y_pad=(1, 1))
    assert not A.tma_allowed(torch.device("cpu"))
    assert took == [False] * 3 and took.x == [False] * 3


def test_descriptor_support_is_detected():
    assert A.descriptors_supported() is True  # triton >= 3.3 here
    assert A.tma_allowed(torch.device("cpu"))


# ------------------------------------------------------------------ config rules

def _resnet(c, h, k, r, s=1, groups=1, **kw):
    return Conv2dProblem.of_conv((128, c, h, h), (k, c // groups, r, r), (s, s), (r // 2,) * 4,
                                 (1, 1), groups, **kw)


def test_default_pick_asks_for_tma_where_the_weight_fits():
    for p in (_resnet(64, 56, 64, 3), _resnet(1024, 14, 256, 1), _resnet(3, 224, 64, 7, 2),
              _resnet(512, 7, 512, 3)):
        cfg = default_config(p, dtype=torch.float16)
        assert cfg.tma and weight_tma_fits(p, cfg, 2), (p, cfg)
        cands = candidate_configs(p, dtype=torch.float16)
        assert cfg in cands
        names = [c.name for c in cands]
        assert len(names) == len(set(names))
        # the autotuner times both paths
        assert any(c.tma for c in cands) and any(not c.tma for c in cands)
    # 12 channels: no aligned weight stride, no TMA anywhere
    p = _resnet(12, 28, 16, 3)
    assert not any(c.tma for c in candidate_configs(p, dtype=torch.float16))
    assert not default_config(p, dtype=torch.float16).tma
    # an unaligned weight
    p = _resnet(64, 56, 64, 3, w_aligned=False)
    assert not default_config(p, dtype=torch.float16).tma
    # 1x1 stride 1: the activation too; strided 1x1 and 3x3: the weight only
    assert default_config(_resnet(256, 56, 64, 1), dtype=torch.float16).x_tma
    assert not default_config(_resnet(256, 56, 512, 1, 2), dtype=torch.float16).x_tma
    assert not default_config(_resnet(64, 56, 64, 3), dtype=torch.float16).x_tma
    # x's activation descriptor with an unaligned weight: x alone
    cfg = default_config(_resnet(256, 56, 64, 1, w_aligned=False), dtype=torch.float16)
    assert cfg.tma and cfg.x_tma


def test_grouped_tma_only_inside_one_group():
    narrow = _resnet(128, 56, 128, 3, groups=32)  # 4 channels a group: 8-byte strides
    assert not any(c.tma for c in candidate_configs(narrow, dtype=torch.float16))
    wide = _resnet(1024, 14, 1024, 3, groups=32)  # 32 a group
    cands = candidate_configs(wide, dtype=torch.float16)
    assert all((wide.k // wide.groups) % c.block_n == 0 for c in cands if c.tma)
    assert any(c.tma for c in cands)
    assert not any(c.tma and c.block_n > 32 for c in cands)


# ------------------------------------------------------------------ GPU

GPU_CASES = [
    (Case(4, 64, 14, 13, 96, (3, 3), padding=(1, 1, 1, 1)), Conv2dConfig(128, 64, 64, 4, 3)),
    (Case(4, 40, 9, 9, 72, (1, 1)), Conv2dConfig(64, 64, 32, 4, 4)),
    (Case(2, 256, 7, 7, 256, (3, 3), padding=(1, 1, 1, 1), groups=8),
     Conv2dConfig(128, 32, 32, 4, 3)),
    (Case(2, 3, 31, 30, 64, (7, 7), stride=(2, 2), padding=(3, 3, 3, 3)),
     Conv2dConfig(128, 64, 32, 4, 3)),
    (Case(2, 128, 9, 9, 64, (3, 3), padding=(1, 1, 1, 1)), Conv2dConfig(64, 64, 64, 4, 3,
                                                                        split_k=3)),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case, cfg", GPU_CASES, ids=["3x3", "1x1", "grouped", "stem", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_cuda_descriptors_against_the_pointer_path(case, cfg, dtype, took):
    """On the GPU (sm_90: the tensor memory accelerator): the TMA config and its pointer twin
    agree with the fp64 reference, into poisoned channel slices."""
    from dataclasses import replace

    from .test_conv2d import make, out_hw
    x, w, b, r = (t.cuda() for t in make(case, dtype, residual=True))
    oh, ow = out_hw(case)
    ref64 = torch_conv(case, x.cpu(), w.cpu(), b.cpu(), r.cpu(), "relu", torch.float64)
    same = torch_conv(case, x, w, b, r, "relu", dtype).cpu()
    for config in (replace(cfg, tma=True, x_tma=True), cfg):
        out = torch.full((case.n, case.k + 3, oh, ow), float("nan"), dtype=dtype, device="cuda")
        out = out.contiguous(memory_format=torch.channels_last)
        y = out[:, 1:1 + case.k]
        K.conv2d(x, w, b, r, y, case.stride, case.padding, case.dilation,
                 activation_code("relu"), config, False)
        torch.cuda.synchronize()
        assert out[:, :1].isnan().all() and out[:, 1 + case.k:].isnan().all()
        assert_within_torch_error(y.cpu(), same, ref64)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert took == [hopper, False]
    assert took.x == [hopper and case.kernel == (1, 1), False]
