"""A fused model computes what the original does, for every way the original may be called:
the smallest programs of each kind of fault once seen (folded weights out of the dtype's
range, defaulted forward arguments, in-place writes through views of merged storage, the
memory layout, reparametrised weights, TorchScript), each at its exact expected value."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnfuse

from ..util import assert_within_torch_error, randomize_batchnorm


def _ones(*convs):
    with torch.no_grad():
        for c in convs:
            c.weight.fill_(1.0)
    return convs


# 1. Folding leaves the dtype's range ------------------------------------------------------

class DeadChannel(nn.Module):
    """Channel 0 computes 100 (x0 - x1), then a BatchNorm of a near-constant channel
    (running_var 2.5e-6, weight 3): folded weights of about ±85,000, past float16's 65,504."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv.weight.normal_()
            self.conv.weight[0] = torch.tensor([100.0, -100.0]).view(2, 1, 1)
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.running_var[0] = 2.5e-6
            self.bn.weight.fill_(3.0)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("backend_name", ["reference", "cuda"])
def test_folded_weights_out_of_fp16_range_stay_float32(backend, backend_name):
    backend(backend_name)
    model = DeadChannel().eval()
    x = torch.ones(2, 2, 3, 5)
    x[:, 0] += 2.0 ** -10 * torch.randint(-3, 4, (2, 3, 5))  # exact in float16
    x = x.half()
    ref = copy.deepcopy(model).double()(x.double())
    eager = copy.deepcopy(model).half()(x)
    fused = cnnfuse.fuse(model, dtype=torch.float16)
    assert fused.conv.weight.dtype == torch.float32  # ±85,000 is no float16
    got = fused(x)
    assert got.dtype == torch.float16
    assert_within_torch_error(got, eager, ref)
    report = cnnfuse.explain(model, dtype=torch.float16)
    assert any("float32" in reason for _, reason in report.unfused), str(report)


def test_folded_weights_that_fit_are_cast():
    model = DeadChannel().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(1.0)
    fused = cnnfuse.fuse(model, dtype=torch.float16)
    assert fused.conv.weight.dtype == torch.float16
    assert cnnfuse.fuse(DeadChannel().eval(), dtype=torch.bfloat16).conv.weight.dtype == \
        torch.bfloat16  # bfloat16 has float32's range


def test_ordinary_folded_weights_are_cast():
    """Random and trained weights have elements far below float16's smallest normal number;
    only each output channel's largest magnitude decides, so an ordinary network is float16
    throughout (a float32 conv on the GPU would cost its speed, not its answer)."""
    import torchvision
    model = randomize_batchnorm(torchvision.models.resnet18()).eval()
    fused = cnnfuse.fuse(model, dtype=torch.float16)
    dtypes = [m.weight.dtype for m in fused.modules() if isinstance(m, cnnfuse.FusedConv2d)]
    assert len(dtypes) == 20 and set(dtypes) == {torch.float16}


