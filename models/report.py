"""FusionReport: what `fuse` did to a model, counted against what the model has, and every
site it left alone with the reason."""
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

# The ways a BatchNorm leaves the model (the `fused` keys the passes count, once per BatchNorm).
BN_FOLDED = "batchnorm folded"                        # into the weights of the conv before it
BN_IN_LOAD = "batchnorm + act in conv's load"          # the prologue of the conv(s) after it
BN_IN_SLICES = "batchnorm folded into concat slices"   # into each conv of a concatenation
BN_ALONE = "batchnorm + act as one pass"               # after a non-conv: one depthwise 1x1
BN_KINDS = (BN_FOLDED, BN_IN_LOAD, BN_IN_SLICES)


@dataclass
class FusionReport:
    conv_sites: int = 0                      # Conv2d modules + functional convs the trace saw
    fused: Counter = field(default_factory=Counter)      # pattern -> sites fused
    unfused: list = field(default_factory=list)          # (site, reason)
    untraceable: list = field(default_factory=list)      # (module path, error) handled by tree
    batchnorms: int = 0                      # BatchNorm2d modules in the model
    left: Counter = field(default_factory=Counter)       # kind ('activation', ...) -> sites kept
    # A weak reference to the model under rewrite (set before the trace): the passes look up
    # what a traced graph leaves out.
    root: Optional[Callable] = field(default=None, repr=False, compare=False)

    def add(self, pattern: str, n: int = 1) -> None:
        self.fused[pattern] += n

    def skip(self, site: str, reason: str, kind: str = "") -> None:
        """List `site` as left alone; `kind` 'activation' also counts it as an activation the
        headline says was not absorbed."""
        self.unfused.append((site or "<model>", reason))
        if kind:
            self.left[kind] += 1

    @property
    def conv_fused(self) -> int:
        return self.fused["conv"]

    @property
    def coverage(self) -> float:
        return self.conv_fused / self.conv_sites if self.conv_sites else 1.0

    @property
    def bn_folded(self) -> int:
        """BatchNorms gone from the model: folded into weights or a conv's load stage."""
        return sum(self.fused[k] for k in BN_KINDS)

    @property
    def activations_absorbed(self) -> int:
        return sum(n for k, n in self.fused.items() if k.startswith("activation "))

    @property
    def activation_sites(self) -> int:
        """Activations absorbed + those listed as kept."""
        return self.activations_absorbed + self.left["activation"]

    def headline(self) -> list:
        def share(a, b):
            return f"{a}/{b} ({100 * a / b if b else 100.0:.1f}%)"
        lines = [f"cnnfuse: {self.conv_fused}/{self.conv_sites} conv sites fused "
                 f"({100 * self.coverage:.1f}%)"]
        if self.batchnorms:
            alone = self.fused[BN_ALONE]
            lines.append(f"  BatchNorms folded: {share(self.bn_folded, self.batchnorms)}"
                         + (f"; {alone} more as one affine + activation pass" if alone else ""))
        if self.activation_sites:
            lines.append("  activations absorbed: "
                         + share(self.activations_absorbed, self.activation_sites))
        return lines

    def __str__(self) -> str:
        lines = self.headline()
        for pattern, n in sorted(self.fused.items()):
            if pattern != "conv":
                lines.append(f"  {pattern:<32} {n:>5}")
        if self.untraceable:
            lines.append("  traced per submodule (FX could not trace the whole):")
            lines += [f"    {path or '<model>'}: {err}" for path, err in self.untraceable]
        if self.unfused:
            lines.append("  left unfused:")
            lines += [f"    {site}: {reason}" for site, reason in self.unfused]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)
