"""The Triton conv kernel launched directly (kernels/conv2d.py) at explicit tile configs, against
fp64 references into poisoned outputs: split-K with splits that do not divide the reduction
steps, the padded few-channel stem, channel-slice inputs and outputs, 16-byte-vector strides,
the load-stage windows and prologues with split-K, random configurations; and the config rules
(candidate_configs, default_config) on their own."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnfuse.kernels import conv2d as K
from cnnfuse.kernels.conv2d_configs import SM_COUNT, Conv2dConfig, Conv2dProblem
from cnnfuse.ref import activation_code

from ..util import assert_mean_of, assert_within_torch_error, needs_triton
from .test_conv2d import Case, make, out_hw, torch_conv

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def launch(case: Case, dtype, config, activation="relu", residual=True, x_pad=(0, 0),
           y_pad=(0, 0), pooled=False, prologue=None, seed=0):
    """The kernel into a NaN-poisoned buffer's channel slice [y_pad[0], +K) and, with x_pad,
    from a channel slice of a wider input; checks the poison, returns (y, x, w, b, r, pool)."""
    x, w, b, r = make(case, dtype, residual, seed)
    if any(x_pad):
        wide = torch.full((case.n, x_pad[0] + case.c + x_pad[1], case.h, case.w), float("nan"),
                          dtype=dtype).contiguous(memory_format=torch.channels_last)
        wide[:, x_pad[0]:x_pad[0] + case.c] = x
        x = wide[:, x_pad[0]:x_pad[0] + case.c]
    oh, ow = out_hw(case)
    out = torch.full((case.n, y_pad[0] + case.k + y_pad[1], oh, ow), float("nan"), dtype=dtype)
    out = out.contiguous(memory_format=torch.channels_last)
    y = out[:, y_pad[0]:y_pad[0] + case.k]
    pool = torch.full((case.n, case.k), float("nan")) if pooled else None
    scale, affine = prologue or (None, None)
    K.conv2d(x, w, b, r, y, case.stride, case.padding, case.dilation,
             activation_code(activation), config, False, scale, affine,
             activation_code("relu") if affine is not None else 0, pool)
    assert out[:, :y_pad[0]].isnan().all() and out[:, y_pad[0] + case.k:].isnan().all()
    return y, x, w, b, r, pool


def check(case, dtype, config, activation="relu", residual=True, **kw):
    y, x, w, b, r, pool = launch(case, dtype, config, activation, residual, **kw)
    ref64 = torch_conv(case, x, w, b, r, activation, torch.float64)
    assert_within_torch_error(y, torch_conv(case, x, w, b, r, activation, dtype), ref64)
    if pool is not None:
        assert_mean_of(pool, y)
    return y


# ------------------------------------------------------------------ split-K

SPLIT_CASES = [  # (case, config): reduction steps in the comment
    (Case(1, 40, 5, 6, 24, (3, 3), padding=(1, 1, 1, 1)), (32, 32, 16)),      # 9 taps x 3 = 27
    (Case(2, 24, 4, 5, 20, (1, 1)), (32, 32, 16)),                            # 2
    (Case(1, 3, 11, 10, 16, (7, 7), stride=(2, 2), padding=(3, 3, 3, 3)), (32, 16, 16)),  # stem: 28
    (Case(2, 32, 5, 6, 32, (3, 3), padding=(1, 1, 1, 1), groups=8), (32, 16, 16)),  # grouped: 9
]
SPLIT_IDS = ["3x3-27steps", "1x1-2steps", "stem-28steps", "grouped-9steps"]


@needs_triton
@pytest.mark.parametrize("case, tile", SPLIT_CASES, ids=SPLIT_IDS)
@pytest.mark.parametrize("split", [2, 5, 30])  # 30: more splits than steps, some empty
def test_split_k(case, tile, split):
    cfg = Conv2dConfig(*tile, 4, 1, split_k=split)
    y = check(case, torch.float16, cfg, y_pad=(3, 2), pooled=split == 5)
    same = launch(case, torch.float16, Conv2dConfig(*tile, 4, 1))[0]
    # the fixed-order sum differs from one pass only by fp32 rounding of the partial sums
    torch.testing.assert_close(y.float(), same.float(), atol=2e-2, rtol=1e-2)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_split_k_with_prologue(dtype):
    """Input affine + activation and the SE scale in the load stage, split 3 ways."""
    case = Case(2, 20, 5, 4, 12, (3, 3), padding=(1, 0, 0, 1))
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(case.n, case.c, generator=g).to(dtype)
    affine = torch.stack([torch.rand(case.c, generator=g) + 0.5,
                          torch.rand(case.c, generator=g) - 0.5])
    y, x, w, b, r, _ = launch(case, dtype, Conv2dConfig(16, 16, 16, 4, 1, split_k=3),
                              prologue=(scale, affine))

    check_prologue(case, dtype, y, x, w, b, r, scale, affine)


def check_prologue(case, dtype, y, x, w, b, r, scale, affine):
    """y against PyTorch's conv of x after the prologue: BatchNorm (affine rows) + ReLU, then
    the scale, each rounded to x's dtype; the fp64 reference without rounding."""
    def pre(t, dt):
        v = F.relu(t.to(dt) * affine[0].to(dt).view(1, -1, 1, 1)
                   + affine[1].to(dt).view(1, -1, 1, 1))
        v = v.to(t.dtype) if dt != torch.float64 else v
        v = v * scale.to(v.dtype)[:, :, None, None]
        return v.to(t.dtype) if dt != torch.float64 else v
    ref64 = torch_conv(case, pre(x, torch.float64), w, b, r, "relu", torch.float64)
    same = torch_conv(case, pre(x, torch.float32), w, b, r, "relu", dtype)
    assert_within_torch_error(y, same, ref64)


