"""Each conv kind real models use, fused against its PyTorch / timm module in float64 with
randomised BatchNorm statistics: TF 'same' padding, weight-standardised convs, functional
convs, a BatchNorm after a concatenation of convs, parallel branches summed into one conv, a
pre-activation BatchNorm read by several convs, an activation no kernel computes yet, and a
BatchNorm after a non-conv."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse
from cnnfuse import FusedConv2d
from cnnfuse.models.modules.bn_act import FusedBatchNormAct
from cnnfuse.models.modules.conv2d_same import FusedConv2dSame, SamePad, same_padding

from ..util import assert_within_torch_error, needs_triton, randomize_batchnorm

timm_layers = pytest.importorskip("timm.layers")


def fuse_and_check(model, *shapes, dtype=torch.float32):
    """Fuse `model` once; at each input shape, its output against the model's own in float64
    (2x the unfused model's error in `dtype`). Returns (fused, explain report)."""
    model = randomize_batchnorm(model).eval()
    fused = cnnfuse.fuse(model, dtype=None if dtype is torch.float32 else dtype)
    ref64 = copy.deepcopy(model).double()
    same = copy.deepcopy(model).to(dtype)
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            want = ref64(x.double())
            ours = fused(x.to(dtype).contiguous(memory_format=torch.channels_last))
            theirs = same(x.to(dtype))
        assert_within_torch_error(ours, theirs, want)
    return fused, cnnfuse.explain(model)


def modules_of(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


class ConvBnAct(nn.Module):
    def __init__(self, conv, act=None):
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(conv.out_channels)
        self.act = act or nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


# --- TensorFlow 'same' padding --------------------------------------------------------------

def test_same_padding_matches_tensorflow():
    # TF: output ceil(n / s); total = max((out - 1) s + (k - 1) d + 1 - n, 0), extra at the end
    assert same_padding(7, 8, (3, 3), (2, 2), (1, 1)) == (0, 1, 1, 1)
    assert same_padding(9, 9, (5, 5), (2, 2), (1, 1)) == (2, 2, 2, 2)
    assert same_padding(6, 6, (1, 1), (2, 2), (1, 1)) == (0, 0, 0, 0)
    assert same_padding(5, 5, (3, 3), (1, 1), (2, 2)) == (2, 2, 2, 2)


@pytest.mark.parametrize("k,stride", [(3, 2), (5, 2), (4, 1), (3, (2, 1))],
                         ids=["3x3s2", "5x5s2", "4x4s1", "3x3s2x1"])
def test_conv2d_same_fuses_at_every_input_size(k, stride):
    """One fused module serves odd and even sizes: the padding is computed per call."""
    conv = timm_layers.Conv2dSame(6, 8, k, stride=stride, bias=True)
    fused, report = fuse_and_check(ConvBnAct(conv), (2, 6, 9, 10), (1, 6, 8, 7))
    (fc,) = modules_of(fused, FusedConv2d)
    assert isinstance(fc, FusedConv2dSame) and fc.folded_bn and fc.activation == "relu"
    assert not modules_of(fused, SamePad) and report.coverage == 1.0, str(report)


def test_conv2d_same_in_a_sequential_fuses_with_its_batchnorm():
    """The module-tree path (a Sequential is not traced): pad and conv merge there too."""
    model = nn.Sequential(timm_layers.Conv2dSame(4, 6, 3, stride=2), nn.BatchNorm2d(6),
                          nn.ReLU6())
    fused, report = fuse_and_check(model, (1, 4, 9, 8), (1, 4, 8, 8))
    assert isinstance(fused[0], FusedConv2dSame), fused
    assert fused[0].folded_bn and fused[0].activation == "relu6", str(report)


def test_conv2d_same_before_a_fused_pair_keeps_its_pad():
    """A depthwise Conv2dSame paired with the 1x1 after it: the pad stays a step of its own
    (exact), and explain says so."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = timm_layers.Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False)
            self.bn, self.pw = nn.BatchNorm2d(8), nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return self.pw(F.relu(self.bn(self.dw(x))))
    fused, report = fuse_and_check(Block(), (1, 8, 11, 9))
    assert report.coverage == 1.0 and report.fused["depthwise + 1x1 in one op"] == 1
    assert any("'SAME' padding kept as a pad" in r for _, r in report.unfused), str(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_conv2d_same_in_half_precision(dtype):
    conv = timm_layers.Conv2dSame(4, 6, 3, stride=2, bias=True)
    fused, _ = fuse_and_check(ConvBnAct(conv, nn.SiLU()), (1, 4, 7, 6), dtype=dtype)
    assert isinstance(modules_of(fused, FusedConv2d)[0], FusedConv2dSame)


def test_fused_conv2d_same_with_float32_weights_out_of_fp16_range():
    """A BatchNorm with a tiny variance folds into weights beyond float16's range: they stay
    float32 through .half() and the conv computes in float32, as FusedConv2d does."""
    torch.manual_seed(0)
    block = ConvBnAct(timm_layers.Conv2dSame(3, 4, 3, stride=2, bias=False), nn.Identity()).eval()
    with torch.no_grad():  # scale 3 / sqrt(2e-12): folded weights ~1e5, outputs ~1e2
        block.bn.eps = 1e-12
        block.bn.running_var.fill_(1e-12)
        block.bn.running_mean.zero_()
        block.bn.weight.fill_(3.0)
    x = 1e-3 * torch.randn(1, 3, 9, 8)
    fused = cnnfuse.fuse(block, dtype=torch.float16)
    conv = modules_of(fused, FusedConv2d)[0]
    assert isinstance(conv, FusedConv2dSame) and conv.weight.dtype == torch.float32
    want = block.double()(x.double())
    got = fused(x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert_within_torch_error(got, want.half(), want)


@needs_triton
def test_conv2d_same_on_the_triton_kernel(backend):
    """The asymmetric padding of an odd input through the Triton conv (interpreted on CPU)."""
    backend("triton")
    conv = timm_layers.Conv2dSame(4, 8, 3, stride=2, bias=False)
    fuse_and_check(ConvBnAct(conv), (1, 4, 7, 8))


# --- weight-standardised convs ----------------------------------------------------------------

def _std(kind, **kw):
    cls = getattr(timm_layers, kind)
    conv = cls(6, 8, 3, **kw)
    with torch.no_grad():
        if hasattr(conv, "gain"):
            conv.gain.uniform_(0.5, 2.0)
        if conv.bias is not None:
            conv.bias.uniform_(-1, 1)
    return conv


@pytest.mark.parametrize("kind,kw", [
    ("StdConv2d", {}), ("StdConv2d", {"stride": 2, "bias": True}),
    ("ScaledStdConv2d", {"gamma": 1.7}), ("StdConv2dSame", {"stride": 2}),
    ("ScaledStdConv2dSame", {"stride": 2, "gamma": 0.8})],
    ids=["std", "std_s2_bias", "scaled", "std_same_s2", "scaled_same_s2"])
def test_weight_standardised_conv_folds(kind, kw):
    fused, report = fuse_and_check(ConvBnAct(_std(kind, **kw)), (2, 6, 9, 8))
    (fc,) = modules_of(fused, FusedConv2d)
    assert fc.folded_bn and report.fused["weight standardised at fuse time"] == 1
    assert report.coverage == 1.0 and not modules_of(fused, nn.Conv2d), str(report)


def test_standardisation_takes_eps():
    """Weights of tiny variance: the eps (1e-6 here, 1e-5 by default in BatchNorm) decides the
    result, so a wrong eps shows."""
    conv = _std("ScaledStdConv2d", eps=1e-4)
    with torch.no_grad():
        conv.weight.mul_(1e-3)
    fuse_and_check(nn.Sequential(conv), (1, 6, 5, 5))


# --- functional convs and Conv2d subclasses ---------------------------------------------------

class Functional(nn.Module):
    """F.conv2d on a weight computed from parameters (a weight-normalised conv), then BN, and
    a Conv2d module after it (fuse traces the modules that hold one)."""
    def __init__(self):
        super().__init__()
        self.v, self.g = nn.Parameter(torch.randn(8, 6, 3, 3)), nn.Parameter(torch.rand(8) + .5)
        self.b = nn.Parameter(torch.randn(8))
        self.bn, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        w = self.v * (self.g / self.v.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
        return self.head(F.relu(self.bn(F.conv2d(x, w, self.b, stride=2, padding=1))))


def test_functional_conv_on_parameters_fuses():
    fused, report = fuse_and_check(Functional(), (2, 6, 9, 10))
    fc = next(m for m in modules_of(fused, FusedConv2d) if m.stride == (2, 2))
    assert fc.folded_bn and fc.activation == "relu"
    assert not modules_of(fused, nn.Conv2d)
    assert (report.conv_sites, report.conv_fused) == (2, 2), str(report)


def test_functional_conv_on_the_input_is_counted_and_listed():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):  # a weight from the data: no constant to fold
            return F.conv2d(self.conv(x), x[:4, :, :3, :3])
    report = cnnfuse.explain(Dynamic().eval())
    assert (report.conv_sites, report.conv_fused) == (2, 1)
    assert "computed from the input" in str(report) and report.coverage == 0.5


def test_conv_subclass_that_does_not_trace_is_listed():
    class Gated(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x[:, :self.out_channels]
    report = cnnfuse.explain(nn.Sequential(Gated(4, 4, 1)).eval())
    assert report.conv_fused == 0 and report.coverage == 0.0
    assert "Gated has a forward of its own" in str(report)


def test_conv_subclass_with_a_weight_transform_is_fused():
    """A subclass the trace inlines (its forward calls F.conv2d on a transformed weight) is
    fused through its F.conv2d, in the subclass's own place."""
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight * 2, self.bias, self.stride, self.padding)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = Doubled(6, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv(x))
    fused, report = fuse_and_check(Net(), (1, 6, 7, 7))
    assert isinstance(fused.conv, FusedConv2d) and fused.conv.folded_bn, str(report)
    assert (report.conv_sites, report.conv_fused) == (1, 1)


# --- a BatchNorm after a concatenation of convs -----------------------------------------------

@pytest.mark.parametrize("channels,kernels", [(12, [3, 5, 7]), (13, [3, 5])],
                         ids=["even", "uneven_split"])
def test_mixed_conv_batchnorm_folds_slice_by_slice(channels, kernels):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = timm_layers.MixedConv2d(channels, channels, kernels, depthwise=True)
            self.bn = timm_layers.BatchNormAct2d(channels, act_layer=nn.SiLU)

        def forward(self, x):
            return self.bn(self.conv(x))
    fused, report = fuse_and_check(Mixed(), (2, channels, 9, 8))
    convs = modules_of(fused, FusedConv2d)
    assert len(convs) == len(kernels) and all(c.folded_bn and c.activation == "silu"
                                              for c in convs)
    assert report.fused["batchnorm folded into concat slices"] == 1
    assert report.bn_folded == report.batchnorms == 1, str(report)
    assert not modules_of(fused, nn.BatchNorm2d), str(report)


def test_cat_with_a_part_no_conv_makes_keeps_the_batchnorm_whole():
    class CatInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(10)

        def forward(self, x):
            return F.relu(self.bn(torch.cat([self.conv(x), x], 1)))
    fused, report = fuse_and_check(CatInput(), (1, 4, 6, 5))
    assert report.fused["batchnorm folded into concat slices"] == 0
    (pass_,) = modules_of(fused, FusedBatchNormAct)
    assert pass_.activation == "relu", str(report)


# --- parallel branches summed into one conv ---------------------------------------------------

@pytest.mark.parametrize("cin,cout,stride,group_size",
                         [(8, 8, 1, None), (8, 12, 2, None), (8, 8, 1, 4)],
                         ids=["identity", "stride2", "grouped_identity"])
def test_repvgg_block_is_one_conv(cin, cout, stride, group_size):
    from timm.models.byobnet import RepVggBlock
    block = RepVggBlock(cin, cout, stride=stride, group_size=group_size)
    fused, report = fuse_and_check(block, (2, cin, 9, 10))
    (fc,) = modules_of(fused, FusedConv2d)
    assert fc.kernel_size == (3, 3) and fc.activation == "relu", str(report)
    assert report.fused["parallel branches summed into one conv"] == 2
    assert report.bn_folded == report.batchnorms == (3 if block.identity is not None else 2)


def test_asymmetric_branches_sum_into_the_square_kernel():
    """ACNet: 3x3 + 1x3 + 3x1, each padded to read the same pixels."""
    class ACBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.square = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(6))
            self.row = nn.Sequential(nn.Conv2d(6, 6, (1, 3), padding=(0, 1)), nn.BatchNorm2d(6))
            self.col = nn.Sequential(nn.Conv2d(6, 6, (3, 1), padding=(1, 0)), nn.BatchNorm2d(6))

        def forward(self, x):
            return self.square(x) + self.row(x) + self.col(x)
    fused, report = fuse_and_check(ACBlock(), (1, 6, 7, 8))
    assert len(modules_of(fused, FusedConv2d)) == 1, str(report)


