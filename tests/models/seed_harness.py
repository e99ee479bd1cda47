"""Checks shared by the seed-architecture tests (cnnfuse.models.architectures): the fused model
against the unfused one computed in float64, at several input sizes, and what explain says."""
from dataclasses import dataclass

import torch
from torch import nn

import cnnfuse

from ..util import assert_within_torch_error, randomize_batchnorm, relative_error
from .harness import FP32_TOLERANCE

# How a BatchNorm leaves the model, as explain counts it: gone (into a conv's weights, its
# load stage, or the convs of a concatenation's slices), or run as one affine + activation pass.
FOLDED, IN_LOAD = "batchnorm folded", "batchnorm + act in conv's load"
GONE = (FOLDED, IN_LOAD, "batchnorm folded into concat slices")
ALONE = "batchnorm + act as one pass"


@dataclass
class SeedResult:
    report: object         # cnnfuse.explain(model)
    fused: nn.Module       # cnnfuse.fuse(model)
    batchnorms: int        # BatchNorm2d layers in the model
    folded: int            # of them gone from the fused model (any of GONE)
    alone: int             # of them run as one affine + activation pass
    kept: list             # names of the BatchNorm2d layers still in the fused model


def check_seed(model: nn.Module, sizes, batch: int = 1,
               memory_format=torch.channels_last) -> SeedResult:
    """Fuse `model` (BatchNorm statistics randomised, eval mode) once and check, at each
    input size, its fp32 logits against the unfused model's in float64: within 2x the unfused
    fp32 model's own error (+ a 1e-5 relative atol) and within the project's fp32 tolerance.
    Also: every Conv2d replaced by a fused module, and every BatchNorm accounted for: folded
    (into weights, a load stage or concat slices), one pass of its own, or left in the fused
    model and listed by explain. The fused model is made with `memory_format` and fed inputs
    in it (NCHW for None). `model` ends in float64 (converted in place rather than copied:
    these models are large)."""
    model = randomize_batchnorm(model).eval()
    fused = cnnfuse.fuse(model, memory_format=memory_format)
    report = cnnfuse.explain(model)
    xs = [torch.randn(batch, 3, size, size) for size in sizes]
    with torch.no_grad():
        same = [model(x) for x in xs]
        layout = memory_format or torch.contiguous_format
        got = [fused(x.contiguous(memory_format=layout)) for x in xs]
        model.double()
        want = [model(x.double()) for x in xs]
    for size, ours, theirs, ref in zip(sizes, got, same, want):
        assert ours.shape == ref.shape, (size, ours.shape, ref.shape)
        assert_within_torch_error(ours, theirs, ref)
        err = relative_error(ours, ref)
        assert err < FP32_TOLERANCE, f"size {size}: fused logits off by {err:.2e} (relative)"
    plain = [name for name, m in fused.named_modules() if isinstance(m, nn.Conv2d)]
    assert report.coverage == 1.0 and not plain, f"{plain}\n{report}"
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    kept = [name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    folded, alone = sum(report.fused[k] for k in GONE), report.fused[ALONE]
    assert folded + alone + len(kept) == batchnorms, str(report)
    listed = {site for site, _ in report.unfused}
    assert set(kept) <= listed, f"kept but not listed by explain: {set(kept) - listed}"
    return SeedResult(report, fused, batchnorms, folded, alone, kept)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
