"""Per layer: every distinct depthwise → 1x1 pair of MobileNetV2 (the depthwise conv and the
project conv of each inverted residual), at batch 1 and 128, fp16 NHWC.

Providers: `cudnn` runs depthwise conv + BN + ReLU6, then 1x1 conv + BN, as PyTorch eager
does; `cnnfuse_two_ops` the two fused convs one after the other (C++ depthwise, then the 1x1
on its best backend); `cnnfuse` `separable_conv2d`, which the autotuner runs as one kernel
where that is faster. All in CUDA graphs. The floor counts the depthwise output as never
written: the point of the fusion.
"""
import pytest
import torch
from torch import nn

from cnnfuse import ops
from cnnfuse.bench import zoo
from cnnfuse.bench.timing import graph_callable
from cnnfuse.models import FusedConv2d


def separable_pairs(model_name: str):
    """(c, k, dw kernel, stride, padding, H, W) of each distinct depthwise → 1x1 pair."""
    model, seen = zoo.build(model_name), {}
    shapes = {}

    def hook(m, inputs, _):
        shapes[m] = tuple(inputs[0].shape[2:])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for m in convs:
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, zoo.input_size(model_name), zoo.input_size(model_name)))
    for dw, pw in zip(convs, convs[1:]):
        if dw.groups == dw.in_channels == dw.out_channels and pw.kernel_size == (1, 1) \
                and pw.in_channels == dw.out_channels:
            seen[(dw.in_channels, pw.out_channels, dw.kernel_size, dw.stride, dw.padding,
                  *shapes[dw])] = None
    return list(seen)


SHAPES = separable_pairs("mobilenet_v2")


def _id(s):
    c, k, ks, st, _, h, w = s
    return f"mobilenet_v2-{c}x{h}x{w}-dw{ks[0]}x{ks[1]}s{st[0]}-{k}"


@pytest.mark.parametrize("provider", ["cudnn", "cnnfuse_two_ops", "cnnfuse"])
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("layer", SHAPES, ids=[_id(s) for s in SHAPES])
def test_dw_project(layer, batch, provider, timed):
    c, k, ks, stride, pad, h, w = layer
    dev, dt = "cuda", torch.float16
    x = torch.randn(batch, c, h, w, device=dev, dtype=dt).contiguous(
        memory_format=torch.channels_last)
    dw = nn.Conv2d(c, c, ks, stride, pad, groups=c, bias=False).to(dev, dt)
    pw = nn.Conv2d(c, k, 1, bias=False).to(dev, dt, memory_format=torch.channels_last)
    bn1 = zoo.randomize_batchnorm(nn.BatchNorm2d(c)).to(dev, dt).eval()
    bn2 = zoo.randomize_batchnorm(nn.BatchNorm2d(k)).to(dev, dt).eval()
    fdw, fpw = FusedConv2d.from_conv(dw), FusedConv2d.from_conv(pw)
    fdw.fold_bn(bn1)
    fdw.activation = "relu6"
    fpw.fold_bn(bn2)
    fns = {
        "cudnn": lambda: bn2(pw(torch.nn.functional.relu6(bn1(dw(x))))),
        "cnnfuse_two_ops": lambda: fpw(fdw(x)),
        "cnnfuse": lambda: ops.separable_conv2d(x, fdw.weight, fdw.bias, fpw.weight, fpw.bias,
                                                fdw.stride, list(fdw.padding),
                                                dw_activation="relu6"),
    }
    with torch.no_grad():
        y = fns[provider]()
        replay = graph_callable(fns[provider])
    oh, ow = y.shape[2:]
    flops = 2 * batch * oh * ow * c * (ks[0] * ks[1] + k)
    moved = 2 * (x.numel() + y.numel() + dw.weight.numel() + pw.weight.numel())
    timed(replay, flops, moved)
