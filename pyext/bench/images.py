"""The main job's images: JPEG/PNG files from a folder, preprocessed as the model was trained,
and the class names to show its predictions with.

Preprocessing follows the model's own config: timm's pretrained config for a timm model
(`timm.data.resolve_model_data_config`: input size, crop fraction, interpolation, mean, std),
torchvision's default weights transforms for a torchvision one (resize, centre crop, mean,
std); ImageNet's usual 256 → 224 bilinear otherwise. `--size`, `--mean` and `--std` override
it (a smaller `--size` keeps the model's crop fraction).
"""
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    size: int                 # side of the square crop the model gets, pixels
    resize: int               # the shorter side is resized to this first, pixels
    mean: tuple               # per RGB channel, of pixel values scaled to [0, 1]
    std: tuple
    interpolation: str        # "bilinear", "bicubic" or "nearest"
    source: str               # where these numbers came from, for the report
    crop_fraction: float = 0.875  # size / resize, kept when --size changes the size

    def describe(self) -> str:
        return (f"shorter side resized to {self.resize} ({self.interpolation}), centre crop "
                f"{self.size}x{self.size}, mean {_fmt(self.mean)}, std {_fmt(self.std)} "
                f"({self.source})")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def model_config(model: nn.Module, family: str, arch: str) -> Optional[Preprocess]:
    """The preprocessing the model's pretrained weights expect, or None when neither library
    has a config for it."""
    if getattr(model, "pretrained_cfg", None) is not None or family == "timm":
        try:
            import timm
            cfg = timm.data.resolve_model_data_config(model)
        except Exception:  # noqa: BLE001  (not a timm model after all: try torchvision's)
            cfg = None
        if cfg:
            size = int(cfg["input_size"][-1])
            crop = float(cfg.get("crop_pct") or 0.875)
            return Preprocess(size, math.floor(size / crop), tuple(cfg["mean"]),
                              tuple(cfg["std"]), str(cfg.get("interpolation") or "bilinear"),
                              f"timm's pretrained config of {arch}", crop)
    if family in ("torchvision", "pickle"):
        try:
            import torchvision
            weights = torchvision.models.get_model_weights(arch).DEFAULT
            t = weights.transforms()
        except Exception:  # noqa: BLE001  (no weights registered for this name)
            return None
        size, resize = int(t.crop_size[0]), int(t.resize_size[0])
        return Preprocess(size, resize, tuple(t.mean), tuple(t.std), t.interpolation.value,
                          f"torchvision's {weights} transforms", size / resize)
    return None


def resolve(model: nn.Module, family: str, arch: str, *, size: Optional[int] = None,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
            fallback_size: int = 224) -> Preprocess:
    """The model's preprocessing with the user's overrides. ValueError for a non-positive
    size, or a mean/std that is not three numbers (std > 0)."""
    pre = model_config(model, family, arch) or Preprocess(
        fallback_size, math.floor(fallback_size / 0.875), IMAGENET_MEAN, IMAGENET_STD,
        "bilinear", "ImageNet defaults: no pretrained config known for this model")
    overridden = []
    if size is not None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"--size must be a positive number of pixels, got {size!r}")
        # timm's rule (shorter side = floor(size / crop fraction)), for torchvision's too
        pre = replace(pre, size=size, resize=max(size, math.floor(size / pre.crop_fraction)))
        overridden.append("--size")
    for option, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        value = tuple(float(v) for v in value)
        if len(value) != 3 or (option == "std" and min(value) <= 0):
            each = ", each > 0" if option == "std" else ""
            raise ValueError(f"--{option} takes three numbers (R G B){each}, got {value}")
        pre = replace(pre, **{option: value})
        overridden.append(f"--{option}")
    if overridden:
        pre = replace(pre, source=pre.source + "; " + ", ".join(overridden) + " given")
    return pre


def find(folder) -> list[Path]:
    """The JPEG and PNG files directly in `folder`, sorted by name. ValueError naming
    --images when it is not a folder or holds none."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"--images {str(path)!r}: not a folder")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images {str(path)!r}: no {', '.join(IMAGE_SUFFIXES)} files in it")
    return files


def load(files: Sequence[Path], pre: Preprocess) -> torch.Tensor:
    """(N, 3, size, size) float32: each file as RGB (grey and RGBA converted), resized,
    centre-cropped, scaled to [0, 1] and normalised. ValueError naming a file that is not an
    image."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F
    mode = InterpolationMode(pre.interpolation)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    out = torch.empty(len(files), 3, pre.size, pre.size)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"--images: {str(file)!r} is not a readable image ({exc})") from None
        rgb = F.center_crop(F.resize(rgb, pre.resize, interpolation=mode, antialias=True),
                            pre.size)
        pixels = F.pil_to_tensor(rgb).float() / 255
        out[i] = (pixels - mean) / std
    return out


def labels(path, num_classes: int) -> tuple[list[str], str]:
    """Class names (index i → name) and where they came from.

    `path`: a text file with one name per line, or a JSON list of names, or a JSON object
    mapping index → name (or → [wordnet id, name], as ImageNet's class index file does).
    Without a path: ImageNet's names (torchvision's) for 1000 classes, else "class i".
    ValueError naming --labels when the file is missing, malformed, or has a different number
    of names than the model has classes."""
    if path is None:
        if num_classes == 1000:
            try:
                import torchvision
                names = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
                return list(names), "ImageNet class names"
            except Exception:  # noqa: BLE001  (torchvision too old or missing)
                pass
        return [f"class {i}" for i in range(num_classes)], "class indices"
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--labels {str(file)!r}: no such file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix.lower() == ".json":
        import json
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--labels {str(file)!r}: not valid JSON ({exc})") from None
        if isinstance(doc, dict):
            try:
                doc = [doc[k] for k in sorted(doc, key=int)]
            except (TypeError, ValueError):
                raise ValueError(f"--labels {str(file)!r}: a JSON object's keys must be class "
                                 "indices") from None
        if not isinstance(doc, list):
            raise ValueError(f"--labels {str(file)!r}: expected a JSON list or object")
        names = [str(v[-1]) if isinstance(v, list) and v else str(v) for v in doc]
    else:
        names = text.splitlines()
        while names and not names[-1].strip():
            names.pop()
        names = [n.strip() for n in names]
    if len(names) != num_classes:
        raise ValueError(f"--labels {str(file)!r} names {len(names)} classes; the model has "
                         f"{num_classes}")
    return names, f"from {file.name}"
