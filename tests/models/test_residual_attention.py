"""Residual Attention Network (Attention-56, -92): pre-activation bottleneck units, attention
modules whose soft mask (max-pool down, bilinear up, skip connections, sigmoid) scales the
trunk as (1 + M) * T."""
import operator

import pytest
import torch

from cnnfuse.models.architectures import attention56, attention92
from cnnfuse.models.architectures.residual_attention import (AttentionModule,
                                                              PreActBottleneck,
                                                              ResidualAttentionNet)

from ..util import randomize_batchnorm
from .seed_harness import check_seed, count_params

# Table 4 of Wang et al. 2017: parameters (millions). Attention-56 agrees to 0.3%; Table 2's
# layout (p=1, t=2, r=1) gives Attention-92 2.3% more than the table states.
_PARAMS = {"56": (attention56, 31.9e6, 0.01), "92": (attention92, 51.3e6, 0.03)}


@pytest.mark.parametrize("name", list(_PARAMS))
def test_layout(name):
    make, params, tolerance = _PARAMS[name]
    model = make()
    assert abs(count_params(model) - params) <= tolerance * params, count_params(model)
    modules = [m for m in model.features if isinstance(m, AttentionModule)]
    assert [len(m.down) for m in modules] == ([3, 2, 1] if name == "56" else [3, 2, 2, 1, 1, 1])
    with pytest.raises(ValueError, match="num_classes"):
        make(num_classes=0)


def test_preactivation_unit():
    """The full pre-activation unit of He et al. 2016: a projecting shortcut reads BN-ReLU(x),
    as conv1 does; the identity shortcut reads x itself."""
    unit = randomize_batchnorm(PreActBottleneck(8, 16, stride=2)).eval()
    seen = {}
    unit.shortcut.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        assert unit(x).shape == (1, 16, 4, 4)
        assert torch.equal(seen["x"], torch.relu(unit.bn1(x)))
        same = randomize_batchnorm(PreActBottleneck(16, 16)).eval()
        z = torch.randn(1, 16, 5, 5)
        branch = same.conv3(same.relu(same.bn3(same.conv2(same.relu(same.bn2(
            same.conv1(same.relu(same.bn1(z)))))))))
        assert same.shortcut is None and torch.allclose(same(z), branch + z)


def test_attention_module():
    """(1 + M) * T with M in (0, 1): the module's output before its last unit lies between T
    and 2T; shape kept at odd sizes, whatever the depth."""
    torch.manual_seed(0)
    for depth, size in ((1, 5), (2, 9), (3, 11)):
        module = randomize_batchnorm(AttentionModule(8, depth)).eval()
        seen = {}
        module.post.register_forward_pre_hook(lambda m, args: seen.update(gated=args[0]))
        module.trunk.register_forward_hook(lambda m, args, out: seen.update(trunk=out))
        x = torch.randn(2, 8, size, size + 2)
        with torch.no_grad():
            assert module(x).shape == x.shape
        ratio = seen["gated"] / seen["trunk"]
        assert (ratio > 1).all() and (ratio < 2).all()
    with pytest.raises(ValueError, match="modules"):
        ResidualAttentionNet((1, 2), num_classes=10)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mask_branch_graph(depth):
    """The soft-mask branch as section 3.3 draws it: `depth` max-pool down-samplings, as many
    bilinear up-samplings, each but the last (back to the trunk's size) summed with the skip
    unit of its level, and one sigmoid."""
    graph = torch.fx.symbolic_trace(AttentionModule(8, depth)).graph
    ups = [n for n in graph.nodes if n.target is torch.nn.functional.interpolate]
    assert len(ups) == depth and all(n.kwargs["mode"] == "bilinear" for n in ups)
    summed = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add
              and any(a in ups for a in n.args)]
    assert len(summed) == depth - 1

    def from_skip_unit(node):  # the unit's residual add: skips.<i>.0.conv3 + its input
        return any(a.op == "call_module" and a.target.startswith("skips.") for a in node.args)
    assert all(any(from_skip_unit(a) for a in n.args if a not in ups) for n in summed)
    pools = [n for n in graph.nodes if n.op == "call_module" and n.target == "pool"]
    assert len(pools) == depth
    assert sum(n.op == "call_module" and n.target == "mask_out.6" for n in graph.nodes) == 1


@pytest.mark.parametrize("make, batchnorms", [(attention56, 107), (attention92, 176)],
                         ids=["attention56", "attention92"])
def test_fuse(make, batchnorms):
    """Every conv fused, each sigmoid in its conv's epilogue, each unit's residual add in its
    last conv, every activation absorbed; every BatchNorm folded or in a conv's load (the
    four projecting units' pre-activation in the load of both conv1 and the shortcut) but the
    head's, after the last residual add, which runs as one affine + ReLU pass. Each module's
    (1 + M) * T is one pass (T + M * T). Listed as eager: the up-samplings, their skip adds."""
    result = check_seed(make(num_classes=100), sizes=(32, 35))
    report = result.report
    modules = sum(isinstance(m, AttentionModule) for m in make().modules())
    assert result.batchnorms == batchnorms
    assert result.folded == batchnorms - 1 and result.alone == 1, str(report)
    assert report.activations_absorbed == report.activation_sites, str(report)
    assert report.coverage == 1.0, str(report)
    assert report.fused["activation sigmoid"] == modules
    assert report.fused["(1 + mask) * trunk into one buffer"] == modules, str(report)
    reasons = [r for _, r in report.unfused]
    depths = [len(m.down) for m in make().modules() if isinstance(m, AttentionModule)]
    assert sum("up-sampling runs eager" in r for r in reasons) == sum(depths), str(report)
    assert sum("add of two tensors" in r for r in reasons) == sum(d - 1 for d in depths)


def test_preactivation_read_by_two_convs():
    """A projecting unit: BN-ReLU of the input read by both conv1 and the shortcut conv, which
    becomes the load stage of both (the stem conv folds its own BatchNorm: none is left)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                PreActBottleneck(8, 16))
    result = check_seed(model, sizes=(9, 12))
    assert result.folded == result.batchnorms == 4, str(result.report)
