"""Conv -> BatchNorm -> activation: each Conv2d becomes a FusedConv2d, the BatchNorm2d that
alone reads it is folded into its weights (with or without conv bias or BN affine, timm's
BatchNormAct2d included) and the activation after that moves into its epilogue.

One rule serves both places a chain can be seen: the FX graph (a conv node and its sole
readers) and the module tree (neighbours in a Sequential, where FX cannot trace)."""
from typing import Optional

import torch
from torch import fx, nn

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..modules.conv2d_same import FusedConv2dSame, SamePad
from ..patterns import activation_of_module, activation_of_node, identity_at_inference
from ..report import FusionReport
from .leftover_act import activation_module_name, kept_reason

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(conv: nn.Conv2d) -> Optional[str]:
    """Why `conv` cannot become a FusedConv2d, or None."""
    if type(conv).forward is not nn.Conv2d.forward:
        return (f"{type(conv).__name__} has a forward of its own (e.g. padding that depends "
                "on the input size); kept as is")
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zeros padding is fused)"
    if conv.weight.dtype not in DTYPES:
        return f"weight dtype {conv.weight.dtype}"
    return None


def kept_activation(bn: nn.Module) -> Optional[nn.Module]:
    """For a BatchNorm + activation module (timm's BatchNormAct2d) whose activation no
    epilogue computes yet (LeakyReLU, ...): that activation module, which may stay after the
    conv the BatchNorm folds into. None otherwise."""
    if type(bn) is nn.BatchNorm2d or not bn.track_running_stats or bn.running_mean is None:
        return None
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    extras = {name for name, _ in bn.named_children()} - {"act", "drop"}
    if (not isinstance(act, nn.Module) or extras or isinstance(act, nn.Identity)
            or activation_of_module(act) is not None
            or not (drop is None or identity_at_inference(drop))):
        return None
    # The subclass's forward must be BatchNorm, then drop, then act (timm's order).
    return act if type(bn).__name__ in ("BatchNormAct2d", "FrozenBatchNormAct2d") else None


