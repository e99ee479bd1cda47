"""Channel permutations (IGC's interleave P between and after its grouped convs, a channel
shuffle not after a concatenation, nn.ChannelShuffle): per-channel operations commute with
a permutation of the channels, and a dense conv's weights absorb one. Each shuffle becomes
one `interleave_channels` call, then, until nothing changes:

- a dense (groups=1) conv whose output reaches the permutation only through per-channel
  steps (BatchNorm, parameter-free activations) computes the permuted channels itself: its
  weight rows, and those steps' parameters, are indexed by the permutation;
- dense convs that alone read it take their input channels in the permuted order instead;
- a BatchNorm or a parameter-free activation reading the permutation moves before it (its
  parameters permuted: BN(P(y)) = P(BN'(y))), so it follows the conv and folds;
- a residual add of the permutation of a conv's output, P(z) + r, becomes P(z + P⁻¹(r)):
  the add (and the activation after it) lands in the conv's epilogue; P⁻¹(r) is r's source
  when r is itself P of it, r itself when r is a dense conv's output (its rows permuted),
  else a copy (r itself where it broadcasts over channels), which replaces the copy of z
  and saves the add's and activation's passes.

A module is indexed only where its weight is a plain parameter (not a parametrisation's
output), and as a copy that replaces it in this graph alone (a conv shared with a module
traced on its own stays as it was there).

What is left (a grouped conv's output read by a grouped conv, IGC's P) runs as one copy, and
explain lists it. Runs before conv_bn_act, which then folds what moved next to a conv.
Source of the interleave: Zhang et al., "Interleaved Group Convolutions", ICCV 2017, Eq. 3."""
import copy
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..graph import FusionGraph
from ..modules.permute import interleave_channels, interleave_index, unpermute_residual
from ..patterns import activation_of_node, adds_in_place, cat_parts, channel_shuffle_after, \
    may_mutate, residual_operands
from .conv_bn_act import bn_epilogue, unsupported

_SHUFFLE_FUNCTIONS = tuple(f for f in (getattr(torch, "channel_shuffle", None),
                                       getattr(F, "channel_shuffle", None),
                                       getattr(torch, "native_channel_shuffle", None)) if f)
# (sites: a BatchNorm or activation counts once however many permutations it moves past)
MOVED = {"bn": "batchnorms moved before a channel permutation",
         "act": "activations moved before a channel permutation"}
_IN_WEIGHTS = "channel permutation in conv weights"
# eager's view → transpose → contiguous → view returns contiguous NCHW whatever the input's
# layout (F.channel_shuffle keeps it): passes/layout restores that at the outputs
EAGER_FORMAT = "cnnfuse_eager_format"


def _is_perm(node) -> bool:
    return node.op == "call_function" and node.target is interleave_channels


