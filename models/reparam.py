"""Reparametrised weights at fuse time: the hook-based `torch.nn.utils.spectral_norm` and
`weight_norm` recompute a module's `weight` in a forward pre-hook, so the stored `weight` is
stale until the next forward (after `load_state_dict`, say) and, for weight_norm, a non-leaf
tensor that `copy.deepcopy` refuses. Fusing reads weights once, so the hook's computation runs
once here (in eval mode: no power iteration) and the hook is removed, leaving `weight` a plain
parameter of the effective value. (`torch.nn.utils.parametrizations` computes `weight` on each
access and needs nothing.)"""
import copy
import sys

import torch
from torch import nn
import torch.nn.utils  # noqa: F401  (loads the hook classes)

_SpectralNorm = sys.modules["torch.nn.utils.spectral_norm"].SpectralNorm
_WeightNorm = sys.modules["torch.nn.utils.weight_norm"].WeightNorm


def deepcopy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also copies the non-leaf tensors a weight_norm hook leaves as plain
    attributes (recomputed from the copied g and v by `take_effective_weights`)."""
    memo = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def reparametrised(model: nn.Module) -> list:
    """(module path, hook kind) of every module whose weight a spectral_norm or weight_norm
    forward pre-hook computes."""
    found = []
    for path, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, (_SpectralNorm, _WeightNorm)):
                found.append((path, type(hook).__name__))
    return found


@torch.no_grad()
def take_effective_weights(model: nn.Module) -> list:
    """Replace each spectral_norm / weight_norm hook in `model` by the weight it computes now
    (eval mode: spectral norm's stored singular vectors, no power iteration); returns (module
    path, hook kind) for each one removed."""
    done = []
    for path, m in model.named_modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, _SpectralNorm):
                nn.utils.remove_spectral_norm(m, hook.name)
            elif isinstance(hook, _WeightNorm):
                nn.utils.remove_weight_norm(m, hook.name)
            else:
                continue
            done.append((path, type(hook).__name__))
    return done
