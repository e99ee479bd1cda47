"""cnnfuse.fuse on small synthetic models: each pattern, each refusal, the module-tree path,
state_dict round trips and the errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse
from cnnfuse import FusedConv2d

from ..util import randomize_batchnorm, relative_error, triton_runnable
from .harness import build


def fuse_and_compare(model, x=None, tolerance=2e-5):
    model = randomize_batchnorm(model).eval()
    x = torch.randn(2, 6, 9, 10) if x is None else x
    with torch.no_grad():
        expected = model(x)
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < tolerance
    return fused, cnnfuse.explain(model)


def convs(model):
    return [m for m in model.modules() if isinstance(m, FusedConv2d)]


class ConvBnAct(nn.Module):
    def __init__(self, act, cin=6, cout=8, **bn):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout, **bn)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@pytest.mark.parametrize("act, name", [
    (nn.ReLU(inplace=True), "relu"), (nn.ReLU6(), "relu6"), (nn.SiLU(), "silu"),
    (nn.Hardswish(), "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"), (nn.Sigmoid(), "sigmoid"),
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.Hardtanh(0.0, 6.0), "relu6"), (F.relu, "relu"), (torch.relu, "relu"),
    (lambda x: F.relu(x, inplace=True), "relu"), (lambda x: x.relu(), "relu"),
    (lambda x: F.hardtanh(x, 0.0, 6.0), "relu6"), (torch.sigmoid, "sigmoid"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_activation_forms(act, name):
    fused, report = fuse_and_compare(ConvBnAct(act))
    (conv,) = convs(fused)
    assert conv.folded_bn and conv.activation == name
    assert report.fused[f"activation {name}"] == 1


def test_unrecognised_activation_stays_outside():
    fused, _ = fuse_and_compare(ConvBnAct(nn.Softsign()))
    (conv,) = convs(fused)
    assert conv.folded_bn and conv.activation == "none"


@pytest.mark.parametrize("bn", [dict(), dict(affine=False), dict(eps=0.3)],
                         ids=["affine", "no-affine", "large-eps"])
def test_batchnorm_variants(bn):
    model = ConvBnAct(nn.Identity(), **bn)
    fuse_and_compare(model)


def test_conv_bias_is_folded_too():
    model = ConvBnAct(nn.ReLU())
    model.conv = nn.Conv2d(6, 8, 3, padding=1, bias=True)
    fuse_and_compare(model)


class Residual(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.a, self.b = ConvBnAct(nn.ReLU()), ConvBnAct(nn.Identity(), cin=8)
        self.proj = nn.Sequential(nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.form = form

    def forward(self, x):
        out = self.b(self.a(x))
        identity = self.proj(x)
        if self.form == "iadd":
            out += identity
        elif self.form == "torch.add":
            out = torch.add(identity, out)
        elif self.form == "add_":
            out = out.add_(identity)
        else:
            out = out + identity
        return F.relu(out)


@pytest.mark.parametrize("form", ["plus", "iadd", "torch.add", "add_"])
def test_residual_add_and_relu_absorbed(form):
    fused, report = fuse_and_compare(Residual(form))
    assert report.fused["residual add"] == 1
    with_res = [c for c in convs(fused) if c.has_residual]
    assert len(with_res) == 1 and with_res[0].activation == "relu"


def test_scaled_add_is_not_a_residual():
    class Scaled(Residual):
        def forward(self, x):
            return torch.add(self.b(self.a(x)), self.proj(x), alpha=0.5)
    _, report = fuse_and_compare(Scaled("plus"))
    assert report.fused["residual add"] == 0


def test_broadcast_add_falls_back_exactly():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 8, 3, padding=1)
            self.gate = nn.Parameter(torch.randn(1, 8, 1, 1))

        def forward(self, x):
            return self.conv(x) + x.mean((2, 3), keepdim=True)[:, :1] * self.gate
    fuse_and_compare(Broadcast())


def test_conv_output_read_twice_keeps_batchnorm_apart():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y
    fused, report = fuse_and_compare(Twice())
    (conv,) = convs(fused)
    assert not conv.folded_bn


def test_shared_module_is_left_with_reason():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))
    fused, report = fuse_and_compare(Shared())
    assert report.conv_fused == 0 and "called at 2 places" in str(report)


def test_reflect_padding_is_left_with_reason():
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    _, report = fuse_and_compare(model)
    assert report.conv_fused == 0 and "padding_mode='reflect'" in str(report)


class Untraceable(nn.Module):
    """Data-dependent Python control flow: FX cannot trace this module as a whole."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = ConvBnAct(nn.SiLU(), cin=8)

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 0:
            y = y * 2
        return self.block(y)