class Siblings(nn.Module):
    """Two convs reading x, one with a BatchNorm whose tiny variance folds out of float16's
    range: merged into one conv, which must keep float32 weights for both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-12)
        with torch.no_grad():
            self.bn.running_var.fill_(1e-12)
            self.bn.weight.fill_(3.0)

    def forward(self, x):
        return F.relu(self.bn(self.a(x))) * F.relu(self.b(x))


def test_merged_siblings_keep_float32_when_one_overflows():
    torch.manual_seed(0)
    model = Siblings().eval()
    x = 1e-3 * torch.randn(1, 3, 4, 5)
    fused = cnnfuse.fuse(model, dtype=torch.float16)
    convs = [m for m in fused.modules() if isinstance(m, cnnfuse.FusedConv2d)]
    assert len(convs) == 1 and convs[0].out_channels == 8  # the siblings merged
    assert convs[0].weight.dtype == torch.float32
    ref = copy.deepcopy(model).double()(x.double())
    got = fused(x.half())
    assert_within_torch_error(got, ref.half(), ref)


# 2. Forwards with defaulted arguments ------------------------------------------------------

class OptionalSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, skip=None, scale=None):
        y = self.bn(self.conv(x))
        if skip is not None:
            y = y + skip
        if scale is not None:
            y = y * scale.mean()
        return F.relu(y)


def test_defaulted_arguments_every_call_pattern():
    model = OptionalSkip().eval()
    x, skip, scale = torch.randn(2, 3, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(3)
    fused = cnnfuse.fuse(model)
    with torch.no_grad():
        for args, kwargs in [((x,), {}), ((x, skip), {}), ((x,), {"scale": scale}),
                             ((x, skip, scale), {}), ((x,), {"skip": None})]:
            torch.testing.assert_close(fused(*args, **kwargs), model(*args, **kwargs),
                                       rtol=2e-5, atol=2e-5)
    report = cnnfuse.explain(model)
    assert any("defaulted arguments" in err for _, err in report.untraceable), str(report)


def test_defaulted_arguments_of_a_block_inside_a_traced_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = OptionalSkip(), OptionalSkip()
            self.b.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y, y)  # traced inline: `skip` is a tensor here, None in self.a

    model = Net().eval()
    x = torch.randn(1, 3, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(cnnfuse.fuse(model)(x), model(x), rtol=2e-5, atol=2e-5)
    assert cnnfuse.explain(model).fused["batchnorm folded"] == 2


# 3. In-place writes through views of merged storage ---------------------------------------

class DenseWrite(nn.Module):
    """A dense block (the concatenations [x], [x, f1], [x, f1, f2] become prefix views of one
    buffer) with an in-place write into a slice of the second one."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _ones(nn.Conv2d(1, 1, 1, bias=False), nn.Conv2d(2, 1, 1, bias=False))

    def forward(self, x):
        c1 = torch.cat([x], 1)
        f1 = self.a(c1)
        c2 = torch.cat([x, f1], 1)
        f2 = self.b(c2)
        c3 = torch.cat([x, f1, f2], 1)
        c2[:, :1].mul_(0)  # through a view: eager's c3 is a tensor of its own
        return c3


def test_in_place_write_through_a_view_of_a_dense_concatenation():
    model = DenseWrite().eval()
    x = torch.full((1, 1, 1, 1), 2.0)
    want = torch.tensor([2.0, 2.0, 4.0])
    with torch.no_grad():
        assert model(x).flatten().tolist() == want.tolist()
        assert cnnfuse.fuse(model)(x).flatten().tolist() == want.tolist()
    assert cnnfuse.explain(model).fused["dense block in one buffer"] == 0


def test_two_dense_concatenations_returned_stay_apart():
    class Returned(DenseWrite):
        def forward(self, x):
            c1 = torch.cat([x], 1)
            f1 = self.a(c1)
            c2 = torch.cat([x, f1], 1)
            c3 = torch.cat([x, f1, self.b(c2)], 1)
            return c2, c3

    model = Returned().eval()
    with torch.no_grad():
        c2, c3 = cnnfuse.fuse(model)(torch.full((1, 1, 1, 1), 2.0))
    c2.mul_(0)  # the caller writes into one result
    assert c3.flatten().tolist() == [2.0, 2.0, 4.0]


