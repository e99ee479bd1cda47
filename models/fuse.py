"""cnnfuse.fuse: swap fused modules into an eval-mode model.

The passes (`passes/`, in the order `passes.PIPELINE` declares) run on an FX graph of the
largest module that traces: the whole model when it can, else each child in turn (the module
tree), so a model with one untraceable block still fuses everywhere else. Where only the tree
is seen, conv -> BatchNorm -> activation neighbours in a Sequential still fuse, by the same
rule the graph pass applies.

A module whose forward has defaulted arguments (`forward(self, x, skip=None)`) is not traced
as a whole: FX would trace one way of calling it (`skip` a tensor, `if skip is not None` baked
in as true) and the fused module would fail or differ when called the other way. Its children
are fused instead. Hook-based reparametrisations (spectral_norm, weight_norm) are replaced by
the weight they compute (`reparam`).
"""
import functools
import inspect
import operator
import re
from typing import Optional

import torch
from torch import fx, nn

from . import passes
from .graph import FusionGraph
from .modules import FusedConv2d
from .modules.precision import fits
from .passes import conv_bn_act, conv_subclasses, functional_conv, layout
from .reparam import deepcopy_model, take_effective_weights
from .report import FusionReport
from ..backend import warn_once


class _InPlaceProxy(fx.Proxy):
    """FX's Proxy has no in-place operators, so `x += y` traces as `x = x + y`: the write
    into x (and every view of it) is lost. These record operator.iadd & co., which the
    passes treat as writes and the generated code runs as `x += y`."""

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _inplace(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
              "ixor", "ilshift", "irshift", "imatmul"):
    setattr(_InPlaceProxy, f"__{_name}__", _inplace(getattr(operator, _name)))


class _Tracer(fx.Tracer):
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # BatchNorm subclasses (timm's BatchNormAct2d) stay whole so they can be folded, and
        # timm's activation modules (Mish, Swish, ...) whole so they are matched by type (by
        # type only: during the trace their parameters are proxies).
        if isinstance(m, (FusedConv2d, nn.BatchNorm2d)) or type(m).__module__.startswith(
                "timm.layers.activations"):
            return True
        return super().is_leaf_module(m, qualname)


def fuse(model: nn.Module, *, dtype: Optional[torch.dtype] = None,
         memory_format: Optional[torch.memory_format] = torch.channels_last,
         inplace: bool = False, picks=None) -> nn.Module:
    """A fused copy of an eval-mode `model` (the model itself when inplace=True).

    The result computes the same function with folded BatchNorm and fused epilogues; it is
    inference-only: calling .train() on it does not bring BatchNorm back. Called with a
    contiguous (NCHW) input it returns its outputs contiguous, as the original does; with a
    channels_last input, channels_last. A conv whose folded weights would leave `dtype`'s
    range or precision keeps them in float32 (logged once; `explain(model, dtype=...)`
    lists them). torch.jit.script is not supported (TypeError): use torch.jit.trace or
    torch.export.

    picks: a picks file from cnnfuse.tune(save=PATH), for the autotuner to consult first in
    this process (cnnfuse.use_picks; ignored with a log line if made on another GPU or with
    other versions).

    Raises TypeError for a non-Module `model` or an unsupported `dtype`, ValueError for a
    model in training mode or a `picks` path that is not a readable picks file.
    """
    if dtype is not None and dtype not in conv_bn_act.DTYPES:
        raise TypeError(f"dtype must be one of {conv_bn_act.DTYPES}, got {dtype}")
    if picks is not None:
        from ..tune import use_picks
        use_picks(picks)
    fused, _ = _fuse(model, inplace)
    if dtype is not None:
        fused = fused.to(dtype)
        wide = _float32_weights(fused, dtype)
        if wide:
            warn_once(f"fuse: {len(wide)} conv(s) keep float32 weights, their folded BatchNorm "
                      f"is out of {dtype}'s range or precision: {', '.join(wide[:4])}"
                      f"{', ...' if len(wide) > 4 else ''}")
    if memory_format is not None:
        fused = fused.to(memory_format=memory_format)
    for m in fused.modules():
        if isinstance(m, FusedConv2d):
            m.pack_weight()  # .to(memory_format=...) re-lays out depthwise weights too
    _refuse_script(fused)
    return fused


