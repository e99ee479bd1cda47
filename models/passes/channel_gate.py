"""Channel gates in general: x * g(mean_hw(x)), where g reads only the global mean of x (any
spelling: x.mean((2, 3)) with or without keepdim, F.adaptive_avg_pool2d(x, 1),
nn.AdaptiveAvgPool2d(1)), the model's parameters and constants — ECA-Net's 1-D conv across
channels, the effective SE (one 1x1 conv, hard sigmoid), CBAM's channel attention, an SE
whose MLP the se_gate kernel does not compute. The mean moves into the epilogue of the conv
that made x and the product into the consuming conv's load (or one channel_scale pass with
the residual add after it), as for squeeze-and-excitation (`squeeze_excite`, which runs
first and keeps the se_gate kernel for real SE blocks); g itself runs as the model wrote it,
on N·C values, as a ChannelGate module.

g may also read x's shape and global max pools of x (x.amax((2, 3)), adaptive_max_pool2d(x,
1)): a max is no mean, so it is computed from x eagerly inside the gate, which then reads x
once instead of three times. Anything else — g reading x (or another feature map) any other
way, a node of g read outside it, a write into x or a parameter between the mean and the
product, a gate that is not (N, C, 1, 1) for C = x's channels at two batch and spatial sizes
— leaves the block as it is. Scalar factors after the product (NFNets' gain and alpha) fold
into the gate."""
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..modules.channel_gate import ChannelGate
from ..patterns import may_mutate, mul_operands
from .leftover_act import activation_name
from .scalar_scale import scalar_product
from .squeeze_excite import place_gate


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        if not getattr(node, "_erased", False) and mul_operands(node):
            _fuse(g, node)


def _hw(dims) -> bool:
    return (isinstance(dims, (tuple, list)) and all(type(d) is int for d in dims)
            and sorted(d % 4 for d in dims) == [2, 3])


def _one(size) -> bool:
    return size in (1, (1, 1), [1, 1])


def _reduction(node: fx.Node, g: FusionGraph, x: fx.Node):
    """('mean', keepdim) or ('max', None) for a global mean or max over x's height and
    width, ('shape', None) for x.shape / x.size(...), else None."""
    if not node.args or node.args[0] is not x:
        return None
    args, kwargs = node.args, node.kwargs
    if node.op == "call_module":
        m = g.modules[node.target]
        if len(args) != 1 or kwargs:
            return None
        if type(m) is nn.AdaptiveAvgPool2d and _one(m.output_size):
            return "mean", True
        if type(m) is nn.AdaptiveMaxPool2d and _one(m.output_size) and not m.return_indices:
            return "max", None
        return None
    if node.op == "call_function" and node.target is getattr:
        return ("shape", None) if args[1] == "shape" else None
    if node.op == "call_method" and node.target == "size":
        return "shape", None
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool2d,
                                                      F.adaptive_max_pool2d):
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        extra = set(kwargs) - {"output_size"}
        if not _one(size) or len(args) > 2 or extra:
            return None
        return ("mean", True) if node.target is F.adaptive_avg_pool2d else ("max", None)
    is_method = node.op == "call_method" and node.target in ("mean", "amax")
    is_function = node.op == "call_function" and node.target in (torch.mean, torch.amax)
    if not (is_method or is_function):
        return None
    name = node.target if is_method else node.target.__name__
    if len(args) > 3 or set(kwargs) - {"dim", "keepdim", "keepdims"}:
        return None
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", kwargs.get("keepdims", False))
    if not _hw(dims) or not isinstance(keep, bool):
        return None
    return ("mean", keep) if name == "mean" else ("max", None)


def _is_expand_as(node, x) -> bool:
    return (node.op == "call_method" and node.target == "expand_as" and len(node.args) == 2
            and node.args[1] is x and not node.kwargs)


def _subgraph(g: FusionGraph, gate: fx.Node, x: fx.Node, mul: fx.Node):
    """(nodes of g in graph order, its result, the reductions {node: (kind, keepdim)}, the
    expand_as node or None) when `gate` is g(mean_hw(x)) as the module docstring says."""
    expand = gate if _is_expand_as(gate, x) else None
    out = gate.args[0] if expand is not None else gate
    if not isinstance(out, fx.Node) or out is x:
        return None
    nodes, leaves, todo = set(), {}, [out]
    while todo:
        node = todo.pop()
        if node in nodes:
            continue
        if node is x or node.op in ("placeholder", "output"):
            return None  # g reads x itself, or the model's inputs
        nodes.add(node)
        found = _reduction(node, g, x)
        if found is not None:
            leaves[node] = found
        elif node.op != "get_attr":
            todo += node.all_input_nodes
    if not any(kind == "mean" for kind, _ in leaves.values()):
        return None
    tail = {expand or mul, mul}
    if set(out.users) != {expand or mul} or (expand is not None and set(expand.users) != {mul}):
        return None
    for node in nodes:
        if node is not out and not set(node.users) <= nodes | tail:
            return None  # something else reads a value of g
        if node.op == "get_attr" and node.users.keys() & tail:
            return None
        # an in-place op inside g may write only a value g made itself
        if may_mutate(node, g.modules) and any(
                a.op in ("get_attr", "placeholder") or a is x
                for a in g.aliases(node.all_input_nodes[:1])):
            return None
    order = [n for n in g.graph.nodes if n in nodes]
    return order, out, leaves, expand


