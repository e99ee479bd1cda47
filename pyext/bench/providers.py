"""The providers every benchmark compares, built the same way for the main job and bench/.

    cudnn             PyTorch eager (cuDNN convs, BN and activations as separate kernels)
    cudnn_folded      eager after torch.fx.experimental.optimization.fuse folds conv + BN:
                      the fair cuDNN baseline a careful user makes by hand
    inductor          torch.compile with freezing
    cnnfuse           cnnfuse.fuse
    cnnfuse+inductor  torch.compile (freezing) of the fused model

All run in the same dtype and channels_last, from a CPU fp32 eval model that stays untouched.
`prepare` warms a provider up, checks its logits, measures its steady-state peak memory and
captures it in a CUDA graph, so that every provider is timed under identical conditions.
"""
import copy
import gc
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

PROVIDERS = ("cudnn", "cudnn_folded", "inductor", "cnnfuse", "cnnfuse+inductor")

# Max |logits − fp64 logits| / max |fp64 logits| a cnnfuse provider may show before timing.
TOLERANCE = {torch.float16: 3e-2, torch.bfloat16: 8e-2, torch.float32: 1e-3}
_CHECKED_ROWS = 16  # images whose logits are compared (the fp64 reference is slow)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Conv + BN folding with PyTorch's own FX pass, per submodule where the whole does not
    trace."""
    from torch.fx.experimental import optimization
    try:
        return optimization.fuse(model, inplace=True)
    except Exception:  # noqa: BLE001  (any trace failure: fold the children that do trace)
        for name, child in model.named_children():
            setattr(model, name, fold_batchnorm(child))
        return model


def _compile(module: nn.Module) -> Callable:
    import torch._inductor.config as inductor_config
    # Scoped to this compile: a global setting would leak freezing into the caller's other
    # torch.compile calls, whose parameters it then discards.
    options = {"freezing": True}
    # The module is this provider's own copy: without this, freezing keeps the eager
    # parameters beside the frozen constants and the peak memory counts the weights twice.
    if hasattr(inductor_config, "freezing_discard_parameters"):
        options["freezing_discard_parameters"] = True
    return torch.compile(module, options=options)


def make(provider: str, model: nn.Module, dtype: torch.dtype, device) -> Callable:
    """`provider`'s version of `model` (untouched) on `device` in `dtype`, channels_last."""
    layout = dict(device=device, dtype=dtype, memory_format=torch.channels_last)
    if provider in ("cudnn", "inductor"):
        eager = copy.deepcopy(model).to(**layout)
        return _compile(eager) if provider == "inductor" else eager
    if provider == "cudnn_folded":
        return fold_batchnorm(copy.deepcopy(model)).to(**layout)
    if provider in ("cnnfuse", "cnnfuse+inductor"):
        import cnnfuse
        fused = cnnfuse.fuse(model, dtype=dtype).to(device)
        return _compile(fused) if provider == "cnnfuse+inductor" else fused
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def release() -> None:
    """Free one provider before the next: its memory, and dynamo's compiled code (models of one
    class share a code object, so compiles would otherwise pile up to its recompile limit and
    fall back to eager)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def example_input(batch: int, size: int, dtype: torch.dtype, device, seed: int = 0):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp64 logits of the unfused model for the first rows of x (on x's device)."""
    exact = copy.deepcopy(model).to(device=x.device, dtype=torch.float64)
    return exact(x[:_CHECKED_ROWS].double()).cpu()


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    got = logits[:reference.shape[0]].double().cpu()
    return ((got - reference).abs().max() / reference.abs().max()).item()


@dataclass
class Prepared:
    fn: Callable[[torch.Tensor], torch.Tensor]
    replay: Optional[Callable[[], None]]  # a CUDA graph replay; None on the CPU
    max_rel_error: float
    peak_mem_mb: Optional[float]


@torch.no_grad()
def prepare(provider: str, model: nn.Module, x: torch.Tensor,
            reference: torch.Tensor) -> Prepared:
    """Build, warm up (compiles, autotunes), check the logits, measure peak memory, capture.
    cuDNN picks its algorithms by timing too (cudnn.benchmark), as cnnfuse's autotuner does."""
    from .timing import graph_callable
    cuda = x.device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    fn = make(provider, model, x.dtype, x.device)
    err = relative_error(fn(x), reference)
    if provider.startswith("cnnfuse") and not err <= TOLERANCE[x.dtype]:
        raise AssertionError(f"{provider}: logits off by {err:.2e} (relative) against the "
                             f"unfused fp64 model; tolerance {TOLERANCE[x.dtype]:.0e}")
    if not cuda:
        return Prepared(fn, None, err, None)
    # Steady state: weights plus what one forward keeps alive at once, not the one-off
    # autotuning or compilation buffers.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(x)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return Prepared(fn, graph_callable(lambda: fn(x)), err, peak)