def test_branches_of_different_strides_stay_apart():
    class Mismatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2,
                                                                      dilation=2)

        def forward(self, x):
            return self.a(x) + self.b(x)
    fused, report = fuse_and_check(Mismatch(), (1, 4, 7, 7))
    assert report.fused["parallel branches summed into one conv"] == 0
    assert report.fused["residual add"] == 1


# --- a pre-activation BatchNorm read by several convs -----------------------------------------

def test_preactivation_read_by_two_convs_is_each_ones_prologue():
    from functools import partial

    from timm.models.resnetv2 import DownsampleConv, PreActBottleneck
    block = PreActBottleneck(8, 16, stride=2, norm_layer=timm_layers.BatchNormAct2d,
                             conv_layer=timm_layers.create_conv2d,
                             proj_layer=partial(DownsampleConv, preact=True,
                                                conv_layer=timm_layers.create_conv2d))
    fused, report = fuse_and_check(block, (2, 8, 9, 9))
    assert fused.downsample.conv.input_affine is not None, str(report)
    assert fused.conv1.input_affine is not None and fused.conv1.input_activation == "relu"
    assert report.fused["batchnorm + act in the load of several convs"] == 1
    assert not modules_of(fused, nn.BatchNorm2d)


def test_preactivation_also_read_by_a_non_conv_stays_one_pass():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = F.relu(self.bn(x))
            return self.conv(y) + y.mean()
    fused, report = fuse_and_check(Mixed(), (1, 4, 5, 6))
    assert fused.conv.input_affine is None and modules_of(fused, FusedBatchNormAct)


