"""cnnfuse.fuse: swap fused modules into an eval-mode model.

The passes (`passes/`, in the order `passes.PIPELINE` declares) run on an FX graph of the
largest module that traces: the whole model when it can, else each child in turn (the module
tree), so a model with one untraceable block still fuses everywhere else. Where only the tree
is seen, conv -> BatchNorm -> activation neighbours in a Sequential still fuse, by the same
rule the graph pass applies.
"""
import copy
from typing import Optional

import torch
from torch import fx, nn

from . import passes
from .graph import FusionGraph
from .modules import FusedConv2d
from .passes import conv_bn_act, conv_subclasses
from .report import FusionReport


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # BatchNorm subclasses (timm's BatchNormAct2d) stay whole so they can be folded.
        if isinstance(m, (FusedConv2d, nn.BatchNorm2d)):
            return True
        return super().is_leaf_module(m, qualname)


def fuse(model: nn.Module, *, dtype: Optional[torch.dtype] = None,
         memory_format: Optional[torch.memory_format] = torch.channels_last,
         inplace: bool = False) -> nn.Module:
    """A fused copy of an eval-mode `model` (the model itself when inplace=True).

    The result computes the same function with folded BatchNorm and fused epilogues; it is
    inference-only: calling .train() on it does not bring BatchNorm back.
    """
    if dtype is not None and dtype not in conv_bn_act.DTYPES:
        raise TypeError(f"dtype must be one of {conv_bn_act.DTYPES}, got {dtype}")
    fused, _ = _fuse(model, inplace)
    if dtype is not None:
        fused = fused.to(dtype)
    if memory_format is not None:
        fused = fused.to(memory_format=memory_format)
    for m in fused.modules():
        if isinstance(m, FusedConv2d):
            m.pack_weight()  # .to(memory_format=...) re-lays out depthwise weights too
    return fused


def explain(model: nn.Module) -> FusionReport:
    """What `fuse(model)` fuses, and every site it leaves alone with the reason."""
    return _fuse(model, inplace=False)[1]


def _fuse(model: nn.Module, inplace: bool):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            "cnnfuse.fuse needs an eval-mode model: BatchNorm is folded with its running "
            "statistics and dropout becomes a no-op, which is only right for inference. Call "
            f"model.eval() first (training-mode modules: {', '.join(training[:3])}"
            f"{', ...' if len(training) > 3 else ''})")
    report = FusionReport(conv_sites=sum(isinstance(m, nn.Conv2d) for m in model.modules()))
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        target = conv_subclasses.run_tree(target, report)
        fused = _fuse_module(target, report, "")
    return fused, report


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _fuse_module(module: nn.Module, report: FusionReport, prefix: str) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        reason = conv_bn_act.unsupported(module)
        if reason:
            report.skip(prefix.rstrip("."), reason)
            return module
        report.add("conv")
        return FusedConv2d.from_conv(module)
    if not _has_conv(module):
        return module
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        # Neighbours in a Sequential are all a graph would show; staying a Sequential keeps
        # `model.features[0]` working.
        _fuse_children(module, report, prefix)
        conv_bn_act.run_sequential(module, report, prefix)
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # FX raises many types for data-dependent Python
        report.untraceable.append((prefix.rstrip("."), f"{type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}"[:160]))
        _fuse_children(module, report, prefix)
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    passes.run_all(FusionGraph(gm, report, prefix))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    _restore_containers(gm, module)
    return gm


def _fuse_children(module: nn.Module, report: FusionReport, prefix: str) -> None:
    for name, child in list(module.named_children()):
        setattr(module, name, _fuse_module(child, report, f"{prefix}{name}."))


def _restore_containers(gm: fx.GraphModule, original: nn.Module) -> None:
    """GraphModule rebuilds the module path of each called leaf from plain nn.Modules; give
    Sequentials and ModuleLists back their type so `fused.layer1[0]` still works. Children the
    passes removed (folded BatchNorm, absorbed activations) become Identity."""
    containers = [(path, m) for path, m in original.named_modules()
                  if path and isinstance(m, (nn.Sequential, nn.ModuleList))]
    for path, old in sorted(containers, key=lambda item: -item[0].count(".")):
        try:
            current = gm.get_submodule(path)
        except AttributeError:
            continue
        if type(current) is not nn.Module:
            continue
        rebuilt = type(old).__new__(type(old))
        nn.Module.__init__(rebuilt)
        for name in old._modules:
            child = current._modules.get(name)
            rebuilt.add_module(name, nn.Identity() if child is None else child)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, rebuilt)
