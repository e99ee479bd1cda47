"""cnnfuse.fuse: swap fused modules into an eval-mode model.

The passes run on an FX graph of the largest module that traces: the whole model when it can,
else each child in turn (the module tree), so a model with one untraceable block still fuses
everywhere else. Per conv site, in order: Conv2d -> FusedConv2d, fold the BatchNorm that reads
it, absorb the activation that reads that; then each residual add whose operand is a fused
conv with nothing after it becomes that conv's epilogue (with the activation after the add);
squeeze-and-excitation gates move into the next conv's load (their mean into the producing
conv's epilogue); a depthwise conv or a pool and the 1x1 conv that reads it become one op;
concatenations (with the
channel shuffle after them) become one buffer that the producing convs write into; and
sibling convs that read one tensor merge into one.
"""
import copy
import operator
from typing import Optional

import torch
from torch import fx, nn

from .concat import (cat_parts, channel_shuffle_after, concat_buffer, concat_result, copy_into,
                     erase_unused, growing_buffer, ready)
from .fused_conv import FusedConv2d
from .patterns import (activation_of_module, activation_of_node, adds_in_place,
                       global_pool_input, identity_at_inference, inference_passthrough,
                       may_mutate, mul_operands, pool_window, residual_operands)
from .pool_conv2d import FusedPoolConv2d, can_take
from .squeeze_excite import FusedSqueezeExcite, channel_scale, is_gate_conv
from .report import FusionReport
from .separable import FusedSeparableConv2d, can_pair
from .siblings import merged, sibling_groups

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    if dtype is not None and dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
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
        fused = _fuse_module(target, report, "")
    return fused, report


def _unsupported_conv(conv: nn.Conv2d) -> Optional[str]:
    if type(conv).forward is not nn.Conv2d.forward:
        return (f"{type(conv).__name__} has a forward of its own (e.g. padding that depends "
                "on the input size); kept as is")
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zeros padding is fused)"
    if conv.weight.dtype not in _DTYPES:
        return f"weight dtype {conv.weight.dtype}"
    return None


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _fuse_module(module: nn.Module, report: FusionReport, prefix: str) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        reason = _unsupported_conv(module)
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
        _fuse_sequential(module, report, prefix)
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # FX raises many types for data-dependent Python
        report.untraceable.append((prefix.rstrip("."), f"{type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}"[:160]))
        _fuse_children(module, report, prefix)
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    _GraphFuser(gm, report, prefix).run()
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


def _bn_epilogue(bn: nn.Module) -> tuple[Optional[str], Optional[str]]:
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


def _fuse_sequential(seq: nn.Sequential, report: FusionReport, prefix: str) -> None:
    """Conv -> BatchNorm -> activation as neighbours in a Sequential (tree-only path)."""
    names = list(seq._modules)
    for i, name in enumerate(names):
        conv = seq._modules[name]
        if not isinstance(conv, FusedConv2d) or conv.folded_bn or conv.activation != "none":
            continue
        j = i + 1
        bn = seq._modules[names[j]] if j < len(names) else None
        if isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels:
            act, reason = _bn_epilogue(bn)
            if reason:
                report.skip(f"{prefix}{names[j]}", reason)
                continue
            conv.fold_bn(bn)
            conv.activation = act
            seq._modules[names[j]] = nn.Identity()
            report.add("batchnorm folded")
            j += 1
        act = activation_of_module(seq._modules[names[j]]) if j < len(names) else None
        if act and conv.activation == "none":
            conv.activation = act
            seq._modules[names[j]] = nn.Identity()
            report.add(f"activation {act}")


