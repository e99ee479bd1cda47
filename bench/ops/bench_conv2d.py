"""Per layer: every distinct conv of ResNet-50 and GoogLeNet at batch 1 and 128, fp16 NHWC.

Providers, all in CUDA graphs: `cudnn` runs conv + BatchNorm + ReLU as PyTorch eager does;
`cudnn_conv_only` the bare conv; `cnnfuse` the fused op (BN folded, ReLU in the epilogue),
autotuned over its backends; `cnnfuse_triton` the same op on the Triton kernel alone at its
untimed default pick (CNNFUSE_BACKEND=triton, CNNFUSE_AUTOTUNE=0: the kernel that
`python -m cnnfuse.bench.static` checks); `cnnfuse_triton_pointer` that pick with
CNNFUSE_TMA=0 (operands through pointers, not descriptors). CNNFUSE_BENCH_CANDIDATES=N bounds the autotuned
provider's Triton candidates to the default pick and the first N - 1 others (the quick GPU
session's bound on tuning time). Batches have ids b1 and b128 (`-k b128`).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnfuse.bench import zoo
from cnnfuse.bench.timing import graph_callable


def conv_shapes(model_name: str):
    """(cin, cout, kernel, stride, padding, H, W) of each distinct conv, read by hooks."""
    model, seen = zoo.build(model_name), {}

    def hook(m, inputs, _):
        h, w = inputs[0].shape[2:]
        seen[(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, h, w)] = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, zoo.input_size(model_name), zoo.input_size(model_name)))
    return list(seen)


SHAPES = [(name, s) for name in ("resnet50", "googlenet") for s in conv_shapes(name)]


def _id(item):
    name, (cin, cout, k, s, p, h, w) = item
    return f"{name}-{cin}x{h}x{w}-{cout}-{k[0]}x{k[1]}s{s[0]}"


def _bound_candidates(monkeypatch):
    """CNNFUSE_BENCH_CANDIDATES=N: the Triton configs timed per shape cut to N, the default
    pick first (cnnfuse.bench.static.bounded_candidates)."""
    limit = int(os.environ.get("CNNFUSE_BENCH_CANDIDATES", "0"))
    if limit > 0:
        from cnnfuse.bench.static import bounded_candidates
        from cnnfuse.kernels import conv2d as kernel
        monkeypatch.setattr(kernel, "candidate_configs",
                            lambda *args, **kw: bounded_candidates(*args, limit=limit, **kw))


@pytest.mark.parametrize("provider", ["cudnn", "cudnn_conv_only", "cnnfuse", "cnnfuse_triton",
                                      "cnnfuse_triton_pointer"])
@pytest.mark.parametrize("batch", [1, 128], ids=["b1", "b128"])
@pytest.mark.parametrize("layer", SHAPES, ids=[_id(s) for s in SHAPES])
def test_conv_bn_relu(layer, batch, provider, timed, monkeypatch):
    if provider.startswith("cnnfuse_triton"):
        monkeypatch.setenv("CNNFUSE_BACKEND", "triton")
        monkeypatch.setenv("CNNFUSE_AUTOTUNE", "0")
        if provider == "cnnfuse_triton_pointer":  # the same pick with TMA off: its A/B
            monkeypatch.setenv("CNNFUSE_TMA", "0")
    elif provider == "cnnfuse":
        _bound_candidates(monkeypatch)
    _, (cin, cout, k, stride, pad, h, w) = layer
    dev, dt = "cuda", torch.float16
    x = torch.randn(batch, cin, h, w, device=dev, dtype=dt).contiguous(
        memory_format=torch.channels_last)
    conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False).to(dev, dt, memory_format=torch.channels_last)
    bn = zoo.randomize_batchnorm(nn.BatchNorm2d(cout)).to(dev, dt).eval()
    from cnnfuse.models import FusedConv2d
    fused = FusedConv2d.from_conv(conv)
    fused.fold_bn(bn)
    fused.activation = "relu"
    fns = {"cudnn": lambda: F.relu(bn(conv(x))), "cudnn_conv_only": lambda: conv(x),
           "cnnfuse": lambda: fused(x), "cnnfuse_triton": lambda: fused(x),
           "cnnfuse_triton_pointer": lambda: fused(x)}
    with torch.no_grad():
        y = fns[provider]()
        replay = graph_callable(fns[provider])
    flops = 2 * batch * y.shape[2] * y.shape[3] * cout * cin * k[0] * k[1]
    moved = 2 * (x.numel() + y.numel() + conv.weight.numel())
    timed(replay, flops, moved)