def _body(g: FusionGraph, x: fx.Node, order, out, leaves, scales) -> tuple:
    """An fx.GraphModule forward(x, mean) computing g, its modules and attributes renamed by
    their path below the innermost module they share."""
    graph = fx.Graph()
    x_in, mean_in = graph.placeholder("x"), graph.placeholder("mean")
    targets = sorted({n.target for n in order if n.op in ("call_module", "get_attr")})
    common = targets[0].split(".")[:-1] if targets else []
    for t in targets:
        parts = t.split(".")[:-1]
        while common and parts[:len(common)] != common:
            common = common[:-1]
    names, root = {}, {}
    for t in targets:
        name = "_".join(t.split(".")[len(common):]) or "m"
        while name in root:
            name += "_"
        names[t], root[name] = name, g.gm.get_submodule(t) if any(
            n.op == "call_module" and n.target == t for n in order) else _attr(g.gm, t)
    env = {}
    for node in order:
        kind = leaves.get(node)
        if kind and kind[0] == "mean":
            env[node] = (graph.call_function(operator.getitem, (
                mean_in, (slice(None), slice(None), None, None))) if kind[1] else mean_in)
            continue
        copy = graph.node_copy(node, lambda n: env[n] if n is not x else x_in)
        if copy.op in ("call_module", "get_attr"):
            copy.target = names[node.target]
        env[node] = copy
    result = env[out]
    for c in scales:
        result = graph.call_function(operator.mul, (result, c))
    graph.output(result)
    return fx.GraphModule(root, graph, class_name="ChannelGateBody"), common


def _attr(gm, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _channels(g: FusionGraph, x: fx.Node, mul: fx.Node):
    """x's channel count as the conv that makes x or the one that reads the product says."""
    producer = g.module(x)
    if isinstance(producer, FusedConv2d):
        return producer.out_channels
    consumer = g.sole_user(mul)
    conv = g.module(consumer) if consumer is not None else None
    return conv.in_channels if isinstance(conv, FusedConv2d) else None


def _gives_channel_gate(body: fx.GraphModule, channels: int) -> bool:
    """Whether the body gives an (N, C, 1, 1) gate at two batch and spatial sizes (on zeros of
    its parameters' dtype and device: shapes, not values, are what is asked)."""
    p = next((t for t in list(body.parameters()) + list(body.buffers())
              if t.is_floating_point()), None)
    kind = dict(dtype=p.dtype, device=p.device) if p is not None else {}
    try:
        for n, h, w in ((2, 5, 7), (3, 2, 3)):
            x = torch.zeros(n, channels, h, w, **kind)
            gate = body(x, x.mean((2, 3)))
            if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (n, channels, 1, 1):
                return False
    except Exception:  # any op of g that rejects the shapes: not a gate of this x
        return False
    return True


def _fuse(g: FusionGraph, mul: fx.Node) -> None:
    a, b = mul_operands(mul)
    for gate, x in ((a, b), (b, a)):
        found = _subgraph(g, gate, x, mul)
        if found:
            break
    else:
        return
    order, out, leaves, expand = found
    # the gate is computed at the product from x as it is there: nothing in between may
    # write x (or anything else) but g itself
    if g.mutation_between(order[0], mul, ignore=set(order)):
        return
    channels = _channels(g, x, mul)
    if channels is None:
        return
    # scalar factors read only after the product: into the gate (x · (g · c), one rounding
    # apart from (x · g) · c)
    product, scaled = mul, []
    while len(product.users) == 1:
        user = next(iter(product.users))
        found = scalar_product(user)
        if found is None or found[0] is not product or g.mutation_between(mul, user):
            break
        scaled.append((user, found[1]))
        product = user
    body, common = _body(g, x, order, out, leaves, [c for _, c in scaled])
    if not _gives_channel_gate(body, channels):
        return
    for user, _ in scaled:
        user.replace_all_uses_with(mul)
        g.graph.erase_node(user)
    site = g.node_site(mul)
    for node in order:
        name = activation_name(node, g.modules)
        if name:
            g.report.skip(g.site(node) if node.op == "call_module" else site,
                          f"{name}: on the (N, C) channel gate (N·C values, not the feature "
                          "map), computed by the gate's own eager ops; kept", kind="activation")
    gate_name = _name(g, mul, common)
    while gate_name in g.modules:
        gate_name += "_"
    module = ChannelGate(body, channels)
    g.replace_module(gate_name, module)
    g.report.add("channel gate")
    with g.graph.inserting_before(mul):
        gate_node = g.graph.call_module(gate_name, (x,))
    erase = ([expand] if expand is not None else []) + order[::-1]
    place_gate(g, mul, x, gate_node, module, "channel gate", erase=erase)


def _name(g: FusionGraph, mul: fx.Node, common) -> str:
    """<the block's module path>.channel_gate, beside the modules it came from."""
    stack = mul.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ".".join(common)
    try:
        g.gm.get_submodule(path)
        name = (path + "." if path else "") + "channel_gate"
    except AttributeError:  # the block holds no module the trace kept
        name = path.replace(".", "_") + "_channel_gate"
    while name in g.modules:
        name += "_"
    return name
