"""Fused against unfused on the user's images: do they predict the same classes?

Both models run in the same dtype and layout on the same batches; what is compared is their
logits over all images: top-1 agreement (same argmax), top-5 agreement (the same five classes,
in any order), the largest absolute logit difference, and per image the two top-1 predictions
with their softmax probabilities.
"""
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Agreement:
    images: int
    top1_same: int
    top5_same: int
    k: int                     # 5, or fewer when the model has fewer classes
    max_abs_diff: float        # largest |fused − unfused| over all logits
    max_abs_logit: float       # largest |unfused| logit, the scale of the difference
    rows: list = field(default_factory=list)  # (name, (class, p) unfused, (class, p) fused)

    def as_dict(self) -> dict:
        return {"images": self.images, "top1_agreement": self.top1_same / self.images,
                "top5_agreement": self.top5_same / self.images, "k": self.k,
                "max_abs_logit_diff": self.max_abs_diff,
                "max_abs_logit": self.max_abs_logit,
                "predictions": [{"image": name, "unfused": list(u), "fused": list(f)}
                                for name, u, f in self.rows]}


@torch.no_grad()
def logits_of(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int,
              device, dtype) -> torch.Tensor:
    """fn over `images` (N, 3, H, W) float32 in batches of `batch`, moved to device and dtype
    in channels_last; float32 logits on the CPU."""
    out = []
    for chunk in images.split(batch):
        x = chunk.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out.append(fn(x).float().cpu())
    return torch.cat(out)


def compare(unfused: torch.Tensor, fused: torch.Tensor, names: Sequence[str]) -> Agreement:
    """Agreement of two (N, classes) logit tensors, rows named by `names`."""
    if unfused.shape != fused.shape or unfused.dim() != 2 or unfused.shape[0] != len(names):
        raise ValueError(f"logits of shape {tuple(unfused.shape)} and {tuple(fused.shape)} "
                         f"for {len(names)} images")
    k = min(5, unfused.shape[1])
    top5_u = unfused.topk(k, dim=1).indices.sort(dim=1).values
    top5_f = fused.topk(k, dim=1).indices.sort(dim=1).values
    p_u, p_f = unfused.double().softmax(1), fused.double().softmax(1)
    c_u, c_f = unfused.argmax(1), fused.argmax(1)
    rows = [(name, (int(c_u[i]), float(p_u[i, c_u[i]])), (int(c_f[i]), float(p_f[i, c_f[i]])))
            for i, name in enumerate(names)]
    return Agreement(
        images=len(names), top1_same=int((c_u == c_f).sum()),
        top5_same=int((top5_u == top5_f).all(dim=1).sum()), k=k,
        max_abs_diff=float((fused.double() - unfused.double()).abs().max()),
        max_abs_logit=float(unfused.abs().max()), rows=rows)


def summary(a: Agreement, dtype_name: str) -> str:
    pct = lambda n: f"{n}/{a.images} ({100 * n / a.images:.1f}%)"  # noqa: E731
    return (f"fused vs unfused, both {dtype_name}, over {a.images} images: top-1 agreement "
            f"{pct(a.top1_same)}, top-{a.k} agreement {pct(a.top5_same)}; largest logit "
            f"difference {a.max_abs_diff:.2e} (largest logit {a.max_abs_logit:.2f})")


def side_by_side(a: Agreement, labels: Sequence[str], first: int) -> str:
    """The first `first` images' top-1 predictions, unfused | fused."""
    def cell(pred):
        cls, p = pred
        name = labels[cls] if 0 <= cls < len(labels) else str(cls)
        return f"{cls:>5} {name[:24]:<24} {p:6.3f}"
    width = max([len("image")] + [len(name) for name, _, _ in a.rows[:first]])
    lines = [f"{'image':<{width}}  {'unfused: class, name, p':<37}  {'fused: class, name, p':<37}"]
    for name, u, f in a.rows[:first]:
        lines.append(f"{name:<{width}}  {cell(u):<37}  {cell(f):<37}"
                     f"{'' if u[0] == f[0] else '  DIFFERENT'}")
    if len(a.rows) > first:
        lines.append(f"... and {len(a.rows) - first} more (all in the JSON)")
    return "\n".join(line.rstrip() for line in lines)