def test_view_of_a_sibling_slice_written_in_place():
    class Siblings(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            ya, yb = self.a(x), self.b(x)
            ya.view(-1).mul_(0)  # eager: ya is zero now, its own tensor
            return ya + 1, yb

    model = Siblings().eval()
    x = torch.randn(1, 3, 4, 5)
    with torch.no_grad():
        want, got = model(x), cnnfuse.fuse(model)(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_residual_conv_does_not_move_past_a_write_into_its_input():
    class Moved(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = x + 0
            y = self.conv(x)
            x.mul_(2)  # after the conv in eager; the add's conv would read the doubled x
            return y + x

    model = Moved().eval()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(cnnfuse.fuse(model)(x), model(x), rtol=2e-5, atol=2e-5)


# 4. The memory layout ----------------------------------------------------------------------

class LeNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("make", [
    LeNetish, lambda: nn.Sequential(nn.Conv2d(3, 4, 3)),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.ReLU())],
    ids=["lenet-view", "sequential", "sequential-flatten"])
def test_views_and_outputs_keep_the_original_layout(make):
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        got = cnnfuse.fuse(model)(x)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        assert got.is_contiguous() and got.stride() == want.stride()
        cl = x.contiguous(memory_format=torch.channels_last)
        if not isinstance(model, LeNetish):  # whose view fails in eager on channels_last
            assert cnnfuse.fuse(model)(cl).stride() == model(cl).stride()


def test_conv_output_view_and_feature_maps():
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3, stride=2)

        def forward(self, x):
            f1 = self.c1(x)
            f2 = self.c2(f1)
            return {"flat": f1.view(1, -1), "maps": [f1, f2]}

    model = Backbone().eval()
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        want, got = model(x), cnnfuse.fuse(model)(x)
    torch.testing.assert_close(got["flat"], want["flat"], rtol=2e-5, atol=2e-5)
    for g, w in zip(got["maps"], want["maps"]):
        assert g.is_contiguous() and g.stride() == w.stride()


# 5. Reparametrised weights ------------------------------------------------------------------

def test_spectral_norm_uses_the_effective_weight():
    torch.manual_seed(1)
    conv = nn.utils.spectral_norm(nn.Conv2d(1, 1, 1)).eval()
    with torch.no_grad():
        conv.bias.zero_()
    x = torch.ones(1, 1, 2, 2)
    fused = cnnfuse.fuse(conv)
    with torch.no_grad():
        assert fused(x).flatten().tolist() == pytest.approx([1.0] * 4, abs=1e-6)  # w / |w|
        assert conv(x).flatten().tolist() == pytest.approx([1.0] * 4, abs=1e-6)


def test_spectral_norm_after_load_state_dict_before_any_forward():
    def make():
        return nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 5, 3)), nn.BatchNorm2d(5),
                             nn.ReLU())
    torch.manual_seed(2)
    src = make().train()
    with torch.no_grad():
        for _ in range(3):
            src(torch.randn(2, 3, 6, 6))  # power iterations move u, v and the BN stats
    model = make().eval()
    model.load_state_dict(src.state_dict())
    fused = cnnfuse.fuse(model)  # no forward since the load: the stored weight is stale
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=2e-5, atol=2e-5)
    assert cnnfuse.explain(model).fused["SpectralNorm weight taken at fuse time"] == 1


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_weight_norm(inplace):
    def make():
        return nn.Sequential(nn.utils.weight_norm(nn.Conv2d(2, 3, 1)), nn.ReLU()).eval()
    torch.manual_seed(3)
    model, twin = make(), make()
    with torch.no_grad():
        model[0].weight_g.mul_(3.0)  # the hook's weight is stale until the next forward
        twin.load_state_dict(model.state_dict())
    x = torch.randn(1, 2, 3, 3)
    fused = cnnfuse.fuse(model, inplace=inplace)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), twin(x), rtol=2e-5, atol=2e-5)
    if not inplace:  # the original still has its hook, and still computes the same
        with torch.no_grad():
            torch.testing.assert_close(model(x), twin(x), rtol=2e-5, atol=2e-5)


# 6. TorchScript -----------------------------------------------------------------------------

def test_script_says_what_to_use_trace_and_export_work():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fused = cnnfuse.fuse(model)
    with pytest.raises(TypeError, match=r"torch\.jit\.trace.*torch\.export"):
        torch.jit.script(fused)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)
        torch.testing.assert_close(traced(x), model(x), rtol=2e-5, atol=2e-5)


def test_in_place_add_into_an_operand_only_the_add_reads():
    class Add(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.conv, self.shared = nn.Conv2d(3, 3, 1), shared

        def forward(self, x):
            t = x * 2
            alias = t[:, :1] if self.shared else x
            t += self.conv(x)  # into t: fused when nothing else can see t
            return F.relu(t, inplace=True), alias * 1

    x = torch.randn(1, 3, 4, 4)
    for shared in (False, True):
        model = Add(shared).eval()
        with torch.no_grad():
            for g, w in zip(cnnfuse.fuse(model)(x), model(x)):
                torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
        assert cnnfuse.explain(model).fused["residual add"] == (0 if shared else 1)
