"""Per layer: every distinct pool → 1x1 conv pair of GoogLeNet and Inception-v3 (each block's
pool projection, and v3's stem), at batch 1 and 128, fp16 NHWC.

Providers: `cudnn` runs the pool, then 1x1 conv + BN + ReLU, as PyTorch eager does;
`cnnfuse_two_ops` PyTorch's pool then the fused conv; `cnnfuse` `pool_conv2d`, which the
autotuner runs as one kernel where that is faster. All in CUDA graphs. The floor counts the
pooled tensor as never written: the point of the fusion.
"""
import pytest
import torch
from torch import fx, nn

from cnnfuse import ops
from cnnfuse.bench import zoo
from cnnfuse.bench.timing import graph_callable
from cnnfuse.models import FusedConv2d
from cnnfuse.models.patterns import pool_window
from cnnfuse.ref import pool2d


def pool_projections(model_name: str):
    """(c, k, mode, window, stride, padding, H, W) of each distinct pool → 1x1 conv pair, found
    as `fuse` finds them: a pool whose only reader is a 1x1 conv."""
    model = zoo.build(model_name)
    shapes = {}

    def hook(m, inputs, _):
        shapes[m] = tuple(inputs[0].shape[1:])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, zoo.input_size(model_name), zoo.input_size(model_name)))
    gm = fx.symbolic_trace(model)
    modules, seen = dict(gm.named_modules()), {}
    for node in gm.graph.nodes:
        window = pool_window(node, modules)
        users = list(node.users)
        if window and len(users) == 1 and users[0].op == "call_module":
            conv = modules[users[0].target]
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv in shapes:
                _, mode, kernel, stride, padding = window
                c, h, w = shapes[conv]  # the pool's output: recover its input size
                h = (h - 1) * stride[0] + kernel[0] - 2 * padding[0]
                w = (w - 1) * stride[1] + kernel[1] - 2 * padding[1]
                seen[(c, conv.out_channels, mode, kernel, stride, padding, h, w)] = None
    return list(seen)


SHAPES = [(name, s) for name in ("googlenet", "inception_v3") for s in pool_projections(name)]


def _id(item):
    name, (c, k, mode, kernel, stride, _, h, w) = item
    return f"{name}-{c}x{h}x{w}-{mode}{kernel[0]}s{stride[0]}-{k}"


@pytest.mark.parametrize("provider", ["cudnn", "cnnfuse_two_ops", "cnnfuse"])
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("layer", SHAPES, ids=[_id(s) for s in SHAPES])
def test_pool_projection(layer, batch, provider, timed):
    _, (c, k, mode, kernel, stride, padding, h, w) = layer
    dev, dt = "cuda", torch.float16
    x = torch.randn(batch, c, h, w, device=dev, dtype=dt).contiguous(
        memory_format=torch.channels_last)
    conv = nn.Conv2d(c, k, 1, bias=False).to(dev, dt, memory_format=torch.channels_last)
    bn = zoo.randomize_batchnorm(nn.BatchNorm2d(k)).to(dev, dt).eval()
    fused = FusedConv2d.from_conv(conv)
    fused.fold_bn(bn)
    fused.activation = "relu"
    fns = {
        "cudnn": lambda: torch.relu(bn(conv(pool2d(x, mode, kernel, stride, padding)))),
        "cnnfuse_two_ops": lambda: fused(pool2d(x, mode, kernel, stride, padding)),
        "cnnfuse": lambda: ops.pool_conv2d(x, fused.weight, fused.bias, mode=mode,
                                           kernel_size=kernel, stride=stride, padding=padding,
                                           activation="relu"),
    }
    with torch.no_grad():
        y = fns[provider]()
        replay = graph_callable(fns[provider])
    oh, ow = y.shape[2:]
    flops = 2 * batch * oh * ow * c * k
    moved = 2 * (x.numel() + y.numel() + conv.weight.numel())
    timed(replay, flops, moved)
