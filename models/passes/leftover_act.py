"""The activations no pass absorbed, listed for `explain` with the reason (and counted, so its
headline says how many of the model's activations were absorbed)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import FusionGraph
from ..patterns import activation_of_node, unfused_activation_reason

_TORCH_ACTIVATIONS = tuple(
    getattr(nn, name) for name in (
        "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
        "Mish", "Sigmoid", "Tanh", "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus",
        "Softsign", "Tanhshrink", "Hardshrink", "Softshrink", "LogSigmoid", "Threshold"))
_FUNCTIONS = {F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.elu, F.elu_, F.celu, F.selu,
              F.gelu, F.mish, F.softplus, F.softsign, F.hardtanh, F.hardtanh_, F.tanh,
              torch.tanh, F.logsigmoid, F.threshold, torch.selu, torch.celu, torch.rrelu}
_METHODS = {"tanh", "tanh_"}


def activation_module_name(m: nn.Module) -> str:
    """The class name of an activation module (torch's, timm's, NFNets' GammaAct), else ''."""
    if isinstance(m, _TORCH_ACTIVATIONS) or type(m).__module__.startswith(
            "timm.layers.activations") or type(m).__name__ == "GammaAct":
        return type(m).__name__
    return ""


def activation_name(node, modules) -> str:
    """A name for the activation a graph node applies, or '' if it is none."""
    if node.op == "call_module":
        return activation_module_name(modules.get(node.target))
    if node.op == "call_function" and (node.target in _FUNCTIONS or activation_of_node(
            node, modules)):
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and (node.target in _METHODS or activation_of_node(
            node, modules)):
        return f".{node.target}()"
    return ""


def kept_reason(name: str, module, supported: bool) -> str:
    """explain's reason for an activation left as it is."""
    if not supported:
        why = unfused_activation_reason(module) if module is not None else None
        return why or f"{name}: no fused kernel computes this activation yet; kept"
    return f"{name}: after something no pass fuses it into; kept"


def run(g: FusionGraph) -> None:
    for node in g.graph.nodes:
        name = activation_name(node, g.modules)
        if not name:
            continue
        site = g.site(node) if node.op == "call_module" else f"{g.prefix}{node.name}"
        module = g.modules.get(node.target) if node.op == "call_module" else None
        reason = kept_reason(name, module, activation_of_node(node, g.modules) is not None)
        g.report.skip(site, reason, kind="activation")
