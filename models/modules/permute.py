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
    dtype and device), as F.channel_shuffle returns. Another rank (N, C, *) is what
    torch.channel_shuffle computes. Raises ValueError for fewer than 3 dims or groups that
    do not divide C."""
    if x.dim() < 3:
        raise ValueError(f"interleave: x must be (N, C, *), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if groups < 1 or c % groups:
        raise ValueError(f"interleave: {c} channels do not split into {groups} groups")
    if x.dim() != 4:
        return torch.channel_shuffle(x, c // groups if inverse else groups)
    n, c, h, w = x.shape
    g = c // groups if inverse else groups
    out = torch.empty_like(x)
    # out[:, b·g + a] = x[:, a·(c/g) + b]: both splits of dim 1 are views in either layout
    out.view(n, c // g, g, h, w).copy_(x.reshape(n, g, c // g, h, w).transpose(1, 2))
    return out


@fx.wrap
def unpermute_residual(r, groups: int, inverse: bool, channels: int):
    """P⁻¹(r) for the residual r of P(x) + r, x (N, channels, H, W) and P the interleave of
    `groups` (`inverse` as for interleave_channels): r broadcasts against x, so its channel
    axis is the third from the end; one of size 1, or none (fewer than 3 dims, a number),
    is the same for every channel and r is returned as it is. Raises ValueError for a
    channel axis of another size (the add fails in eager too) or more than 4 dims (the sum
    would have another channel axis)."""
    if not isinstance(r, torch.Tensor) or r.dim() < 3 or r.shape[-3] == 1:
        return r
    if r.dim() > 4 or r.shape[-3] != channels:
        raise ValueError(f"residual of shape {tuple(r.shape)} does not broadcast against "
                         f"(N, {channels}, H, W) channel by channel")
    if r.dim() == 4:
        return interleave_channels(r, groups, not inverse)
    index = torch.argsort(interleave_index(channels, groups, inverse)).to(r.device)
    return r.index_select(0, index)