@needs_triton
@pytest.mark.parametrize("split", [1, 3])
def test_windows_with_split_k(split):
    """The depthwise and pool windows in the load stage, whole and split."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 20, 7, 6, generator=g).half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(9, 20, 1, 1, generator=g) / 5).half()
    cfg = Conv2dConfig(32, 16, 16, 4, 1, split_k=split)
    dw = (torch.randn(20, 1, 3, 3, generator=g) / 3).half()
    dwb = torch.randn(20, generator=g).half()
    y = torch.full((2, 9, 4, 3), float("nan")).half().contiguous(memory_format=torch.channels_last)
    K.separable_conv2d(x, dw, dwb, (2, 2), (1, 1, 1, 1), (1, 1), activation_code("relu6"), w,
                       None, None, y, 0, cfg)

    def dw_chain(dt):
        mid = F.relu6(F.conv2d(x.to(dt), dw.to(dt), dwb.to(dt), 2, 1, 1, 20)).to(
            x.dtype if dt != torch.float64 else dt)
        return F.conv2d(mid, w.to(mid.dtype))
    assert_within_torch_error(y, dw_chain(torch.float32).half(), dw_chain(torch.float64))
    y = torch.full((2, 9, 7, 6), float("nan")).half().contiguous(memory_format=torch.channels_last)
    K.pool_conv2d(x, "max", (3, 3), (1, 1), (1, 1, 1, 1), w, None, None, y, 0, cfg)

    def pool_chain(dt):
        return F.conv2d(F.max_pool2d(x.to(dt), 3, 1, 1), w.to(dt))
    assert_within_torch_error(y, pool_chain(torch.float32).half(), pool_chain(torch.float64))


# ------------------------------------------------------------------ the padded stem

STEM_CASES = [
    Case(2, 3, 13, 12, 16, (7, 7), stride=(2, 2), padding=(3, 3, 3, 3)),    # RGB stem
    Case(1, 1, 9, 11, 5, (3, 3), padding=(1, 1, 1, 1), dilation=(2, 1)),     # grey, dilated rows
    Case(1, 5, 10, 9, 7, (5, 3), stride=(1, 2), padding=(0, 2, 2, 1)),       # asymmetric padding
]


@needs_triton
@pytest.mark.parametrize("case", STEM_CASES, ids=[str(c) for c in STEM_CASES])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_stem(case, dtype, tma):
    """tma: the padded weight's kernel rows as descriptor boxes."""
    p = Conv2dProblem.of_conv((case.n, case.c, case.h, case.w),
                              (case.k, case.c, *case.kernel), case.stride, case.padding,
                              case.dilation)
    assert p.stem
    check(case, dtype, Conv2dConfig(32, 16, 32, 4, 1, tma=tma), "silu", y_pad=(1, 2))


@needs_triton
def test_stem_padded_weight_follows_weight_updates():
    case = STEM_CASES[0]
    x, w, b, _ = make(case, torch.float32)
    y = torch.empty(case.n, case.k, *out_hw(case)).contiguous(memory_format=torch.channels_last)
    cfg = Conv2dConfig(32, 16, 32, 4, 1)
    K.conv2d(x, w, b, None, y, case.stride, case.padding, case.dilation, 0, cfg, False)
    # Each changes the weight the same tensor holds; the second and third bump no version.
    updates = (lambda: w.mul_(-1), lambda: w.data.mul_(-2),
               lambda: setattr(w, "data", torch.randn_like(w)))
    for update in updates:
        update()
        K.conv2d(x, w, b, None, y, case.stride, case.padding, case.dilation, 0, cfg, False)
        ref64 = F.conv2d(x.double(), w.double(), b.double(), case.stride, 3)
        assert_within_torch_error(y, F.conv2d(x, w, b, case.stride, 3), ref64)


# ------------------------------------------------------------------ slices and vector strides