# --- activations no kernel computes yet -------------------------------------------------------

@pytest.mark.parametrize("tree", [False, True], ids=["graph", "sequential"])
def test_batchnorm_act_with_an_unfused_activation_folds_and_keeps_it(tree):
    """A BatchNormAct2d whose activation no kernel computes (softsign): the BatchNorm folds,
    the activation stays after the conv, listed."""
    bn = timm_layers.BatchNormAct2d(8, act_layer=nn.Softsign)
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
    if tree:
        model = nn.Sequential(conv, bn)
    else:
        model = ConvBnAct(conv)
        model.bn, model.act = bn, nn.Identity()
    fused, report = fuse_and_check(model, (2, 6, 7, 6))
    (fc,) = modules_of(fused, FusedConv2d)
    assert fc.folded_bn and fc.activation == "none"
    assert modules_of(fused, nn.Softsign) and not modules_of(fused, nn.BatchNorm2d)
    if not tree:
        assert any("Softsign: no fused kernel" in r for _, r in report.unfused), str(report)
        assert report.activation_sites == 1 and report.activations_absorbed == 0


# --- a BatchNorm after a non-conv -------------------------------------------------------------

class PoolBnAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.bn = nn.Conv2d(8, 8, 1), nn.MaxPool2d(2), nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu6(self.bn(self.pool(self.conv(x))))


