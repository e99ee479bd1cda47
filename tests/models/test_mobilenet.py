"""MobileNet v2/v3 and MnasNet: inverted residuals (1x1 expand, depthwise, 1x1 project + add),
ReLU6 / Hardswish, and v3's squeeze-and-excitation with a hard-sigmoid gate."""
import pytest
import torch

import cnnfuse

from ..util import randomize_batchnorm, relative_error
from .harness import FP32_TOLERANCE, build, check_model

# (source, model, residual adds, activation counts, depthwise + 1x1 pairs: every block whose
# depthwise output goes straight to the project conv, i.e. all but those with an SE gate)
MODELS = [
    ("torchvision", "mobilenet_v2", 10, {"relu6": 35}, 17),
    ("torchvision", "mobilenet_v3_small", 6, {"hardswish": 18, "relu": 14, "hardsigmoid": 9}, 2),
    ("torchvision", "mobilenet_v3_large", 10, {"hardswish": 20, "relu": 19, "hardsigmoid": 8},
     7),
    ("torchvision", "mnasnet1_0", 10, {"relu": 35}, 17),
    ("timm", "mobilenetv2_100", 10, {"relu6": 35}, 17),
]


@pytest.mark.parametrize("source, name, adds, acts, separable", MODELS,
                         ids=[f"{m[0]}-{m[1]}" for m in MODELS])
def test_fuse(source, name, adds, acts, separable):
    report = check_model(build(source, name), size=64)
    assert report.coverage == 1.0, str(report)
    assert report.fused["residual add"] == adds
    assert report.fused["depthwise + 1x1 in one op"] == separable
    for act, count in acts.items():
        assert report.fused[f"activation {act}"] == count, str(report)
    se = acts.get("hardsigmoid", 0)  # v3's SE gates
    assert report.fused["se gate"] == report.fused["se scale in next conv"] == se
    assert report.fused["se pool in conv epilogue"] == se


def test_mobilenet_v2_on_the_cpp_kernels(backend):
    """The whole model through the CPU build of the CUDA C++ kernels: depthwise convs on the
    depthwise kernel, the others on PyTorch's conv + the bias_act epilogue."""
    backend("cuda")
    model = randomize_batchnorm(build("torchvision", "mobilenet_v2")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = cnnfuse.fuse(model)(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < FP32_TOLERANCE