def explain(model: nn.Module, *, dtype: Optional[torch.dtype] = None) -> FusionReport:
    """What `fuse(model)` fuses, and every site it leaves alone with the reason; with `dtype`,
    also the convs whose folded weights stay float32 in `fuse(model, dtype=dtype)`."""
    fused, report = _fuse(model, inplace=False)
    if dtype is not None:
        wide = _float32_weights(fused, dtype, cast=False)
        if wide:
            report.add(f"conv weights kept float32 ({dtype} range)", len(wide))
            for path in wide:
                report.skip(path, f"folded weights out of {dtype}'s range or precision: "
                                  "kept float32, computed in float32")
    return report


def _float32_weights(fused: nn.Module, dtype: torch.dtype, cast: bool = True) -> list:
    """Paths of the convs whose (folded, merged or scaled) weights stay float32 in a `dtype`
    model (cast: the model is already cast; else whether it would be)."""
    if dtype.itemsize >= 4:
        return []
    return [path for path, m in fused.named_modules() if isinstance(m, FusedConv2d)
            and (m.weight.dtype == torch.float32 if cast else not all(
                fits(p, dtype) for p in (m.weight, m.bias) if p is not None))]


def _script_error(*_args, **_kwargs):
    raise TypeError(
        "torch.jit.script cannot compile a cnnfuse-fused model: its graph calls Python "
        "functions and custom ops with Python dispatch. Use torch.jit.trace(fused, example) "
        "or torch.export.export(fused, (example,)) instead; both keep the fused ops.")


def _refuse_script(fused: nn.Module) -> None:
    """torch.jit.script calls `__prepare_scriptable__` on the module and each submodule
    first: make it say what to use instead of failing deep inside the compiler."""
    for m in fused.modules():
        if m is fused or isinstance(m, fx.GraphModule) or type(m).__module__.startswith(
                "cnnfuse."):
            m.__prepare_scriptable__ = _script_error


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
    target = model if inplace else deepcopy_model(model)
    with torch.no_grad():
        for path, kind in take_effective_weights(target):
            report.add(f"{kind} weight taken at fuse time")
        target = conv_subclasses.run_tree(target, report)
        channels_last = _channels_last_weights(target)
        fused = _edge(_fuse_module(target, report, ""), channels_last)
    return fused, report


def _has_conv(module: nn.Module) -> bool:
    """Whether the module holds a Conv2d or calls F.conv2d itself (on its own parameters, or
    on data): such a call is a conv site too, which the trace takes or explain lists."""
    return (any(isinstance(m, nn.Conv2d) for m in module.modules())
            or any(_calls_conv2d(m) for m in module.modules()))


def _calls_conv2d(module: nn.Module) -> bool:
    """Whether the module's own forward (a class outside torch.nn) traces to an F.conv2d
    call; for a forward FX cannot trace (or one with defaulted arguments, not traced),
    whether its source calls conv2d (_mentions_conv2d)."""
    if type(module).__module__.startswith("torch.") or isinstance(
            module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Conv2d)):
        return False
    if _defaulted_arguments(module):
        return _mentions_conv2d(module)
    try:
        graph = _Tracer().trace(module)
    except Exception:  # FX raises many types for data-dependent Python
        return _mentions_conv2d(module)
    return any(functional_conv.conv_args(node) is not None for node in graph.nodes)


_CONV2D_CALL = re.compile(r"(?<![\w.])(?:(?:torch\.nn\.)?functional|F|torch)\.conv2d\s*\("
                          r"|(?<![\w.])conv2d\s*\(")


