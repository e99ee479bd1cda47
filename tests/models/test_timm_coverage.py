"""Coverage on the models that use the other conv kinds (weight-standardised, TF 'same'
padding, mixed, pre-activation, re-parametrisable branches, dense and dual-path
connectivity) and a model whose eval forward skips modules: fused output against the unfused
model's (randomised BatchNorm statistics), BatchNorms folded, every conv in a fused module,
the coverage figures per model, and explain listing whatever is left."""
import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse.models.passes.leftover_act import activation_module_name

from ..util import randomize_batchnorm, relative_error

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# name: (input size, share of BatchNorms that must leave the model, report keys that must count)
MODELS = {
    "nf_resnet26": (64, None, ["weight standardised at fuse time"]),
    "nf_regnet_b0": (64, None, ["weight standardised at fuse time"]),
    "tf_mobilenetv3_large_100": (63, 0.95, ["tf 'same' padding in the conv"]),
    "mixnet_s": (64, 0.95, ["batchnorm folded into concat slices"]),
    "cspresnet50": (64, 0.95, []),
    "resnetv2_50": (64, 0.95, ["batchnorm + act in the load of several convs"]),
    "repvgg_a0": (64, 0.95, ["parallel branches summed into one conv"]),
    "googlenet": (64, 0.95, []),
    "densenet121": (64, 0.95, ["dense block in one buffer"]),
    "dpn68": (64, 0.95, ["batchnorm + act in conv's load"]),
    "mobileone_s0": (64, 0.95, ["parallel branches summed into one conv"]),
}

# name: (BatchNorms gone, of all; convs fused, of all conv sites; activations absorbed, of
# all). What is left: the last
# BatchNorm after a residual add or concatenation (one affine + activation pass), GoogLeNet's
# training-only aux classifiers (listed as never run).
FIGURES = {
    "nf_resnet26": ((0, 0), (29, 29), (25, 25)),
    "nf_regnet_b0": ((0, 0), (86, 86), (81, 81)),
    "tf_mobilenetv3_large_100": ((46, 46), (63, 63), (48, 48)),
    "mixnet_s": ((49, 49), (123, 123), (59, 59)),
    "cspresnet50": ((55, 55), (55, 55), (51, 51)),
    "resnetv2_50": ((48, 49), (54, 54), (49, 49)),
    "repvgg_a0": ((61, 61), (44, 44), (22, 22)),
    "googlenet": ((57, 59), (57, 59), (57, 57)),
    "densenet121": ((120, 121), (120, 120), (121, 121)),
    "dpn68": ((71, 72), (72, 72), (72, 72)),
    "mobileone_s0": ((226, 226), (191, 191), (43, 43)),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "googlenet":
        model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    elif name == "densenet121":
        model = torchvision.models.densenet121(weights=None)
    else:
        model = timm.create_model(name, pretrained=False)
    return randomize_batchnorm(model).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_coverage(name):
    size, min_folded, keys = MODELS[name]
    model = _build(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = model(x)
        fused = cnnfuse.fuse(model)
        got = fused(x.contiguous(memory_format=torch.channels_last))
    report = cnnfuse.explain(model)
    text = str(report)
    err = relative_error(got, want)
    assert err < 1e-5, f"{name}: fused logits off by {err:.2e} (relative)\n{text}"
    listed = {site for site, _ in report.unfused}
    # Every conv is in a fused module, or listed; every conv site is counted.
    plain = [n for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(plain) <= listed, f"{plain}\n{text}"
    assert report.conv_fused + len(plain) <= report.conv_sites
    assert report.conv_sites == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    # BatchNorms: the headline counts them all; those left are listed.
    assert report.batchnorms == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    kept = [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(kept) <= listed, f"kept but not listed: {set(kept) - listed}\n{text}"
    if min_folded is not None:
        assert report.bn_folded >= min_folded * report.batchnorms, text
    # Activations: what is still a module in the fused model is listed.
    acts = {n for n, m in fused.named_modules() if activation_module_name(m)}
    assert acts <= listed, f"activations kept but not listed: {acts - listed}\n{text}"
    for key in keys:
        assert report.fused[key] > 0, f"{key!r} missing\n{text}"
    # The figures, and every activation absorbed (cspresnet50's LeakyReLU as
    # leaky_relu(0.01)).
    bns, convs, acts = FIGURES[name]
    assert (report.bn_folded, report.batchnorms) == bns, text
    assert (report.conv_fused, report.conv_sites) == convs, text
    assert (report.activations_absorbed, report.activation_sites) == acts, text
    assert report.activations_absorbed == report.activation_sites > 0, text


def test_googlenet_aux_classifiers_are_listed():
    """aux1 and aux2 run only in training mode: the trace never calls them, the fused model
    leaves them out, and explain names them, so 57 of 59 convs is the whole truth."""
    report = cnnfuse.explain(_build("googlenet"))
    reasons = dict(report.unfused)
    assert report.conv_sites == 59 and report.conv_fused == 57, str(report)
    for aux in ("aux1", "aux2"):
        assert "never runs in the traced forward" in reasons[aux], str(report)
        assert "(1 convs, 1 BatchNorms)" in reasons[aux], str(report)
