"""Models by name with random weights and randomised BatchNorm, their input sizes and FLOPs."""
import torch
from torch import nn

# H100 ceilings used for every floor: measured dense fp16/bf16 matmul and copy rates.
PEAK_FLOPS = 790e12
PEAK_BYTES = 3.0e12

# Every architecture cnnfuse targets: torchvision names, timm's as "timm/<name>", and the
# seed classifiers no library ships (cnnfuse.models.architectures) as "cnnfuse/<name>".
ZOO = ("alexnet", "vgg16", "googlenet", "inception_v3", "resnet50", "resnext50_32x4d",
       "densenet121", "squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2",
       "mobilenet_v3_large", "mnasnet1_0", "efficientnet_b0", "timm/inception_v4",
       "timm/inception_resnet_v2", "timm/legacy_xception", "timm/seresnet50",
       "cnnfuse/bn_inception", "cnnfuse/nin", "cnnfuse/igc_l4m32", "cnnfuse/attention56",
       "cnnfuse/attention92")
# A few minutes on one GPU: one model per family that matters most (GEMM-bound, Inception
# branches, depthwise).
QUICK = ("resnet50", "googlenet", "mobilenet_v2")

_INPUT_SIZE = {"inception_v3": 299, "inception_v4": 299, "inception_resnet_v2": 299,
               "legacy_xception": 299, "xception41": 299, "xception65": 299}


def input_size(name: str) -> int:
    return _INPUT_SIZE.get(name.split("/")[-1], 224)


def build(name: str) -> nn.Module:
    """'resnet50' (torchvision), 'timm/inception_v4' or 'cnnfuse/bn_inception' (one of
    cnnfuse.models.architectures.ARCHITECTURES); random weights, eval mode. Raises ValueError
    for an unknown cnnfuse/ name."""
    torch.manual_seed(0)
    if name.startswith("cnnfuse/"):
        from ..models.architectures import ARCHITECTURES
        if name[8:] not in ARCHITECTURES:
            raise ValueError(f"name {name!r}: cnnfuse.models.architectures has "
                             f"{', '.join(sorted(ARCHITECTURES))}")
        model = ARCHITECTURES[name[8:]]()
    elif name.startswith("timm/"):
        import timm
        model = timm.create_model(name[5:], pretrained=False)
    else:
        import torchvision
        kwargs = {"aux_logits": False, "init_weights": False} if name in (
            "googlenet", "inception_v3") else {}
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
    return randomize_batchnorm(model).eval()


def randomize_batchnorm(model: nn.Module, generator: torch.Generator = None) -> nn.Module:
    """Fresh BatchNorm layers are identities and would hide folding bugs."""
    g = generator or torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def flops_per_image(model: nn.Module, size: int) -> float:
    """Multiply-add FLOPs (x2) of one image, counted by PyTorch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    import copy
    meta = copy.deepcopy(model).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, 3, size, size, device="meta"))
    return float(counter.get_total_flops())


def compute_floor_ms(flops: float) -> float:
    return flops / PEAK_FLOPS * 1e3


def min_bytes(model: nn.Module, batch: int, size: int, dtype: torch.dtype) -> float:
    """Reading the weights and the images once: what no schedule, however fused, goes below."""
    params = sum(p.numel() for p in model.parameters())
    return float((params + batch * 3 * size * size) * dtype.itemsize)


def memory_floor_ms(model: nn.Module, batch: int, size: int, dtype: torch.dtype) -> float:
    return min_bytes(model, batch, size, dtype) / PEAK_BYTES * 1e3