def _untraced_conv(module: nn.Module, report: FusionReport, prefix: str) -> None:
    """A module not traced whose own forward calls conv2d: a conv site (one, however many
    calls its source has) that runs eager, listed."""
    if _calls_conv2d(module):
        report.conv_sites += 1
        report.skip(prefix.rstrip(".") or "<model>", "calls conv2d in a forward that is not "
                    "traced (see untraceable): runs eager")


def _mentions_conv2d(module: nn.Module) -> bool:
    """Whether the source of the module's forward calls conv2d (F.conv2d, torch.conv2d, an
    imported conv2d; not a child named conv2d); without source, whether it holds a 4-d
    parameter of its own named as a weight. The evidence for a conv where no trace shows
    one."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return any(p.dim() == 4 and name.endswith("weight")
                   for name, p in module.named_parameters(recurse=False))
    return bool(_CONV2D_CALL.search(source))


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
        _fuse_children(module, report, prefix, edges=False)
        conv_bn_act.run_sequential(module, report, prefix)
        return module
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # no forward: its owner calls them
        _fuse_children(module, report, prefix)
        return module
    defaulted = _defaulted_arguments(module)
    if defaulted:
        report.untraceable.append((prefix.rstrip("."), (
            f"forward has defaulted arguments ({', '.join(defaulted)}): a trace would fix one "
            "way of calling it; its children are fused one by one")[:160]))
        _untraced_conv(module, report, prefix)
        _fuse_children(module, report, prefix)
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # FX raises many types for data-dependent Python
        report.untraceable.append((prefix.rstrip("."), f"{type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}"[:160]))
        _untraced_conv(module, report, prefix)
        _fuse_children(module, report, prefix)
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    fg = FusionGraph(gm, report, prefix)
    fg.model_channels_last = _channels_last_weights(module)
    passes.run_all(fg)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    _restore_containers(gm, module)
    return gm


def _channels_last_weights(module: nn.Module) -> bool:
    """Whether the module's conv weights are channels_last (and not also contiguous): eager
    convolutions then return channels_last whatever the input's layout."""
    return any(m.weight.is_contiguous(memory_format=torch.channels_last)
               and not m.weight.is_contiguous()
               for m in module.modules() if isinstance(m, nn.Conv2d) and m.weight.dim() == 4)


def _defaulted_arguments(module: nn.Module) -> list:
    """`name=default` for each parameter of module.forward that has a default: a call may
    leave it out, and FX traces every parameter as given."""
    try:
        params = inspect.signature(type(module).forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [f"{p.name}={p.default!r}"[:40] for p in params
            if p.default is not inspect.Parameter.empty]


def _fuse_children(module: nn.Module, report: FusionReport, prefix: str,
                   edges: bool = True) -> None:
    """Fuse each child; with `edges` (the module's own forward runs between them, as Python
    the trace did not see), each fused child returns eager's layout."""
    cl = _channels_last_weights(module)
    for name, child in list(module.named_children()):
        fused = _fuse_module(child, report, f"{prefix}{name}.")
        setattr(module, name, _edge(fused, cl) if edges else fused)


def _edge(module: nn.Module, model_channels_last: bool) -> nn.Module:
    """A fused module whose outputs reach code that was not traced (the caller, or a
    forward FX could not trace) returns them in eager's layout (passes.layout): a hook, so
    the module keeps its type and indexing. Traced graphs restore it themselves."""
    if isinstance(module, fx.GraphModule) or not any(
            type(m).__module__.startswith("cnnfuse.") for m in module.modules()):
        return module
    if not getattr(module, "_cnnfuse_layout_hook", False):
        module.register_forward_hook(functools.partial(_restore_layout, model_channels_last))
        module._cnnfuse_layout_hook = True
    return module


def _restore_layout(model_channels_last: bool, module, inputs, output):
    like = inputs[0] if inputs else None
    if isinstance(output, (tuple, list)):
        return type(output)(layout.eager_layout(o, like, model_channels_last, True)
                            for o in output)
    return layout.eager_layout(output, like, model_channels_last, True)


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
