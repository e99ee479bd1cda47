"""Channel permutations as the rewritten graphs call them: the interleave of g groups (the
ShuffleNet shuffle, IGC's P: view(n, g, c / g, h, w) → transpose(1, 2) → view(n, c, h, w)),
in one call that keeps x's memory layout, and its index map for permuting parameters."""
import torch
from torch import fx


def interleave_index(channels: int, groups: int, inverse: bool = False) -> torch.Tensor:
    """perm with interleave(x)[:, i] == x[:, perm[i]]: channel a·(c/g) + b goes to b·g + a
    (the inverse: interleave with c/g groups). Raises ValueError unless groups divides
    channels."""
    if groups < 1 or channels % groups:
        raise ValueError(f"interleave: {channels} channels do not split into {groups} groups")
    g = channels // groups if inverse else groups
    return torch.arange(channels).view(g, channels // g).t().reshape(-1)


@fx.wrap
def interleave_channels(x: torch.Tensor, groups: int, inverse: bool = False) -> torch.Tensor:
    """x (N, C, H, W) with its channels interleaved in `groups` (with C / groups when
    `inverse`, which undoes the interleave of `groups`); a new tensor in x's layout (x's
    dtype and device). Raises ValueError for a non-4-d x or groups that do not divide C."""
    if x.dim() != 4:
        raise ValueError(f"interleave: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if groups < 1 or c % groups:
        raise ValueError(f"interleave: {c} channels do not split into {groups} groups")
    g = c // groups if inverse else groups
    out = torch.empty_like(x)
    # out[:, b·g + a] = x[:, a·(c/g) + b]: both splits of dim 1 are views in either layout
    out.view(n, c // g, g, h, w).copy_(x.reshape(n, g, c // g, h, w).transpose(1, 2))
    return out
