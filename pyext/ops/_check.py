"""Argument checks shared by the ops: every error names the argument at fault."""
from typing import Optional, Sequence, Union

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor(name: str, t, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; cnnfuse supports float16, bfloat16, float32")


def same_dtype(name: str, t: torch.Tensor, like: torch.Tensor, also=(),
               like_name: str = "x") -> None:
    if t.dtype != like.dtype and t.dtype not in also:
        raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}")


def same_device(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str = "x") -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def pair(name: str, v: Union[int, Sequence[int]], minimum: int) -> list[int]:
    vals = [v, v] if isinstance(v, int) else list(v)
    if len(vals) != 2 or not all(isinstance(i, int) for i in vals) or min(vals) < minimum:
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return vals


def epilogue(x: torch.Tensor, bias, residual, shape: Sequence[int]) -> None:
    """bias (C_out,) in x's dtype or float32, residual shaped like the (N, C_out, H, W) result."""
    if bias is not None:
        tensor("bias", bias, 1)
        same_dtype("bias", bias, x, also=(torch.float32,))
        same_device("bias", bias, x)
        if bias.shape[0] != shape[1]:
            raise ValueError(f"bias has {bias.shape[0]} elements for {shape[1]} output channels")
    if residual is not None:
        tensor("residual", residual, 4)
        same_dtype("residual", residual, x)
        same_device("residual", residual, x)
        if tuple(residual.shape) != tuple(shape):
            raise ValueError(f"residual has shape {tuple(residual.shape)}; the output is "
                             f"{tuple(shape)}")


def out_slice(out, x: torch.Tensor, shape: Sequence[int], offset: int) -> torch.Tensor:
    """The channel slice of `out` that an op with output `shape` writes into."""
    tensor("out", out, 4)
    same_device("out", out, x)
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype} but the result is {x.dtype}")
    n, c, h, w = shape
    if (out.shape[0], out.shape[2], out.shape[3]) != (n, h, w):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected (N={n}, C_total, H={h}, W={w})")
    if not isinstance(offset, int) or offset < 0 or offset + c > out.shape[1]:
        raise ValueError(f"out_channel_offset={offset!r} with {c} channels does not fit in "
                         f"out's {out.shape[1]} channels")
    return out.narrow(1, offset, c)


def activation(name: str, value) -> None:
    """An activation spelling cnnfuse.ref.activation accepts ("relu", "leaky_relu(0.2)", ...);
    the error names the argument."""
    from ..ref.activation import activation_args
    try:
        activation_args(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None