@pytest.mark.parametrize("mode", ["reference", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batchnorm_after_a_pool_is_one_pass(mode, dtype, backend):
    backend(mode)
    fused, report = fuse_and_check(PoolBnAct(), (2, 8, 9, 7), dtype=dtype)
    (pass_,) = modules_of(fused, FusedBatchNormAct)
    assert pass_.activation == "relu6" and not modules_of(fused, nn.BatchNorm2d)
    assert report.fused["batchnorm + act as one pass"] == 1
    assert report.activations_absorbed == 1 and report.activation_sites == 1


# --- scalar factors around convs (NFNets) ---------------------------------------------------

class NFBlock(nn.Module):
    """An NFNet block's shape: act(x) * beta into the first conv, conv * alpha + x at the end."""
    def __init__(self, inplace=False):
        super().__init__()
        self.act = nn.SiLU(inplace=inplace)
        self.conv1, self.conv2 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 1)

    def forward(self, x):
        out = self.act(x) * 0.7
        return self.conv2(F.relu(self.conv1(out))) * 0.2 + x


def test_scalar_factors_fold_into_the_convs():
    fused, report = fuse_and_check(NFBlock(), (2, 6, 7, 9))
    assert report.fused["scalar multiply folded into conv weights"] == 2, str(report)
    assert fused.conv1.input_activation == "silu" and fused.conv2.has_residual
    assert report.activations_absorbed == report.activation_sites == 2


def test_in_place_activation_read_by_the_shortcut_stays():
    """act_(x) changes x, which the shortcut reads too: the activation cannot move into the
    conv's load (the shortcut would miss it)."""
    fused, report = fuse_and_check(NFBlock(inplace=True), (1, 6, 5, 5))
    assert fused.conv1.input_affine is None, str(report)
    assert any("SiLU" in r for _, r in report.unfused)
