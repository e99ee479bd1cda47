"""Conv2d subclasses with a forward of their own, rewritten on the module tree before the trace
(it runs on the model, not on a graph): what they compute, as modules every pass knows.

- timm's Conv2dSame (TensorFlow 'SAME' padding from the input size; its Python arithmetic on
  sizes stops FX) becomes `SamePad` then a zero-padding nn.Conv2d; the last graph pass merges
  the two into one FusedConv2dSame.
- Weight-standardised convs (timm's StdConv2d, ScaledStdConv2d and their 'SAME' variants:
  NFNets, BiT ResNets) standardise an eval-mode constant, so the standardised weight is
  computed once here, in float64, and the conv becomes a plain one folded like any other.

Other subclasses either trace (their F.conv2d is then taken by `functional_conv`) or are kept
and listed by the tree path."""
import weakref
from typing import Optional

import torch
from torch import nn

from ..modules.conv2d_same import SamePad, is_static, same_padding
from ..report import FusionReport

# (not Conv2dSameExport: it keeps the padding of its first call for every later one)
_SAME = ("Conv2dSame",)
_STANDARDISED = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def _timm_class(m: nn.Module, names) -> bool:
    return type(m).__name__ in names and type(m).__module__.startswith("timm.")


def standardised_weight(conv: nn.Conv2d) -> torch.Tensor:
    """timm's weight standardisation of `conv` (per output channel, over C_in/g x kh x kw):
    (w - mean) / sqrt(var + eps), the biased variance as F.batch_norm in training mode takes
    it, times gain * gamma / sqrt(fan_in) for the scaled kinds; in float64, then the weight's
    dtype."""
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    mean, var = w.mean(1, keepdim=True), w.var(1, unbiased=False, keepdim=True)
    out = (w - mean) * torch.rsqrt(var + conv.eps)
    if hasattr(conv, "gain"):
        out = out * (conv.gain.detach().double().reshape(-1, 1) * conv.scale)
    return out.reshape_as(conv.weight).to(conv.weight.dtype)


def _plain(conv: nn.Conv2d, weight: torch.Tensor, padding) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      padding, conv.dilation, conv.groups, conv.bias is not None,
                      conv.padding_mode, device=weight.device, dtype=weight.dtype)
    plain.weight.data = weight.detach().clone()
    if conv.bias is not None:
        plain.bias.data = conv.bias.detach().clone()
    return plain.train(conv.training)


def _dynamic_same(conv: nn.Conv2d) -> bool:
    if _timm_class(conv, _SAME):
        return True
    return bool(getattr(conv, "same_pad", False))  # the Std*Same kinds


def replacement(conv: nn.Conv2d) -> Optional[nn.Module]:
    """What a known Conv2d subclass becomes, or None to leave it as it is."""
    same, std = _timm_class(conv, _SAME), _timm_class(conv, _STANDARDISED)
    if not (same or std):
        return None
    if std and not isinstance(getattr(conv, "eps", None), float):
        return None
    weight = standardised_weight(conv) if std else conv.weight
    if not _dynamic_same(conv):
        return _plain(conv, weight, conv.padding)
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if is_static(k, s, d):  # stride 1: the padding is fixed (asymmetric for an even kernel)
        left, right, top, bottom = same_padding(2 * max(k) * max(d), 2 * max(k) * max(d), k, s, d)
        if (left, top) == (right, bottom):
            return _plain(conv, weight, (top, left))
    return nn.Sequential(SamePad(k, s, d), _plain(conv, weight, 0))


def run_tree(model: nn.Module, report: FusionReport) -> nn.Module:
    """Count the model's BatchNorms for the report; rewrite the known Conv2d subclasses.
    Returns the model (its replacement when the model itself is one)."""
    report.batchnorms += sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    report.root = weakref.ref(model)
    convs = [(parent, name, child) for _, parent in model.named_modules()
             for name, child in parent.named_children() if isinstance(child, nn.Conv2d)]
    if isinstance(model, nn.Conv2d):
        convs.append((None, "", model))
    for parent, name, conv in convs:
        new = replacement(conv) if type(conv).forward is not nn.Conv2d.forward else None
        if new is None:
            continue
        if _timm_class(conv, _STANDARDISED):
            report.add("weight standardised at fuse time")
        if parent is None:
            report.root = weakref.ref(new)
            return new
        setattr(parent, name, new)
    return model