def _collapse(g: FusionGraph) -> None:
    """Every channel shuffle (not one after a concatenation: the concat pass stores those) as
    one interleave_channels node."""
    for node in list(g.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        m = g.module(node)
        found = None
        if isinstance(m, nn.ChannelShuffle) and len(node.args) == 1 and not node.kwargs:
            source, groups, chain = node.args[0], m.groups, [node]
        elif (node.op == "call_function" and node.target in _SHUFFLE_FUNCTIONS
              and len(node.args) == 2 and isinstance(node.args[1], int) and not node.kwargs):
            source, groups, chain = node.args[0], node.args[1], [node]
        else:
            found = None if cat_parts(node) else channel_shuffle_after(node)
            if found is None:
                continue
            (groups, chain), source = found, node
        with g.graph.inserting_before(chain[-1]):
            perm = g.graph.call_function(interleave_channels, (source, groups, False))
        perm.meta["nn_module_stack"] = chain[-1].meta.get("nn_module_stack", {})
        if found is not None:
            perm.meta[EAGER_FORMAT] = "contiguous"
        chain[-1].replace_all_uses_with(perm)
        shapes = [a for n in chain for a in n.all_input_nodes if a not in chain]
        for n in reversed(chain):
            g.graph.erase_node(n)
        g.erase_unused([a for a in shapes if a is not source])


def _channel_step(g: FusionGraph, node) -> Optional[str]:
    """'bn' or 'act' when `node` is per channel on its one input (an eval BatchNorm, an
    activation without parameters), else None."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    m = g.module(node)
    if isinstance(m, nn.BatchNorm2d):
        ok = (len(node.args) == 1 and not node.kwargs and bn_epilogue(m)[1] is None
              and g.called_once(node) and _params_private(g, node) and _indexable(m))
        return "bn" if ok else None
    # (an activation's other arguments are constants: a slope, bounds, inplace)
    if activation_of_node(node, g.modules) is None or any(
            isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    if m is not None and any(True for _ in m.parameters()):
        return None  # (a per-channel slope would need permuting too)
    return "act"


def _dense_conv(g: FusionGraph, node) -> Optional[nn.Conv2d]:
    m = g.module(node)
    if (isinstance(m, nn.Conv2d) and unsupported(m) is None and m.groups == 1
            and g.called_once(node) and len(node.args) == 1 and not node.kwargs
            and _params_private(g, node) and _indexable(m)):
        return m
    return None


def _indexable(m: nn.Module) -> bool:
    """Whether the module's weight and bias are its own plain parameters (a parametrised
    weight is computed from `parametrizations.weight.original` at each call: indexing what
    it returns would change nothing)."""
    return not parametrize.is_parametrized(m) and all(
        name in m._parameters for name in ("weight", "bias") if getattr(m, name, None)
        is not None)


def _params_private(g: FusionGraph, node) -> bool:
    """Whether the graph reads none of the module's parameters or buffers itself (then
    permuting them changes what this one call computes only)."""
    prefix = node.target + "."
    return not any(n.op == "get_attr" and n.target.startswith(prefix) for n in g.graph.nodes)


def _dense_source(g: FusionGraph, x) -> Optional[list]:
    """[conv node, steps...] when x is a dense conv's output through per-channel steps, each
    read only by the next."""
    chain = []
    while _channel_step(g, x):
        chain.append(x)
        x = x.args[0]
    if _dense_conv(g, x) is None:
        return None
    chain.append(x)
    chain.reverse()
    if any(len(a.users) != 1 for a in chain[:-1]):
        return None
    return chain


@torch.no_grad()
def _index_module(g: FusionGraph, node: fx.Node, index: torch.Tensor, dim: int = 0) -> None:
    """Index the weight (dim 0: output channels, 1: input channels) and bias of the conv
    `node` calls, or its BatchNorm's parameters and statistics, by `index`, in a copy of the
    module that takes its place in this graph alone: the module itself may be called from
    another graph (a sibling traced on its own) that must see it unchanged. Nodes without a
    module (an activation function) have nothing to index."""
    if node.op != "call_module":
        return
    m = copy.copy(g.modules[node.target])
    m._parameters, m._buffers = dict(m._parameters), dict(m._buffers)
    g.replace_module(node.target, m)
    for name, p in list(m._parameters.items()):
        if p is None or (dim == 1 and name != "weight"):
            continue
        i = index.to(p.device)
        m._parameters[name] = nn.Parameter(p.detach().index_select(dim, i).clone(),
                                           requires_grad=p.requires_grad)
    if isinstance(m, nn.BatchNorm2d):
        for name in ("running_mean", "running_var"):
            b = m._buffers.get(name)
            if b is not None:
                m._buffers[name] = b.index_select(0, index.to(b.device)).clone()


def _channels(g: FusionGraph, chain) -> int:
    return g.modules[chain[0].target].out_channels


def _into_producer(g: FusionGraph, p) -> bool:
    chain = _dense_source(g, p.args[0])
    if chain is None or len(chain[-1].users) != 1:
        return False
    groups, inverse = p.args[1:3]
    c = _channels(g, chain)
    if c % groups:
        return False
    index = interleave_index(c, groups, inverse)
    for node in chain:
        _index_module(g, node, index)
        if p.meta.get(EAGER_FORMAT):  # (the chain now computes the shuffle's result)
            node.meta[EAGER_FORMAT] = p.meta[EAGER_FORMAT]
    g.absorb(p, chain[-1])
    g.report.add(_IN_WEIGHTS)
    return True


def _into_readers(g: FusionGraph, p) -> bool:
    readers = list(p.users)
    convs = [_dense_conv(g, u) for u in readers]
    if not readers or None in convs or any(u.args[0] is not p for u in readers):
        return False
    if any(g.mutation_between(p, u) for u in readers):  # they read p's input there now
        return False
    groups, inverse = p.args[1:3]
    c = convs[0].in_channels
    if c % groups or any(m.in_channels != c for m in convs):
        return False
    # conv(P(x)) = Σ_i W[:, i] x[perm[i]]: input channel perm[i] takes column i
    order = torch.argsort(interleave_index(c, groups, inverse))
    for u in readers:
        _index_module(g, u, order, dim=1)
        if p.meta.get(EAGER_FORMAT):  # (eager's conv read a contiguous tensor)
            u.meta[EAGER_FORMAT] = "from_contiguous"
    g.absorb(p, p.args[0])
    g.report.add(_IN_WEIGHTS, len(convs))
    return True


def _commute_step(g: FusionGraph, p) -> bool:
    """BN(P(x)) → P(BN'(x)), act(P(x)) → P(act(x)), for x that only p reads."""
    step = g.sole_user(p)
    kind = _channel_step(g, step) if step is not None else None
    x = p.args[0]
    if kind is None or step.args[0] is not p or not g.private_to(x, p):
        return False
    if kind == "bn":
        bn = g.modules[step.target]
        groups, inverse = p.args[1:3]
        if bn.num_features % groups:
            return False
        # BN(P(y))[i] = s[i] y[perm[i]] + t[i]: channel j of y takes the parameters of the i
        # with perm[i] = j
        _index_module(g, step, torch.argsort(
            interleave_index(bn.num_features, groups, inverse)))
    step.replace_all_uses_with(p)
    step.args = (x,) + tuple(step.args[1:])
    p.args = (step,) + tuple(p.args[1:])
    p.prepend(step)
    if not step.meta.get("cnnfuse_moved"):  # (a site once, past however many permutations)
        step.meta["cnnfuse_moved"] = True
        g.report.add(MOVED[kind])
    return True


def _ends_at_conv(g: FusionGraph, x) -> bool:
    """Whether x is a conv's output, or a BatchNorm of one: an add after it is an epilogue."""
    if _channel_step(g, x) == "bn" and len(x.users) == 1:
        x = x.args[0]
    m = g.module(x)
    return isinstance(m, nn.Conv2d) and g.called_once(x) and len(x.users) == 1


def _written_between(g: FusionGraph, first, last, value) -> bool:
    """Whether a node after `first` and before `last` may write into `value` or a tensor
    sharing its storage (in-place ops elsewhere do not matter)."""
    shared = g.aliases([value])
    node = first.next
    while node is not last and node.op != "root":
        if may_mutate(node, g.modules) and any(a in shared for a in node.all_input_nodes):
            return True
        node = node.next
    return False


def _commute_add(g: FusionGraph, p) -> bool:
    """P(x) + r → P(x + P⁻¹(r)) for x a conv's output that only p reads (r may broadcast:
    unpermute_residual permutes its channel axis, if it has one)."""
    add = g.sole_user(p) if not p.meta.get("cnnfuse_inverse") else None
    operands = residual_operands(add) if add is not None else None
    x = p.args[0]
    if (not operands or adds_in_place(add) or operands[0] is operands[1] or add.kwargs
            or add.op != "call_function" or add.target not in (operator.add, torch.add)
            or not g.private_to(x, p) or not _ends_at_conv(g, x)):
        return False
    r = operands[1] if operands[0] is p else operands[0]
    groups, inverse = p.args[1:3]
    c = _conv_channels(g, x)
    if c % groups:
        return False
    chain = _dense_source(g, r)
    if _is_perm(r) and tuple(r.args[1:3]) == (groups, inverse) and not _written_between(
            g, r, add, r.args[0]):
        q = r.args[0]  # P⁻¹(P(y)) = y
    elif chain is not None and list(r.users) == [add] and _channels(g, chain) == c:
        order = torch.argsort(interleave_index(c, groups, inverse))
        for node in chain:
            _index_module(g, node, order)
        g.report.add(_IN_WEIGHTS)
        q = r
    else:
        with g.graph.inserting_before(add):
            q = g.graph.call_function(unpermute_residual, (r, groups, inverse, c))
        q.meta["cnnfuse_inverse"] = True  # (never moved back across the add)
        q.meta["nn_module_stack"] = add.meta.get("nn_module_stack", {})
    with g.graph.inserting_before(add):
        total = g.graph.call_function(operator.add, (x, q))
        out = g.graph.call_function(interleave_channels, (total, groups, inverse))
    out.meta["nn_module_stack"] = total.meta["nn_module_stack"] = add.meta.get(
        "nn_module_stack", {})
    if p.meta.get(EAGER_FORMAT):
        out.meta[EAGER_FORMAT] = p.meta[EAGER_FORMAT]
    add.replace_all_uses_with(out)
    g.graph.erase_node(add)
    g.graph.erase_node(p)
    g.report.add("residual add moved before a channel permutation")
    return True


def _conv_channels(g: FusionGraph, x) -> int:
    """The channels of x, a conv's output or a BatchNorm of one (as _ends_at_conv found)."""
    m = g.module(x)
    return m.num_features if isinstance(m, nn.BatchNorm2d) else m.out_channels


def run(g: FusionGraph) -> None:
    _collapse(g)
    for _ in range(4 * len(g.graph.nodes)):  # each rewrite removes a permutation or moves one
        perms = [n for n in g.graph.nodes if _is_perm(n)]
        if not any(rule(g, p) for p in perms for rule in (
                _into_producer, _into_readers, _commute_step, _commute_add)):
            break
    for p in g.graph.nodes:
        unpermute = p.op == "call_function" and p.target is unpermute_residual
        if _is_perm(p) or unpermute:
            g.report.add("channel permutation as one copy")
            inverse = p.args[2] != unpermute  # (unpermute_residual undoes the one it names)
            g.report.skip(_site(g, p), f"the channel interleave of {p.args[1]} groups"
                          f"{' (inverse)' if inverse else ''} after it runs as one copy: "
                          "no dense conv next to it takes it into its weights, and a grouped "
                          "conv's store or load cannot take it")


def _site(g: FusionGraph, p) -> str:
    """The module that makes what p permutes (the conv, past the steps it absorbs)."""
    x = p.args[0]
    while _channel_step(g, x) or residual_operands(x):
        x = x.args[0]
    return g.site(x) if x.op == "call_module" else g.node_site(p)
