"""The BatchNorms no pass took, listed for `explain` with the reason."""
from torch import nn

from ..graph import FusionGraph


def run(g: FusionGraph) -> None:
    for node in g.modules_of(nn.BatchNorm2d):
        g.report.skip(g.site(node), "BatchNorm not directly after a conv (pre-activation); kept")