def test_module_tree_path_for_untraceable_models():
    fused, report = fuse_and_compare(Untraceable())
    assert report.untraceable and report.coverage == 1.0
    stem, block = fused.stem[0], convs(fused.block)[0]
    assert stem.folded_bn and stem.activation == "relu"
    assert block.folded_bn and block.activation == "silu"


def test_sequential_neighbours_fold_when_the_parent_does_not_trace():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(),
                                     Untraceable.__new__(Untraceable))
            nn.Module.__init__(self.seq[3])
            Untraceable.__init__(self.seq[3])
            self.seq[3].stem[0] = nn.Conv2d(8, 8, 3, padding=1, bias=False)

        def forward(self, x):
            return self.seq(x)
    fused, report = fuse_and_compare(Outer())
    first = fused.seq[0]
    assert first.folded_bn and first.activation == "relu6"


def test_original_model_is_untouched_and_state_dict_round_trips():
    model = randomize_batchnorm(Residual("plus")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = cnnfuse.fuse(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    other = cnnfuse.fuse(randomize_batchnorm(Residual("plus"), torch.Generator().manual_seed(7))
                         .eval())
    other.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 9, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(other(x), fused(x))
    assert not any(k.endswith("running_mean") for k in fused.state_dict())


def test_dtype_and_layout_options():
    model = ConvBnAct(nn.ReLU()).eval()
    fused = cnnfuse.fuse(model, dtype=torch.bfloat16)
    (conv,) = convs(fused)
    assert conv.weight.dtype == torch.bfloat16
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 9, 10)
    with torch.no_grad():
        assert relative_error(fused(x.bfloat16()), model(x)) < 2e-2


def test_training_mode_is_refused():
    model = ConvBnAct(nn.ReLU())
    with pytest.raises(ValueError, match="eval-mode model.*running"):
        cnnfuse.fuse(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cnnfuse.fuse(lambda x: x)
    with pytest.raises(TypeError, match="dtype"):
        cnnfuse.fuse(model.eval(), dtype=torch.int8)


def test_explain_is_readable():
    report = cnnfuse.explain(randomize_batchnorm(Residual("plus")).eval())
    text = str(report)
    assert "3/3 conv sites fused (100.0%)" in text and "residual add" in text


@pytest.mark.skipif(not triton_runnable(), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_whole_model_on_the_triton_kernel(monkeypatch):
    """Every conv of a fused ResNet-18 through the Triton kernel (interpreted on the CPU)."""
    monkeypatch.setenv("CNNFUSE_BACKEND", "triton")
    model = randomize_batchnorm(build("torchvision", "resnet18")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = cnnfuse.fuse(model)(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < 1e-4  # tf32 is off on the CPU: fp32 dots


@pytest.mark.slow
@pytest.mark.parametrize("name", ["googlenet", "inception_v3", "densenet121",
                                  "shufflenet_v2_x1_0", "efficientnet_b0",
                                  "timm/legacy_xception"])
def test_torch_compile_fullgraph_of_fused_models(name):
    """One graph, no breaks: branches, concatenations, channel shuffles, SE gates and the
    module-tree fallback all trace through the cnnfuse ops."""
    from cnnfuse.bench import zoo
    model = zoo.build(name)
    fused = cnnfuse.fuse(model)
    x = torch.randn(1, 3, 160, 160).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), fused(x))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["resnet50", "googlenet", "inception_v3", "densenet121",
                                  "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large",
                                  "efficientnet_b0", "shufflenet_v2_x1_0", "squeezenet1_1"])
def test_fused_model_on_gpu(name, dtype):
    model = build("torchvision", name)
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = model(x).double()
        fast = cnnfuse.fuse(model, dtype=dtype).cuda()
        got = fast(x.cuda().to(dtype).contiguous(memory_format=torch.channels_last))
        eager = model.cuda().to(dtype)(x.cuda().to(dtype))
    # within a few times of what PyTorch's own eager model loses in the same dtype
    torch_err = relative_error(eager.cpu(), expected)
    assert relative_error(got.cpu(), expected) <= 3 * torch_err + 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["googlenet", "shufflenet_v2_x1_0", "densenet121"])
def test_triton_everywhere_on_gpu(name, backend):
    """Every conv on the Triton kernel: slice and interleaved stores, slice inputs, the
    pre-activation prologue and merged siblings, compiled for the GPU at hand."""
    backend("triton")
    model = build("torchvision", name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x).double()
        got = cnnfuse.fuse(model, dtype=torch.float16).cuda()(
            x.cuda().half().contiguous(memory_format=torch.channels_last))
        eager = model.cuda().half()(x.cuda().half())
    assert relative_error(got.cpu(), expected) <= 3 * relative_error(eager.cpu(), expected) + 1e-3
