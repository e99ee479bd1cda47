"""Per layer: every distinct depthwise conv of MobileNetV2 and EfficientNet-B0, and the grouped
3x3 convs of ResNeXt-50, at batch 1 and 128, fp16 NHWC, with their BN and activation.

Providers: `cudnn` runs conv + BatchNorm + activation as PyTorch eager does; `cudnn_conv_only`
the bare conv; `cnnfuse` the fused op (BN folded, activation in the epilogue: the CUDA C++
depthwise kernel, or the Triton grouped kernel). All in CUDA graphs. The floor is memory:
these layers do a few FLOPs per byte. `test_squeeze_in_epilogue` times EfficientNet-B0's
depthwise convs with the mean of the SE block they feed.
"""
import pytest
import torch
from torch import nn

from cnnfuse.bench import zoo
from cnnfuse.bench.timing import graph_callable
from cnnfuse.models import FusedConv2d
from cnnfuse.ref import apply_activation


def grouped_shapes(model_name: str):
    """(cin, cout, kernel, stride, padding, groups, H, W) of each distinct grouped conv."""
    model, seen = zoo.build(model_name), {}

    def hook(m, inputs, _):
        h, w = inputs[0].shape[2:]
        seen[(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups,
              h, w)] = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, zoo.input_size(model_name), zoo.input_size(model_name)))
    return list(seen)


MODELS = {"mobilenet_v2": "relu6", "efficientnet_b0": "silu", "resnext50_32x4d": "relu"}
SHAPES = [(name, s) for name in MODELS for s in grouped_shapes(name)]


def _id(item):
    name, (cin, cout, k, s, p, g, h, w) = item
    return f"{name}-{cin}x{h}x{w}-{cout}-{k[0]}x{k[1]}s{s[0]}g{g}"


def _layer(layer, batch: int):
    """A random fp16 NHWC input, the conv and a BatchNorm with random statistics."""
    _, (cin, cout, k, stride, pad, groups, h, w) = layer
    dev, dt = "cuda", torch.float16
    x = torch.randn(batch, cin, h, w, device=dev, dtype=dt).contiguous(
        memory_format=torch.channels_last)
    conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False).to(
        dev, dt, memory_format=torch.channels_last)
    bn = zoo.randomize_batchnorm(nn.BatchNorm2d(cout)).to(dev, dt).eval()
    return x, conv, bn


def _fused(conv, bn, act: str, returns_pooled: bool = False) -> FusedConv2d:
    fused = FusedConv2d.from_conv(conv)
    fused.fold_bn(bn)
    fused.activation, fused.returns_pooled = act, returns_pooled
    return fused


@pytest.mark.parametrize("provider", ["cudnn", "cudnn_conv_only", "cnnfuse"])
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("layer", SHAPES, ids=[_id(s) for s in SHAPES])
def test_grouped_bn_act(layer, batch, provider, timed):
    name, (cin, cout, k, _, _, groups, _, _) = layer
    act = MODELS[name]
    x, conv, bn = _layer(layer, batch)
    fused = _fused(conv, bn, act)
    fns = {"cudnn": lambda: apply_activation(bn(conv(x)), act), "cudnn_conv_only": lambda: conv(x),
           "cnnfuse": lambda: fused(x)}
    with torch.no_grad():
        y = fns[provider]()
        replay = graph_callable(fns[provider])
    flops = 2 * batch * y.shape[2] * y.shape[3] * cout * (cin // groups) * k[0] * k[1]
    moved = 2 * (x.numel() + y.numel() + conv.weight.numel())
    timed(replay, flops, moved)


SE_SHAPES = [s for s in SHAPES if s[0] == "efficientnet_b0"]  # every depthwise conv feeds an SE


@pytest.mark.parametrize("provider", ["cudnn", "cnnfuse_then_mean", "cnnfuse"])
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("layer", SE_SHAPES, ids=[_id(s) for s in SE_SHAPES])
def test_squeeze_in_epilogue(layer, batch, provider, timed):
    """The depthwise conv that feeds an SE block, with the SE mean: eager (conv, BN, SiLU, then
    the mean reading the output back), cnnfuse's fused conv then that mean, and cnnfuse with
    the mean summed in the depthwise kernel's epilogue (return_pooled)."""
    _, (_, cout, k, *_) = layer
    x, conv, bn = _layer(layer, batch)
    fused, pooled = _fused(conv, bn, "silu"), _fused(conv, bn, "silu", returns_pooled=True)

    def eager():
        y = apply_activation(bn(conv(x)), "silu")
        return y, y.mean((2, 3), keepdim=True)

    def separate():
        y = fused(x)
        return y, y.mean((2, 3), dtype=torch.float32)
    fns = {"cudnn": eager, "cnnfuse_then_mean": separate, "cnnfuse": lambda: pooled(x)}
    with torch.no_grad():
        y, _ = fns[provider]()
        replay = graph_callable(fns[provider])
    flops = 2 * batch * y.shape[2] * y.shape[3] * cout * k[0] * k[1]
    moved = 2 * (x.numel() + y.numel() + conv.weight.numel())  # the floor reads y no second time
    timed(replay, flops, moved)
