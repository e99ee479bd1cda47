"""End to end at batch 1 and 256, fp16 channels_last, CUDA graphs; providers cuDNN eager,
torch.compile (freezing) and cnnfuse. `-k` selects models (e.g. `-k "mobilenet or efficient"`)."""
import pytest
import torch

import cnnfuse
from cnnfuse.bench import zoo
from cnnfuse.bench.timing import graph_callable

MODELS = ["resnet50", "googlenet", "vgg16", "resnext50_32x4d", "mobilenet_v2", "efficientnet_b0",
          "shufflenet_v2_x1_0"]


@pytest.mark.parametrize("provider", ["cudnn", "inductor", "cnnfuse"])
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("name", MODELS)
def test_model(name, batch, provider, timed):
    size, dt = zoo.input_size(name), torch.float16
    model = zoo.build(name)
    flops = zoo.flops_per_image(model, size) * batch
    if provider == "cnnfuse":
        fn = cnnfuse.fuse(model, dtype=dt).cuda()
    else:
        fn = model.to("cuda", dt, memory_format=torch.channels_last)
        if provider == "inductor":
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
            fn = torch.compile(fn)
    x = torch.randn(batch, 3, size, size, device="cuda", dtype=dt).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        fn(x)
        replay = graph_callable(lambda: fn(x))
    params = sum(p.numel() for p in model.parameters())
    timed(replay, flops, 2 * (x.numel() + params), rounds=20)