def bn_epilogue(bn: nn.Module) -> tuple[Optional[str], Optional[str]]:
    """(activation folded along with `bn`, reason it cannot fold); activation 'none' if plain."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None, "BatchNorm without running statistics (track_running_stats=False)"
    if type(bn) is nn.BatchNorm2d:
        return "none", None
    # BatchNorm + dropout + activation in one module (timm's BatchNormAct2d).
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    extras = {name for name, _ in bn.named_children()} - {"act", "drop"}
    act_name = "none" if isinstance(act, nn.Identity) else (
        activation_of_module(act) if act is not None else None)
    drop_ok = drop is None or identity_at_inference(drop)
    if act is None or act_name is None or extras or not drop_ok:
        return None, f"{type(bn).__name__} with behaviour beyond BatchNorm + activation"
    return act_name, None


class _Chain:
    """What reads a conv's output, one step at a time: `batchnorm()` and `activation()` look
    at the next step, `take()` removes the step last looked at (it is now in the conv)."""

    def batchnorm(self) -> Optional[tuple]:
        """(BatchNorm module, its site, reason it cannot fold here or None), or None."""
        raise NotImplementedError

    def activation(self) -> Optional[str]:
        raise NotImplementedError

    def take(self) -> None:
        raise NotImplementedError

    def replace(self, module: nn.Module) -> None:
        """The step last looked at now computes `module` (on the conv's output)."""
        raise NotImplementedError


class GraphChain(_Chain):
    """The sole readers of a conv node, in an FX graph."""

    def __init__(self, g: FusionGraph, node: fx.Node):
        self.g, self.node, self._next = g, node, None

    def batchnorm(self):
        user = self.g.sole_user(self.node)
        bn = self.g.module(user) if user is not None else None
        if not isinstance(bn, nn.BatchNorm2d) or len(user.args) != 1 or user.kwargs:
            return None
        self._next = user
        calls = self.g.calls[user.target]
        return bn, self.g.site(user), (
            f"BatchNorm module is called at {calls} places" if calls > 1 else None)

    def activation(self):
        user = self.g.sole_user(self.node)
        act = activation_of_node(user, self.g.modules) if user is not None else None
        self._next = user if act is not None else None
        return act

    def take(self):
        self.g.absorb(self._next, self.node)

    def replace(self, module):
        self.g.replace_module(self._next.target, module)


class SequentialChain(_Chain):
    """The modules after a conv in a plain Sequential (the tree path)."""

    def __init__(self, seq: nn.Sequential, prefix: str, index: int):
        self.seq, self.prefix, self.names, self.i = seq, prefix, list(seq._modules), index + 1

    def _peek(self):
        return self.seq._modules[self.names[self.i]] if self.i < len(self.names) else None

    def batchnorm(self):
        bn = self._peek()
        return (bn, self.prefix + self.names[self.i], None) if isinstance(
            bn, nn.BatchNorm2d) else None

    def activation(self):
        m = self._peek()
        return activation_of_module(m) if m is not None else None

    def take(self):
        self.seq._modules[self.names[self.i]] = nn.Identity()
        self.i += 1

    def replace(self, module):
        self.seq._modules[self.names[self.i]] = module
        self.i += 1


def absorb_activation(fused: FusedConv2d, chain: _Chain, report: FusionReport) -> bool:
    """The activation that next reads the conv moves into its epilogue."""
    act = chain.activation()
    if act is None:
        return False
    fused.activation = act
    chain.take()
    report.add(f"activation {act}")
    return True


def absorb_followers(fused: FusedConv2d, chain: _Chain, report: FusionReport) -> None:
    """Fold the BatchNorm that reads the conv, then absorb the activation after it."""
    found = chain.batchnorm()
    if found is not None:
        bn, site, reason = found
        act, why = bn_epilogue(bn)
        kept = kept_activation(bn) if why else None
        reason = reason or (None if kept is not None else why)
        if reason is None and bn.num_features != fused.out_channels:
            reason = f"BatchNorm has {bn.num_features} features, conv {fused.out_channels}"
        if reason:
            report.skip(site, reason)
            return
        fused.fold_bn(bn)
        report.add("batchnorm folded")
        if kept is not None:  # the activation stays, as a module in the BatchNorm's place
            chain.replace(kept)
            return
        fused.activation = act
        chain.take()
        if act != "none":
            report.add(f"activation {act}")
    if fused.activation == "none":
        absorb_activation(fused, chain, report)


def run(g: FusionGraph) -> None:
    for node in g.modules_of(nn.Conv2d):
        conv = g.modules[node.target]
        reason = unsupported(conv)
        if reason is None and g.calls[node.target] > 1:
            reason = f"module is called at {g.calls[node.target]} places"
        if reason is None and (len(node.args) != 1 or node.kwargs):
            reason = "called with extra arguments"
        if reason:
            g.report.skip(g.site(node), reason)
            continue
        fused = FusedConv2d.from_conv(conv)
        g.replace_module(node.target, fused)
        g.report.add("conv")
        absorb_followers(fused, GraphChain(g, node), g.report)


def run_sequential(seq: nn.Sequential, report: FusionReport, prefix: str) -> None:
    """The same rule over neighbours in a Sequential whose children are already fused; the
    BatchNorms and activations left among them are listed."""
    _same_padding_in_sequential(seq, report)
    for i, name in enumerate(list(seq._modules)):
        conv = seq._modules[name]
        if isinstance(conv, FusedConv2d) and not conv.folded_bn and conv.activation == "none":
            absorb_followers(conv, SequentialChain(seq, prefix, i), report)
    for name, m in seq._modules.items():
        act = activation_module_name(m)
        if act:
            report.skip(prefix + name, kept_reason(act, m, activation_of_module(m) is not None),
                        kind="activation")
        elif isinstance(m, nn.BatchNorm2d):
            why = bn_epilogue(m)[1]
            report.skip(prefix + name, f"{why}; kept" if why else
                        "BatchNorm not directly after a conv; kept")


def _same_padding_in_sequential(seq: nn.Sequential, report: FusionReport) -> None:
    """What conv_subclasses made of a Conv2dSame (SamePad, then a conv) merged back into one
    FusedConv2dSame: as neighbours, or as a child Sequential of just the two (already merged
    by this rule, so the conv takes its place here and the BatchNorm after it can fold)."""
    names = list(seq._modules)
    for name, after in zip(names, names[1:]):
        pad, conv = seq._modules[name], seq._modules[after]
        if (isinstance(pad, SamePad) and type(conv) is FusedConv2d and not any(conv.padding)
                and (conv.kernel_size, conv.stride, conv.dilation)
                == (pad.kernel_size, pad.stride, pad.dilation)):
            seq._modules[name] = nn.Identity()
            seq._modules[after] = FusedConv2dSame.from_fused(conv)
            report.add("tf 'same' padding in the conv")
    for name in names:
        child = seq._modules[name]
        if type(child) is nn.Sequential and len(child) == 2 and isinstance(
                child[0], nn.Identity) and isinstance(child[1], FusedConv2dSame):
            seq._modules[name] = child[1]
