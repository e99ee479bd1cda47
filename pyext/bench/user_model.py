"""The main job's model: any torchvision or timm classifier by name, with random weights or a
user's checkpoint.

Names: a torchvision classification model ("resnet50"), a timm model as "timm:<name>" or
"timm/<name>", a plain name torchvision lacks and timm has ("resnet26d"), or one of the seed
architectures no library ships as "cnnfuse/<name>" (cnnfuse.models.architectures). A checkpoint is a
`torch.save` file holding a state_dict (possibly under "state_dict", "model", ... as training
scripts save it, with DataParallel's "module." prefix), loaded with `weights_only=True`, so
loading it runs no code from the file. A whole pickled model loads only when the caller says it
trusts the file (`trust_pickle=True`), with a warning.
"""
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import zoo

# Where training scripts (timm's, torchvision's references, Lightning, plain loops) keep the
# weights inside a checkpoint dict, in the order tried.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema",
               "net", "module")
# Prefixes a wrapper adds to every key: DataParallel / DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Auxiliary classifiers the zoo builds without (they only matter in training).
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


@dataclass
class UserModel:
    model: nn.Module   # float32, eval mode, on the CPU
    family: str        # "torchvision", "timm", "cnnfuse" or "pickle" (a whole pickled model)
    arch: str          # the torchvision or timm name (preprocessing is looked up by it)
    weights: str       # where the weights came from, for the report


def resolve(name: str) -> tuple[str, str]:
    """(family, arch) for a model name; ValueError naming --model if neither library has it."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--model must be a model name, got {name!r}")
    name = name.strip()
    if name.startswith("cnnfuse/"):
        from ..models.architectures import ARCHITECTURES
        if name[8:] not in ARCHITECTURES:
            raise ValueError(f"--model {name!r}: cnnfuse.models.architectures has "
                             f"{', '.join(sorted(ARCHITECTURES))}")
        return "cnnfuse", name[8:]
    for prefix in ("timm:", "timm/"):
        if name.startswith(prefix):
            return "timm", _timm_name(name[len(prefix):], name)
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    try:
        import timm
        if timm.is_model(name):
            return "timm", name
    except ImportError:
        pass
    raise ValueError(f"--model {name!r}: not a torchvision classification model nor a timm "
                     "model (timm models also as timm:<name>)")


def _timm_name(arch: str, given: str) -> str:
    import timm
    if timm.is_model(arch):
        return arch
    close = timm.list_models(f"*{arch[:6]}*")[:5] if arch else []
    raise ValueError(f"--model {given!r}: timm has no model {arch!r}"
                     + (f" (did you mean {', '.join(close)}?)" if close else ""))


def build(family: str, arch: str, num_classes: Optional[int] = None) -> nn.Module:
    """The architecture with random weights and randomised BatchNorm statistics (a fresh
    BatchNorm is an identity and would hide folding bugs), float32, eval mode."""
    zoo_name = f"{family}/{arch}" if family in ("timm", "cnnfuse") else arch
    if zoo_name in zoo.ZOO and num_classes is None:
        return zoo.build(zoo_name)  # the zoo's exact models and seeds
    torch.manual_seed(0)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if family == "cnnfuse":
        from ..models.architectures import ARCHITECTURES
        model = ARCHITECTURES[arch](**extra)
    elif family == "timm":
        import timm
        model = timm.create_model(arch, pretrained=False, **extra)
    else:
        import torchvision
        if arch in ("googlenet", "inception_v3"):
            extra.update(aux_logits=False, init_weights=False)
        model = torchvision.models.get_model(arch, weights=None, **extra)
    return zoo.randomize_batchnorm(model).eval()


def load(name: str, checkpoint=None, *, trust_pickle: bool = False,
         num_classes: Optional[int] = None) -> UserModel:
    """The model `name` with random weights, or with the weights in `checkpoint` (a path).

    Raises ValueError (naming the option) for an unknown name, a missing or unreadable file,
    a checkpoint whose keys or shapes do not fit the architecture, or a pickled model without
    `trust_pickle`; TypeError when a pickled file holds something other than an nn.Module."""
    family, arch = resolve(name)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"--num-classes must be a positive integer, got {num_classes!r}")
    if checkpoint is None:
        return UserModel(build(family, arch, num_classes), family, arch,
                         "random weights, randomised BatchNorm statistics")
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"--checkpoint {str(path)!r}: no such file")
    content = _read(path, trust_pickle)
    if isinstance(content, nn.Module):
        return UserModel(content.float().eval(), "pickle", arch,
                         f"the whole model pickled in {path.name} ({type(content).__name__})")
    state, where = _state_dict(content, path)
    model = build(family, arch, num_classes)
    _load_into(model, state, path)
    return UserModel(model.eval(), family, arch, f"{path.name} (state_dict{where})")


def _read(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the first class the safe unpickler refused; anything else is damage
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused is None:
            raise ValueError(f"--checkpoint {str(path)!r} could not be read by torch.load: not "
                             "a torch.save file, or a damaged one") from None
        if not trust_pickle:
            raise ValueError(
                f"--checkpoint {str(path)!r} is not a plain state_dict: it pickles "
                f"{refused[1]}, which loading with weights_only=True refuses. Loading it runs "
                "code from the file: only if you trust where it came from, pass "
                "--trust-pickle (or save model.state_dict() instead)") from None
    except Exception as exc:  # noqa: BLE001  (a truncated zip, not a torch.save file, ...)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"--checkpoint {str(path)!r} could not be read by torch.load: "
                         f"{type(exc).__name__}: {first}") from None
    warnings.warn(f"--trust-pickle: loading {path} with weights_only=False, which runs any "
                  "code the file holds", UserWarning, stacklevel=3)
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001  (the pickle's own classes missing, ...)
        raise ValueError(f"--checkpoint {str(path)!r} could not be unpickled: "
                         f"{type(exc).__name__}: {exc}") from None
    if isinstance(content, nn.Module):
        return content
    if isinstance(content, dict):
        return content
    raise TypeError(f"--checkpoint {str(path)!r} holds a {type(content).__name__}, expected an "
                    "nn.Module or a state_dict")


def _is_state(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _state_dict(content, path: Path) -> tuple[dict, str]:
    """The tensors to load and where in the file they were (for the report)."""
    if not isinstance(content, dict):
        raise TypeError(f"--checkpoint {str(path)!r} holds a {type(content).__name__}, "
                        "expected a state_dict")
    if _is_state(content):
        state, where = content, ""
    else:
        key = next((k for k in _STATE_KEYS if _is_state(content.get(k))), None)
        if key is None:
            raise ValueError(f"--checkpoint {str(path)!r}: no state_dict in it (top-level keys "
                             f"{', '.join(map(str, list(content)[:8])) or 'none'}; expected "
                             f"parameter names, or one of {', '.join(_STATE_KEYS)})")
        state, where = content[key], f" under {key!r}"
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            where += f", {prefix!r} prefix dropped"
    return state, where


def _load_into(model: nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_AUX_PREFIXES)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected),
                           ("shape mismatch", wrong)):
            if keys:
                more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
                parts.append(f"{what}: {', '.join(keys[:4])}{more}")
        hint = (" (a different number of classes? pass --num-classes)"
                if wrong and not missing and not unexpected else "")
        raise ValueError(f"--checkpoint {str(path)!r} does not fit the architecture: "
                         + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=True)

