"""Identity, eval-mode dropout and stochastic depth compute nothing at inference: dropping them
exposes their neighbours to the other passes (the residual add after an MBConv's stochastic
depth lands in the project conv's epilogue)."""
from torch import fx

from ..graph import FusionGraph
from ..patterns import inference_passthrough


def run(g: FusionGraph) -> None:
    for node in list(g.graph.nodes):
        source = inference_passthrough(node, g.modules)
        if isinstance(source, fx.Node):
            g.absorb(node, source)
