"""The per-op profiler on the CPU: it sees every fused op with the module that called it, the
backend that ran it and the FLOPs FlopCounterMode counts for the unfused model."""
import json

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import cnnfuse
from cnnfuse import backend
from cnnfuse.bench import profile

from ..util import randomize_batchnorm


def _fused_resnet18():
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return model, cnnfuse.fuse(model), x


def test_every_fused_conv_is_seen_once_per_call():
    model, fused, x = _fused_resnet18()
    ops = profile.record(fused, x)
    convs = [op for op, func, *_ in ops if func.namespace == "cnnfuse"]
    n_fused = sum(isinstance(m, cnnfuse.FusedConv2d) for m in fused.modules())
    assert sum(op.calls for op in convs) == n_fused == 20
    names = {m for op in convs for m in op.modules}
    assert {"conv1", "layer1.0.conv1", "layer4.1.conv2", "layer2.0.downsample.0"} <= names
    assert all(op.backend == "reference" for op in convs)
    # Distinct ops by layout: layer1's four 3x3 convs share one line (with and without +res).
    assert {op.calls for op in convs if "64→64 @8x8" in op.what} == {2}


def test_flops_match_the_unfused_model():
    model, fused, x = _fused_resnet18()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    ops = profile.record(fused, x)
    assert sum(op.flops * op.calls for op, *_ in ops) == counter.get_total_flops()


def test_profile_sorts_by_total_time_and_names_the_backend(backend):
    backend("cuda")  # the CPU build of the C++ kernels
    model = randomize_batchnorm(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    fused = cnnfuse.fuse(model)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ops, total = profile.profile(fused, x, iters=10)
    times = [op.ms for op in ops]
    assert times == sorted(times, reverse=True) and all(t > 0 for t in times) and total > 0
    labels = {op.backend for op in ops if op.what.startswith("dw ")}  # depthwise + 1x1
    assert labels == {"two ops (CPU build)"}
    labels = {op.backend for op in ops if op.what.startswith("conv 1x1")}
    assert labels == {"PyTorch conv + bias_act (CPU build)"}
    assert any(op.backend == "PyTorch (CPU)" and op.what.startswith("addmm") for op in ops)
    assert all(op.floor_ms > 0 for op in ops)


def test_tracing_collects_only_inside_the_block():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with backend.tracing() as trace:
        cnnfuse.ops.conv2d(x, w, padding=1)
        with backend.tracing() as inner:
            cnnfuse.ops.conv2d(x, w, padding=1)
    cnnfuse.ops.conv2d(x, w, padding=1)
    assert trace == [("conv2d", "reference")] and inner == [("conv2d", "reference")]


def test_main_writes_json(tmp_path, capsys):
    assert profile.main(["--model", "squeezenet1_1", "--batch", "8", "--top", "5",
                         "--iters", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU" in out and "distinct ops" in out
    doc = json.loads((tmp_path / "profile_squeezenet1_1_b2_fp32.json").read_text())
    assert doc["kind"] == "cnnfuse.profile" and doc["batch"] == 2
    # SqueezeNet 1.1's 26 convs: 23 alone, 3 paired with the ceil-mode max pool before them
    convs = sum(op["calls"] for op in doc["ops"] if op["what"].startswith("conv"))
    paired = sum(op["calls"] for op in doc["ops"] if " pool " in f" {op['what']}"
                 and "+ 1x1" in op["what"])
    assert (convs, paired) == (23, 3), doc["ops"]
    assert abs(sum(op["share"] for op in doc["ops"]) - sum(op["ms"] for op in doc["ops"])
               / doc["total_ms"]) < 1e-9
