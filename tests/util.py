"""Shared test helpers: the error bound of the op contract, randomised BatchNorm."""
import os

import pytest
import torch

from cnnfuse.bench.zoo import randomize_batchnorm  # noqa: F401  (re-exported for the tests)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

def triton_runnable() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


needs_triton = pytest.mark.skipif(
    not triton_runnable(),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 set before Python starts")


def _has_cuobjdump() -> bool:
    from cnnfuse.bench import sass
    try:
        sass.cuobjdump()
        return True
    except FileNotFoundError:
        return False


needs_cuobjdump = pytest.mark.skipif(not _has_cuobjdump(), reason="no cuobjdump to read the SASS")


def assert_within_torch_error(ours: torch.Tensor, torch_same: torch.Tensor,
                              ref64: torch.Tensor, atol_scale: float = 1e-5) -> None:
    """|ours - ref64| <= 2 |torch_same_dtype - ref64| + a tiny atol (max over elements)."""
    assert ours.shape == ref64.shape, (ours.shape, ref64.shape)
    assert torch.isfinite(ours).all(), "non-finite values in the result"
    ours_err = (ours.double() - ref64).abs().max().item()
    torch_err = (torch_same.double() - ref64).abs().max().item()
    atol = atol_scale * max(ref64.abs().max().item(), 1.0)
    assert ours_err <= 2 * torch_err + atol, (
        f"error {ours_err:.3e} exceeds 2 x PyTorch's {torch_err:.3e} + {atol:.1e}")


def assert_mean_of(pooled: torch.Tensor, y: torch.Tensor) -> None:
    """pooled is y's mean over height and width, to float32 summation error: the promise of
    every return_pooled (y itself is checked against fp64 as any output is)."""
    assert pooled.dtype == torch.float32 and pooled.shape == y.shape[:2]
    want = y.double().mean((2, 3))
    err = (pooled.double() - want).abs().max().item()
    assert err <= 1e-5 * max(want.abs().max().item(), 1.0), f"pool off by {err:.3e}"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()
