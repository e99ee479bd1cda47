"""FusionReport: what `fuse` did to a model, and every site it left alone with the reason."""
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class FusionReport:
    conv_sites: int = 0                      # Conv2d modules in the model
    fused: Counter = field(default_factory=Counter)      # pattern -> sites fused
    unfused: list = field(default_factory=list)          # (site, reason)
    untraceable: list = field(default_factory=list)      # (module path, error) handled by tree

    def add(self, pattern: str, n: int = 1) -> None:
        self.fused[pattern] += n

    def skip(self, site: str, reason: str) -> None:
        self.unfused.append((site or "<model>", reason))

    @property
    def conv_fused(self) -> int:
        return self.fused["conv"]

    @property
    def coverage(self) -> float:
        return self.conv_fused / self.conv_sites if self.conv_sites else 1.0

    def __str__(self) -> str:
        lines = [f"cnnfuse: {self.conv_fused}/{self.conv_sites} conv sites fused "
                 f"({100 * self.coverage:.1f}%)"]
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
