"""Parallel branches summed into one conv (RepVGG, MobileOne, ACNet, DBB-style blocks): the
sum of convs over one input with the same stride and groups (each BatchNorm already folded by
conv_bn_act), plus a BatchNorm of the input itself or the input as is, is one conv whose
kernel is the sum of theirs, each smaller kernel and the identity placed at the centre of the
largest. Exact up to rounding: convolution is linear in its weight. Runs before the residual
pass, which would otherwise make one branch the residual of another."""
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from ..graph import FusionGraph
from ..modules import FusedConv2d
from ..modules.fused_conv import bn_affine
from ..patterns import adds_in_place, residual_operands
from ..report import BN_FOLDED
from .conv_bn_act import GraphChain, absorb_activation, bn_epilogue


def run(g: FusionGraph) -> None:
    # The last add first: it is the root of a sum whose inner adds it expands.
    for node in reversed(list(g.graph.nodes)):
        if not getattr(node, "_erased", False) and residual_operands(node):
            _fuse(g, node)


def _terms(g: FusionGraph, node, root, internal: list) -> list:
    """The leaves of the add tree under `node` (adds read by nothing else are expanded)."""
    ops = residual_operands(node) if node is root or (
        len(node.users) == 1 and node.op != "placeholder") else None
    if ops is None:
        return [node]
    a, b = ops
    if adds_in_place(node) and (a.op == "placeholder" or len(a.users) != 1):
        return [None]  # writes into a tensor others read: not ours to replace
    internal.append(node)
    return _terms(g, a, root, internal) + _terms(g, b, root, internal)


def _leaf(g: FusionGraph, node, users_ok) -> Optional[tuple]:
    """('conv', node, module) / ('bn', node, module) / ('identity', node, None) with the input
    it reads, or None."""
    m = g.module(node)
    if (type(m) is FusedConv2d and m.activation == "none" and not m.has_residual
            and not m.has_input_scale and m.input_affine is None and not m.returns_pooled
            and len(node.args) == 1 and not node.kwargs and g.called_once(node) and users_ok):
        return "conv", node, m, node.args[0]
    if (isinstance(m, nn.BatchNorm2d) and bn_epilogue(m) == ("none", None)
            and len(node.args) == 1 and not node.kwargs and g.called_once(node) and users_ok):
        return "bn", node, m, node.args[0]
    return None


def _offsets(conv: FusedConv2d, big: FusedConv2d) -> Optional[tuple]:
    """(row, column) where conv's kernel sits inside big's so both read the same pixels."""
    out = []
    for axis, (before, after) in enumerate(((2, 3), (0, 1))):  # (top, bottom), (left, right)
        d = conv.dilation[axis]
        lead = big.padding[before] - conv.padding[before]
        k, kb = conv.kernel_size[axis], big.kernel_size[axis]
        span = conv.padding[before] + conv.padding[after] - d * (k - 1)
        span_big = big.padding[before] + big.padding[after] - d * (kb - 1)
        if lead % d or span != span_big or not 0 <= lead // d <= kb - k:
            return None
        out.append(lead // d)
    return tuple(out)


def _fuse(g: FusionGraph, root) -> None:
    internal = []
    terms = _terms(g, root, root, internal)
    if None in terms or len(terms) < 2 or len(set(terms)) != len(terms):
        return
    leaves, inputs = [], set()
    for t in terms:
        leaf = _leaf(g, t, list(t.users) and all(u in internal for u in t.users))
        if leaf is None:
            leaves.append(("identity", t, None, t))
        else:
            leaves.append(leaf)
        inputs.add(leaves[-1][3])
    convs = [m for kind, _, m, _ in leaves if kind == "conv"]
    if len(inputs) != 1 or not convs:
        return
    x = inputs.pop()
    big = max(convs, key=lambda c: c.kernel_size[0] * c.kernel_size[1])
    same = all((c.stride, c.dilation, c.groups, c.out_channels, c.in_channels,
                c.weight.dtype) == (big.stride, big.dilation, big.groups, big.out_channels,
                                    big.in_channels, big.weight.dtype) for c in convs)
    offsets = [_offsets(c, big) for c in convs]
    identities = [leaf for leaf in leaves if leaf[0] != "conv"]
    if not same or None in offsets:
        return
    if identities:  # x itself is a term: the output has x's shape and channels
        centre = _offsets(_identity_geometry(big), big)
        if (big.stride != (1, 1) or big.in_channels != big.out_channels or centre is None
                or any(kind == "bn" and m.num_features != big.out_channels
                       for kind, _, m, _ in identities)):
            return
    # The merged conv reads x where the sum was: nothing in between may write into it.
    first = min((leaf[1] for leaf in leaves if leaf[0] != "identity"),
                key=lambda n: list(g.graph.nodes).index(n))
    if g.mutation_between(first, root, ignore=internal):
        return
    kh, kw = big.kernel_size
    weight = torch.zeros(big.weight.shape, dtype=torch.float64, device=big.weight.device)
    bias = torch.zeros(big.out_channels, dtype=torch.float64, device=big.weight.device)
    for c, (r, s) in zip(convs, offsets):
        weight[:, :, r:r + c.kernel_size[0], s:s + c.kernel_size[1]] += c.weight.double()
        if c.bias is not None:
            bias += c.bias.double()
    per_group = big.in_channels // big.groups
    eye = torch.zeros(big.out_channels, per_group, dtype=torch.float64, device=weight.device)
    eye[torch.arange(big.out_channels), torch.arange(big.out_channels) % per_group] = 1.0
    for kind, _, m, _ in identities:
        scale, shift = bn_affine(m) if kind == "bn" else (torch.ones_like(bias), bias * 0)
        weight[:, :, centre[0], centre[1]] += eye * scale.to(weight.device).view(-1, 1)
        bias += shift.to(bias.device)
    big.weight.data = weight.to(big.weight.dtype)
    big.pack_weight()
    big.bias = nn.Parameter(bias.to(big.weight.dtype), requires_grad=False)
    big_node = next(leaf[1] for leaf in leaves if leaf[2] is big)
    with g.graph.inserting_before(root):
        merged = g.graph.call_module(big_node.target, (x,))
    root.replace_all_uses_with(merged)
    g.erase_unused([root] + internal + [leaf[1] for leaf in leaves if leaf[0] != "identity"])
    g.report.add("parallel branches summed into one conv", len(convs))
    g.report.add(BN_FOLDED, sum(kind == "bn" for kind, *_ in identities))
    absorb_activation(big, GraphChain(g, merged), g.report)


def _identity_geometry(big: FusedConv2d) -> SimpleNamespace:
    """The geometry of the identity: a 1x1 conv with no padding."""
    return SimpleNamespace(kernel_size=(1, 1), dilation=big.dilation, padding=(0, 0, 0, 0))
