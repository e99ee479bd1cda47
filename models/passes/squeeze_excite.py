"""Squeeze-and-excitation: x * fc2(fc1(global_avg_pool(x))) becomes one se_gate call whose
(N, C) gate the conv that consumes the product applies as it loads x; the mean moves into the
epilogue of the conv that made x. Where no conv consumes the product, the scale, the residual
add and the activation after it are one channel_scale pass.

Runs before the BatchNorm prologue pass: the gate multiplies the conv's raw input, which a
BatchNorm prologue would otherwise be applied to first."""
import operator

from torch import fx

from ..graph import FusionGraph
from ..modules import FusedConv2d, FusedSqueezeExcite, channel_scale
from ..patterns import activation_of_node, adds_in_place, global_pool_input, mul_operands, \
    residual_operands


def is_gate_conv(m) -> bool:
    """A 1x1 FC layer of an SE block, as `fuse` leaves it after folding its activation."""
    return (isinstance(m, FusedConv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and not any(m.padding) and m.groups == 1 and not m.has_residual
            and not m.has_input_scale and m.input_affine is None)


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        if mul_operands(node):
            _fuse(g, node)


def _fuse(g: FusionGraph, mul) -> None:
    a, b = mul_operands(mul)
    for gate, x in ((a, b), (b, a)):
        chain = _gate_chain(g, gate, x)
        if chain:
            break
    else:
        return
    pool, fc1_node, fc2_node = chain
    # The gate is computed at the product, from x as it is there: nothing in between may
    # write x (or anything else).
    if g.mutation_between(pool, mul):
        return
    fc1, fc2 = g.modules[fc1_node.target], g.modules[fc2_node.target]
    parent, _, name = fc1_node.target.rpartition(".")
    se_name = (parent + "." if parent else "") + name + "_se_gate"
    se = FusedSqueezeExcite.from_convs(fc1, fc2)
    g.replace_module(se_name, se)
    g.report.add("se gate")

    with g.graph.inserting_before(mul):
        gate_node = g.graph.call_module(se_name, (x,))
    place_gate(g, mul, x, gate_node, se, "se", erase=(fc2_node, fc1_node, pool))


def place_gate(g: FusionGraph, mul, x, gate_node, gate, label: str, erase=()) -> None:
    """x * gate, computed at `mul`, where `gate_node` (before `mul`, reading x) now makes the
    (N, C) gate: the consuming conv applies it as it loads x, or else one channel_scale pass
    takes it (with the residual add and activation after it); then the mean moves into the
    conv that produced x. Erases `mul`, then the nodes in `erase` (what computed the gate
    before, in an order that erases readers first); `label` prefixes the report's keys."""
    consumer = g.sole_user(mul)
    conv = g.module(consumer) if consumer is not None else None
    scale = None
    if (isinstance(conv, FusedConv2d) and conv.groups == 1 and not conv.has_input_scale
            and conv.input_affine is None and g.called_once(consumer)
            # the conv reads x where it runs, no longer the product made earlier
            and not g.mutation_between(mul, consumer)):
        consumer.args = (x,) + tuple(consumer.args[1:])
        consumer.kwargs = {**consumer.kwargs, "input_scale": gate_node}
        conv.has_input_scale = True
        g.report.add(f"{label} scale in next conv")
    else:
        with g.graph.inserting_before(mul):
            scale = g.graph.call_function(channel_scale, (x, gate_node))
        mul.replace_all_uses_with(scale)
        g.reshape_not_view(scale)
    for node in (mul,) + tuple(erase):
        g.graph.erase_node(node)
    if scale is not None:
        _fuse_scale_tail(g, scale, label)
    _pool_in_producer(g, x, gate_node, gate, label)


def _fuse_scale_tail(g: FusionGraph, scale, label: str) -> None:
    """channel_scale → + residual → [activation], each read only by the next (an SE residual
    block's tail): one channel_scale call in the add's place."""
    add = next(iter(scale.users)) if len(scale.users) == 1 else None
    operands = residual_operands(add) if add is not None else None
    if not operands or operands[0] is operands[1]:
        return
    other = operands[1] if operands[0] is scale else operands[0]
    in_place = adds_in_place(add)
    # an in-place add into `other` is visible to whatever else reads it (the tensors it is a
    # view of included); and x is now read at the add, so nothing in between may write it
    if (in_place and other is operands[0]) or g.mutation_between(scale, add):
        return
    act_node = g.sole_user(add)
    act = activation_of_node(act_node, g.modules) if act_node is not None else None
    with g.graph.inserting_before(add):
        fused = g.graph.call_function(channel_scale, scale.args + (other, act or "none"))
    (act_node if act else add).replace_all_uses_with(fused)
    for node in ([act_node] if act else []) + [add, scale]:
        g.graph.erase_node(node)
    g.reshape_not_view(fused)
    g.report.add(f"{label} scale + residual add" + (f" + {act}" if act else ""))
    if act:
        g.report.add(f"activation {act}")


def _pool_in_producer(g: FusionGraph, x, gate_node, gate, label: str) -> None:
    """The squeeze moves into the epilogue of the conv that produced x: it returns
    (x, mean_hw(x)) and the gate reads the means (an SE gate the means alone, any other
    gate x too, for its shape)."""
    producer = g.module(x)
    if not (isinstance(producer, FusedConv2d) and not producer.returns_pooled
            and "out" not in x.kwargs and g.called_once(x)
            # the means are taken where x is made: nothing may write x before the gate
            and not g.mutation_between(x, gate_node)):
        return
    with g.graph.inserting_after(x):
        pooled = g.graph.call_function(operator.getitem, (x, 1))
    with g.graph.inserting_after(x):
        y = g.graph.call_function(operator.getitem, (x, 0))
    x.replace_all_uses_with(y, delete_user_cb=lambda user: user not in (y, pooled))
    gate_node.args = ((pooled,) if isinstance(gate, FusedSqueezeExcite)
                      else (gate_node.args[0], pooled))
    producer.returns_pooled = gate.takes_pooled = True
    g.report.add(f"{label} pool in conv epilogue")


def _gate_chain(g: FusionGraph, gate, x):
    """(pool, fc1, fc2) when `gate` is fc2(fc1(global_avg_pool(x))), each read once."""
    fc2_node = gate
    fc2 = g.module(fc2_node)
    if not (is_gate_conv(fc2) and len(fc2_node.users) == 1 and len(fc2_node.args) == 1):
        return None
    fc1_node = fc2_node.args[0]
    fc1 = g.module(fc1_node) if isinstance(fc1_node, fx.Node) else None
    if not (is_gate_conv(fc1) and len(fc1_node.users) == 1
            and len(fc1_node.args) == 1 and fc1.out_channels == fc2.in_channels
            and fc2.out_channels == fc1.in_channels):
        return None
    pool = fc1_node.args[0]
    if not (isinstance(pool, fx.Node) and len(pool.users) == 1
            and global_pool_input(pool, g.modules) is x):
        return None
    if not (g.called_once(fc1_node) and g.called_once(fc2_node)):
        return None
    return pool, fc1_node, fc2_node
