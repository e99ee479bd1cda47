"""cnnfuse: fused CUDA and Triton kernels for classic CNN image classifiers.

    fast = cnnfuse.fuse(model.eval())     # a fused copy
    print(cnnfuse.explain(model))         # what was fused, what was not, and why
"""
__version__ = "0.5.0"

from . import ops  # noqa: E402  (registers the torch.library ops)
from .models import FusedConv2d, FusionReport, explain, fuse  # noqa: E402
from .export import export  # noqa: E402
from .serialize import load, save  # noqa: E402
from .tune import TuneReport, tune, use_picks  # noqa: E402

__all__ = ["FusedConv2d", "FusionReport", "TuneReport", "explain", "export", "fuse", "load",
           "ops", "save", "tune", "use_picks", "__version__"]