class _GraphFuser:
    def __init__(self, gm: fx.GraphModule, report: FusionReport, prefix: str):
        self.gm, self.graph, self.report, self.prefix = gm, gm.graph, report, prefix
        self.modules = dict(gm.named_modules())
        self.calls = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def run(self) -> None:
        # Identity, dropout and stochastic depth compute nothing at inference; dropping them
        # exposes neighbours (the residual add after an MBConv's stochastic depth).
        for node in list(self.graph.nodes):
            source = inference_passthrough(node, self.modules)
            if isinstance(source, fx.Node):
                self._absorb(node, source)
        for node in list(self.graph.nodes):
            if node.op == "call_module" and isinstance(self.modules[node.target], nn.Conv2d):
                self._fuse_conv(node)
        for node in list(self.graph.nodes):
            if residual_operands(node):
                self._fuse_residual(node)
        # SE before the BatchNorm prologue: the gate multiplies the conv's raw input, which a
        # BatchNorm prologue would otherwise be applied to first.
        for node in list(self.graph.nodes):
            if mul_operands(node):
                self._fuse_squeeze_excite(node)
        for node in list(self.graph.nodes):
            if node.op == "call_module" and isinstance(self.modules[node.target], nn.BatchNorm2d):
                self._fuse_input_bn(node)
        for node in list(self.graph.nodes):
            if isinstance(self._module(node), FusedConv2d):
                self._fuse_separable(node)
        for node in list(self.graph.nodes):
            if pool_window(node, self.modules):
                self._fuse_pool_conv(node)
        self._fuse_growing_concats()
        # Outer concatenations first, so one nested in another (Inception-v3's last blocks)
        # is spliced into it and its convs write into the outer buffer.
        self._spliced = set()
        for node in reversed(list(self.graph.nodes)):
            if node not in self._spliced and cat_parts(node):
                self._fuse_concat(node)
        self._merge_siblings()  # after the concatenations: their writers keep writing direct
        for node in self.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target], nn.BatchNorm2d):
                self.report.skip(self.prefix + node.target,
                                 "BatchNorm not directly after a conv (pre-activation); kept")
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    def _module(self, node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _replace_module(self, qualname: str, new: nn.Module) -> None:
        parent, _, name = qualname.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, new)
        self.modules[qualname] = new

    @staticmethod
    def _sole_user(node):
        """The one node reading `node`, if it reads it as its only tensor input."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        return user if user.args and user.args[0] is node else None

    def _absorb(self, node, into) -> None:
        node.replace_all_uses_with(into)
        self.graph.erase_node(node)

    def _fuse_conv(self, node) -> None:
        conv, site = self.modules[node.target], self.prefix + node.target
        reason = _unsupported_conv(conv)
        if reason is None and self.calls[node.target] > 1:
            reason = f"module is called at {self.calls[node.target]} places"
        if reason is None and (len(node.args) != 1 or node.kwargs):
            reason = "called with extra arguments"
        if reason:
            self.report.skip(site, reason)
            return
        fused = FusedConv2d.from_conv(conv)
        self._replace_module(node.target, fused)
        self.report.add("conv")

        user = self._sole_user(node)
        bn = self._module(user) if user is not None else None
        if isinstance(bn, nn.BatchNorm2d) and len(user.args) == 1 and not user.kwargs:
            act, reason = _bn_epilogue(bn)
            if reason is None and self.calls[user.target] > 1:
                reason = f"BatchNorm module is called at {self.calls[user.target]} places"
            if reason is None and bn.num_features != conv.out_channels:
                reason = f"BatchNorm has {bn.num_features} features, conv {conv.out_channels}"
            if reason:
                self.report.skip(self.prefix + user.target, reason)
            else:
                fused.fold_bn(bn)
                fused.activation = act
                self._absorb(user, node)
                self.report.add("batchnorm folded")
                if act != "none":
                    self.report.add(f"activation {act}")
        if fused.activation == "none":
            self._absorb_activation(node, fused)

    def _absorb_activation(self, node, fused: FusedConv2d) -> Optional[fx.Node]:
        """Absorb the activation reading `node` into `fused`; returns the absorbed node."""
        user = self._sole_user(node)
        act = activation_of_node(user, self.modules) if user is not None else None
        if act is None:
            return None
        fused.activation = act
        self._absorb(user, node)
        self.report.add(f"activation {act}")
        return user

    def _fuse_input_bn(self, bn_node) -> None:
        """BatchNorm → [activation] → conv with nothing else reading the BatchNorm or the
        activation (pre-activation blocks, DenseNet's layers and transitions): both move
        into the conv's load stage."""
        bn = self.modules[bn_node.target]
        act, reason = _bn_epilogue(bn)
        if (reason or len(bn_node.args) != 1 or bn_node.kwargs
                or self.calls[bn_node.target] > 1):
            return
        erased, user = [bn_node], self._sole_user(bn_node)
        if act == "none" and user is not None:
            act_of_user = activation_of_node(user, self.modules)
            if act_of_user is not None:
                act, erased, user = act_of_user, [user, bn_node], self._sole_user(user)
        conv = self._module(user) if user is not None else None
        # _sole_user: the conv reads it as its input only (a residual operand stays as is)
        if not (isinstance(conv, FusedConv2d) and not user.kwargs
                and erased[0] not in user.args[1:]
                and self.calls.get(user.target, 1) == 1 and conv.input_affine is None
                and not conv.has_input_scale and conv.in_channels == bn.num_features):
            return
        # The conv now reads the BatchNorm's input where it ran: nothing in between may write
        # (the absorbed activation itself may be in place: it goes away).
        if self._mutation_between(bn_node, user, ignore=erased):
            return
        conv.absorb_input_bn(bn, act)
        user.args = (bn_node.args[0],) + tuple(user.args[1:])
        for node in erased:
            self.graph.erase_node(node)
        self.report.add("batchnorm + act in conv's load")

    def _fuse_separable(self, dw_node) -> None:
        """Depthwise conv → 1x1 conv that alone reads it: one FusedSeparableConv2d in the 1x1
        conv's place (MobileNetV2's and MnasNet's blocks, Xception's separable convs)."""
        pw_node = self._sole_user(dw_node)
        dw, pw = self._module(dw_node), self._module(pw_node) if pw_node is not None else None
        if not (isinstance(pw, FusedConv2d) and can_pair(dw, pw) and len(dw_node.args) == 1
                and not dw_node.kwargs and not pw_node.kwargs
                and dw_node not in pw_node.args[1:]
                and self.calls.get(dw_node.target, 1) == 1
                and self.calls.get(pw_node.target, 1) == 1
                and not self._mutation_between(dw_node, pw_node)):  # x is now read there
            return
        self._replace_module(pw_node.target, FusedSeparableConv2d(dw, pw))
        pw_node.args = (dw_node.args[0],) + tuple(pw_node.args[1:])
        self.graph.erase_node(dw_node)
        self.report.add("depthwise + 1x1 in one op")

    def _fuse_pool_conv(self, pool_node) -> None:
        """Max or average pool → 1x1 conv that alone reads it (Inception's pool projection):
        one FusedPoolConv2d in the conv's place."""
        x, mode, kernel, stride, padding = pool_window(pool_node, self.modules)
        conv_node = self._sole_user(pool_node)
        conv = self._module(conv_node) if conv_node is not None else None
        if not (isinstance(conv, FusedConv2d) and can_take(conv) and not conv_node.kwargs
                and pool_node not in conv_node.args[1:]
                and self.calls.get(conv_node.target, 1) == 1  # (a pool module stays as it is)
                and not self._mutation_between(pool_node, conv_node)):  # x is now read there
            return
        self._replace_module(conv_node.target,
                             FusedPoolConv2d(mode, kernel, stride, padding, conv))
        conv_node.args = (x,) + tuple(conv_node.args[1:])
        self.graph.erase_node(pool_node)
        self.report.add("pool + 1x1 in one op")

    def _fuse_residual(self, add) -> None:
        a, b = residual_operands(add)
        in_place = adds_in_place(add)
        for conv_node, other in ((a, b), (b, a)):
            fused = self._module(conv_node)
            if (isinstance(fused, FusedConv2d) and not fused.has_residual
                    and fused.activation == "none" and len(conv_node.users) == 1
                    and conv_node is not other
                    # an in-place add into `other` is visible to whatever else reads it,
                    # the tensors it is a view of included
                    and not (in_place and other is a)):
                break
        else:
            return
        with self.graph.inserting_before(add):
            new = self.graph.call_module(conv_node.target, (conv_node.args[0], other))
        fused.has_residual = True
        add.replace_all_uses_with(new)
        self.graph.erase_node(add)
        self.graph.erase_node(conv_node)
        self.report.add("residual add")
        self._absorb_activation(new, fused)

    def _fuse_squeeze_excite(self, mul) -> None:
        """x * fc2(fc1(pool(x))): both FC layers become one se_gate call; the scale moves
        into the conv that consumes the product, or stays a pass where none does."""
        a, b = mul_operands(mul)
        for gate, x in ((a, b), (b, a)):
            chain = self._gate_chain(gate, x)
            if chain:
                break
        else:
            return
        pool, fc1_node, fc2_node = chain
        # The gate is computed at the product, from x as it is there: nothing in between may
        # write x (or anything else).
        if self._mutation_between(pool, mul):
            return
        fc1, fc2 = self.modules[fc1_node.target], self.modules[fc2_node.target]
        parent, _, name = fc1_node.target.rpartition(".")
        se_name = (parent + "." if parent else "") + name + "_se_gate"
        se = FusedSqueezeExcite.from_convs(fc1, fc2)
        self._replace_module(se_name, se)
        self.report.add("se gate")

        consumer = self._sole_user(mul)
        conv = self._module(consumer) if consumer is not None else None
        scale = None
        with self.graph.inserting_before(mul):
            gate_node = self.graph.call_module(se_name, (x,))
            if (isinstance(conv, FusedConv2d) and conv.groups == 1 and not conv.has_input_scale
                    and conv.input_affine is None
                    and self.calls.get(consumer.target, 1) == 1
                    # the conv reads x where it runs, no longer the product made earlier
                    and not self._mutation_between(mul, consumer)):
                consumer.args = (x,) + tuple(consumer.args[1:])
                consumer.kwargs = {**consumer.kwargs, "input_scale": gate_node}
                conv.has_input_scale = True
                self.report.add("se scale in next conv")
            else:
                scale = self.graph.call_function(channel_scale, (x, gate_node))
                mul.replace_all_uses_with(scale)
                self._reshape_not_view(scale)
        for node in (mul, fc2_node, fc1_node, pool):
            self.graph.erase_node(node)
        if scale is not None:
            self._fuse_scale_tail(scale)
        self._pool_in_producer(x, gate_node, se)

    def _fuse_scale_tail(self, scale) -> None:
        """channel_scale → + residual → [activation], each read only by the next (an SE
        residual block's tail): one channel_scale call in the add's place."""
        add = next(iter(scale.users)) if len(scale.users) == 1 else None
        operands = residual_operands(add) if add is not None else None
        if not operands or operands[0] is operands[1]:
            return
        other = operands[1] if operands[0] is scale else operands[0]
        in_place = adds_in_place(add)
        # an in-place add into `other` is visible to whatever else reads it (the tensors it is
        # a view of included); and x is now read at the add, so nothing in between may write it
        if (in_place and other is operands[0]) or self._mutation_between(scale, add):
            return
        act_node = self._sole_user(add)
        act = activation_of_node(act_node, self.modules) if act_node is not None else None
        with self.graph.inserting_before(add):
            fused = self.graph.call_function(channel_scale,
                                             scale.args + (other, act or "none"))
        (act_node if act else add).replace_all_uses_with(fused)
        for node in ([act_node] if act else []) + [add, scale]:
            self.graph.erase_node(node)
        self._reshape_not_view(fused)
        self.report.add("se scale + residual add" + (f" + {act}" if act else ""))

    def _pool_in_producer(self, x, gate_node, se: FusedSqueezeExcite) -> None:
        """The squeeze moves into the epilogue of the conv that produced x: it returns
        (x, mean_hw(x)) and the gate reads the means."""
        producer = self._module(x)
        if not (isinstance(producer, FusedConv2d) and not producer.returns_pooled
                and "out" not in x.kwargs and self.calls.get(x.target, 1) == 1
                # the means are taken where x is made: nothing may write x before the gate
                and not self._mutation_between(x, gate_node)):
            return
        with self.graph.inserting_after(x):
            pooled = self.graph.call_function(operator.getitem, (x, 1))
        with self.graph.inserting_after(x):
            y = self.graph.call_function(operator.getitem, (x, 0))
        x.replace_all_uses_with(y, delete_user_cb=lambda user: user not in (y, pooled))
        gate_node.args = (pooled,)
        producer.returns_pooled = se.takes_pooled = True
        self.report.add("se pool in conv epilogue")

    def _gate_chain(self, gate, x):
        """(pool, fc1, fc2) when `gate` is fc2(fc1(global_avg_pool(x))), each read once."""
        fc2_node = gate
        fc2 = self._module(fc2_node)
        if not (is_gate_conv(fc2) and len(fc2_node.users) == 1 and len(fc2_node.args) == 1):
            return None
        fc1_node = fc2_node.args[0]
        fc1 = self._module(fc1_node)
        if not (isinstance(fc1_node, fx.Node) and is_gate_conv(fc1) and len(fc1_node.users) == 1
                and len(fc1_node.args) == 1 and fc1.out_channels == fc2.in_channels
                and fc2.out_channels == fc1.in_channels):
            return None
        pool = fc1_node.args[0]
        if not (isinstance(pool, fx.Node) and len(pool.users) == 1
                and global_pool_input(pool, self.modules) is x):
            return None
        if self.calls.get(fc1_node.target, 1) > 1 or self.calls.get(fc2_node.target, 1) > 1:
            return None
        return pool, fc1_node, fc2_node

    def _fuse_concat(self, cat) -> None:
        groups, chain = channel_shuffle_after(cat) or (1, [])
        parts, inner = self._flat_parts(cat)
        writers = [p for p in parts if self._writes_concat_slice(p, parts)
                   and not self._mutation_between(p, cat)]  # a writer moves down to the cat
        if not writers:
            return
        # Writers run once the buffer exists: next to the cat, which alone reads them.
        for p in writers:
            cat.prepend(p)
        with self.graph.inserting_before(writers[0]):
            specs = []
            for p in parts:
                m = self.modules.get(p.target) if p in writers else None
                specs.append((p.args[0], m.out_channels, m.kernel_size, m.stride, m.padding,
                              m.dilation) if m is not None else p)
            alloc = self.graph.call_function(concat_buffer, (tuple(specs), groups))
            buffer, interleaved, *views = [self.graph.call_function(operator.getitem, (alloc, i))
                                           for i in range(len(parts) + 2)]
        written = []
        with self.graph.inserting_before(cat):
            for p, view in zip(parts, views):
                if p in writers:
                    p.kwargs = {**p.kwargs, "out": view}
                    written.append(p)
                else:
                    written.append(self.graph.call_function(copy_into, (view, p)))
            result = self.graph.call_function(concat_result,
                                              (buffer, interleaved, groups, tuple(written)))
        (chain[-1] if chain else cat).replace_all_uses_with(result)
        self._reshape_not_view(result)
        for node in reversed(chain):
            self.graph.erase_node(node)
        cat.replace_all_uses_with(result)  # shape queries read the result just as well
        erase_unused(self.graph, inner + [cat])  # the outer first: it reads the inner
        self._spliced.update(inner)
        self.report.add("conv writes its concat slice", len(writers))
        if chain:
            self.report.add("channel shuffle in conv stores")

    def _fuse_growing_concats(self) -> None:
        """Concatenations whose parts lists extend one another (a dense block: [x],
        [x, f1], [x, f1, f2], ...) become prefix views of one buffer that each f writes."""
        families = {}
        for node in self.graph.nodes:
            parts = cat_parts(node, min_parts=1)
            if parts:
                families.setdefault(parts[0], []).append((node, parts))
        for first, cats in families.items():
            cats.sort(key=lambda c: len(c[1]))
            longest = cats[-1][1]
            members = {c for c, _ in cats}
            # Every concatenation becomes a view of one buffer, and `first` is copied in once:
            # nothing may write into either afterwards.
            readers = [u for c in members for u in c.users] + list(first.users)
            if (len(cats) < 3 or len(set(longest)) != len(longest)
                    or any(parts != longest[:len(parts)] for _, parts in cats)
                    or not all(self._writes_growing_slice(p, members) for p in longest[1:])
                    or any(may_mutate(u, self.modules) for u in readers)):
                continue
            with self.graph.inserting_before(first.next):
                channels = tuple(self.modules[p.target].out_channels for p in longest[1:])
                alloc = self.graph.call_function(growing_buffer, (first, channels))
                views, prefixes = [self.graph.call_function(operator.getitem, (alloc, i))
                                   for i in (0, 1)]
                view0 = self.graph.call_function(operator.getitem, (views, 0))
                written = [self.graph.call_function(copy_into, (view0, first))]
            for i, p in enumerate(longest[1:], 1):
                with self.graph.inserting_before(p):
                    view = self.graph.call_function(operator.getitem, (views, i))
                p.kwargs = {**p.kwargs, "out": view}
                written.append(p)
            for cat, parts in cats:
                with self.graph.inserting_before(cat):
                    prefix = self.graph.call_function(operator.getitem,
                                                      (prefixes, len(parts) - 1))
                    view = self.graph.call_function(ready, (prefix, tuple(written[:len(parts)])))
                cat.replace_all_uses_with(view)
                self._reshape_not_view(view)
                self.graph.erase_node(cat)
            self.report.add("conv writes its concat slice", len(longest) - 1)
            self.report.add("dense block in one buffer")

    def _writes_growing_slice(self, part, members) -> bool:
        return (isinstance(self._module(part), FusedConv2d)
                and self.calls.get(part.target, 1) == 1 and "out" not in part.kwargs
                and all(u in members for u in part.users))

    def _merge_siblings(self) -> None:
        done = set()
        while True:  # again after each merge: a merged conv's slices may feed another group
            groups = [(source, nodes) for source, nodes in
                      sibling_groups(self.graph, self.modules, self.calls)
                      if (source, nodes[0]) not in done]
            if not groups:
                return
            source, nodes = groups[0]
            done.add((source, nodes[0]))
            # The merged conv runs where the first sibling did: nothing in between may write.
            if self._mutation_between(nodes[0], nodes[-1]):
                continue
            convs = [self.modules[n.target] for n in nodes]
            # On the root: a container (Sequential) with an extra child would run it if called.
            name = nodes[0].target.replace(".", "_") + "_merged"
            self._replace_module(name, merged(convs))
            with self.graph.inserting_before(nodes[0]):
                whole = self.graph.call_module(name, (source,))
            start = 0
            for node, conv in zip(nodes, convs):
                with self.graph.inserting_before(node):
                    part = self.graph.call_method("narrow", (whole, 1, start, conv.out_channels))
                node.replace_all_uses_with(part)
                self.graph.erase_node(node)
                self._reshape_not_view(part)
                start += conv.out_channels
            self.report.add("sibling convs merged", len(nodes))

    def _mutation_between(self, first, last, ignore=()) -> bool:
        """Whether a node after `first` and before `last`, other than those in `ignore`, may
        write into a tensor."""
        node = first.next
        while node is not last and node.op != "root":
            if node not in ignore and may_mutate(node, self.modules):
                return True
            node = node.next
        return False

    @staticmethod
    def _reshape_not_view(node) -> None:
        """The passes hand out channels_last buffers and channel slices where eager code had
        contiguous tensors; `.view` on them may fail where `.reshape` gives the same values."""
        for user in list(node.users):
            if (user.op == "call_method" and user.target == "view" and user.args[0] is node
                    and not any(isinstance(a, torch.dtype) for a in user.args[1:])):
                user.target = "reshape"

    def _flat_parts(self, cat) -> tuple:
        """The parts of `cat` with every concatenation read only by it spliced in, and those
        inner concatenations."""
        parts, inner = [], []
        for p in cat_parts(cat):
            if (cat_parts(p) and len(p.users) == 1 and cat_parts(cat).count(p) == 1
                    and not channel_shuffle_after(p)):
                sub, subinner = self._flat_parts(p)
                parts += sub
                inner += [p] + subinner
            else:
                parts.append(p)
        return parts, inner

    def _writes_concat_slice(self, part, parts) -> bool:
        return (isinstance(self._module(part), (FusedConv2d, FusedSeparableConv2d,
                                                FusedPoolConv2d))
                and len(part.users) == 1
                and parts.count(part) == 1 and self.calls.get(part.target, 1) == 1
                and "out" not in part.kwargs)