@needs_triton
@pytest.mark.parametrize("x_pad, y_pad", [((8, 16), (8, 8)), ((3, 5), (1, 4)), ((0, 0), (0, 0))],
                         ids=["aligned-slices", "odd-slices", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_slices_and_vector_strides(x_pad, y_pad, dtype):
    """24 and 40 channels: multiples of a 16-byte vector (passed divided) but not of 16; odd
    slice offsets take the unvectorised path."""
    case = Case(2, 24, 6, 5, 40, (3, 3), stride=(2, 1), padding=(1, 1, 1, 1))
    check(case, dtype, Conv2dConfig(32, 32, 16, 4, 1), "hardswish", x_pad=x_pad, y_pad=y_pad)


@needs_triton
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 2), c=st.integers(1, 20), k=st.integers(1, 20), h=st.integers(1, 8),
       w=st.integers(1, 8), kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 2),
       sw=st.integers(1, 2), dh=st.integers(1, 2), dw=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 2)] * 4), groups=st.sampled_from([1, 1, 2]),
       tile=st.sampled_from([(16, 16, 16), (32, 16, 32), (16, 32, 16)]),
       split=st.sampled_from([1, 1, 2, 3]), dtype=st.sampled_from(list(DTYPES.values())),
       x_pad=st.sampled_from([(0, 0), (2, 3)]), y_pad=st.sampled_from([(0, 0), (1, 2)]),
       residual=st.booleans(), tma=st.booleans())
def test_random_configurations(n, c, k, h, w, kh, kw, sh, sw, dh, dw, pads, groups, tile, split,
                               dtype, x_pad, y_pad, residual, tma):
    """tma: the weight by descriptor where it fits (c a multiple of 8, one group a tile)."""
    case = Case(n, c * groups, h + dh * (kh - 1), w + dw * (kw - 1), k * groups, (kh, kw),
                (sh, sw), pads, (dh, dw), groups)
    cfg = Conv2dConfig(*tile, 4, 1, split_k=split, tma=tma)
    check(case, dtype, cfg, "gelu", residual, x_pad=x_pad, y_pad=y_pad)


# ------------------------------------------------------------------ config rules

def resnet50(batch):
    """A few of ResNet-50's convs: (c, h, k, r, stride)."""
    return {name: Conv2dProblem.of_conv((batch, c, h, h), (k, c, r, r), (s, s),
                                        (r // 2,) * 4, (1, 1))
            for name, (c, h, k, r, s) in {
                "res2-3x3": (64, 56, 64, 3, 1), "res4-1x1": (1024, 14, 256, 1, 1),
                "res5-3x3": (512, 7, 512, 3, 1), "res5-1x1": (512, 7, 2048, 1, 1),
                "stem": (3, 224, 64, 7, 2)}.items()}


def test_default_config_fills_two_waves():
    for batch in (1, 8, 128):
        for name, p in resnet50(batch).items():
            cfg = K.default_config(p, dtype=torch.float16)
            tiles = math.ceil(p.m / cfg.block_m) * math.ceil(p.k / cfg.block_n)
            steps = p.reduction_steps(cfg.block_k)
            assert cfg.shared_bytes(2) <= 220 * 1024
            if tiles >= 2 * SM_COUNT:
                assert cfg.split_k == 1, (batch, name, cfg)
            elif steps >= 8:  # deep enough to split: split to about two waves
                assert cfg.split_k > 1, (batch, name, cfg)
                assert tiles * cfg.split_k <= 4 * SM_COUNT, (batch, name, cfg)
            assert cfg in K.candidate_configs(p, dtype=torch.float16)


def test_default_config_is_a_per_shape_rule():
    big = resnet50(128)
    # batch 128: early layers take large tiles, the stem reads 8 padded channels per tap
    assert K.default_config(big["res2-3x3"]).block_m >= 128
    assert big["stem"].stem and big["stem"].reduction_steps(32) == 7 * 2
    assert K.default_config(resnet50(1)["res5-1x1"]).split_k > 1


def test_candidate_configs_fit_shared_memory_and_keep_the_old_form():
    p = resnet50(128)["res4-1x1"]
    for dtype in (torch.float16, torch.float32):
        size = torch.empty((), dtype=dtype).element_size()
        assert all(cfg.shared_bytes(size) <= 220 * 1024
                   for cfg in K.candidate_configs(p, dtype=dtype))
    assert K.candidate_configs(p.m, p.k, p.c) == K.candidate_configs(Conv2dProblem.gemm(
        p.m, p.k, p.c))
    assert K.default_config(p.m, p.k, p.c) in K.candidate_configs(p.m, p.k, p.c)
    with pytest.raises(TypeError, match="Conv2dProblem"):
        K.candidate_configs(p.m)
    names = [cfg.name for cfg in K.candidate_configs(resnet50(1)["res5-3x3"])]
    assert len(names) == len(set(names)) and any("sk" in n for n in names)
