"""What a saved cnnfuse model may name, so that loading it runs no code of the file's: module
types (torch.nn's own and cnnfuse's fused modules), graph calls (torch, its functional API,
`operator`'s arithmetic, `math`, cnnfuse's graph functions and ops), tensor methods, node
names and attribute paths (identifiers, which is all the code FX generates from a graph is
made of besides these)."""
import builtins
import importlib
import keyword
import math
import operator
import types

import torch
import torch.nn.functional as F
from torch import fx, nn


class FormatError(ValueError):
    """A saved model that is not what cnnfuse writes."""


_FUNCTION_NAMESPACES = {"operator": operator, "math": math, "torch": torch,
                        "torch.nn.functional": F, "builtins": builtins}
_OP_NAMESPACES = ("aten", "cnnfuse")
# operator's arithmetic, comparisons and indexing only: attrgetter, methodcaller and call
# would reach any attribute or callable, private ones included.
_OPERATORS = frozenset((
    "abs add and_ concat contains eq floordiv ge getitem gt iadd iand iconcat ifloordiv "
    "ilshift imatmul imod imul index inv invert ior ipow irshift is_ is_not isub itruediv "
    "ixor le lshift lt matmul mod mul ne neg not_ or_ pos pow rshift setitem sub truediv "
    "truth xor").split())
# cnnfuse's own functions that a fused graph calls (concat buffers, the SE scale, layout
# restores, the ops) live here; the rest of cnnfuse (save, load, the bench) is never a target.
_CNNFUSE_NAMESPACES = ("cnnfuse.models.modules.", "cnnfuse.models.passes.", "cnnfuse.ops")
_TENSOR_DUNDERS = {f"__{n}__" for n in (
    "getitem add sub mul truediv floordiv mod pow matmul and or xor neg pos invert abs "
    "radd rsub rmul rtruediv rfloordiv lt le gt ge eq ne iadd isub imul itruediv").split()}


# ------------------------------------------------------------------------ module types

def type_name(m: nn.Module, path: str) -> str:
    cls = type(m)
    if isinstance(m, fx.GraphModule):
        return "graph"
    # A container subclass that only builds its children (torchvision's Conv2dNormActivation)
    # runs as its base: the children are all it holds.
    for base in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        if isinstance(m, base) and getattr(cls, "forward", None) is getattr(base, "forward", None):
            cls = base
    name = f"{cls.__module__}.{cls.__qualname__}"
    if allowed_type(cls.__module__, cls.__qualname__) is not cls:
        raise FormatError(f"module {path} is a {name}, code of its own that a file "
                     "cannot carry safely; cnnfuse.export(model, example_inputs, path) writes "
                     "a torch.export program instead")
    return name


def allowed_type(module_name: str, qualname: str):
    """The class, if it is one of torch.nn's own modules or a cnnfuse fused module."""
    if not (module_name.startswith(("torch.nn.modules.", "cnnfuse.models.modules."))
            and qualname.isidentifier() and not qualname.startswith("_")):
        return None
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


# ---------------------------------------------------------------------- graph targets

def encode_function(fn, where: str):
    if isinstance(fn, torch._ops.OpOverload):
        ns, name = fn._schema.name.split("::")
        if ns in _OP_NAMESPACES:
            return {"op": f"{ns}::{name}", "overload": fn._overloadname}
    if isinstance(fn, torch._ops.OpOverloadPacket):
        ns, name = fn._qualified_op_name.split("::")
        if ns in _OP_NAMESPACES:
            return {"op": f"{ns}::{name}", "overload": None}
    module = getattr(fn, "__module__", None) or ""
    namespaces = dict(_FUNCTION_NAMESPACES)
    if module.startswith("cnnfuse."):
        namespaces = {module: importlib.import_module(module)}
    for ns_name, ns in namespaces.items():
        for name, obj in vars(ns).items():
            if obj is fn and _resolve_function(ns_name, name) is fn:
                return {"function": f"{ns_name}:{name}"}
    raise FormatError(f"{where}: calls {getattr(fn, '__qualname__', fn)!r} from {module or '?'}, "
                 "which is not torch, operator, math or cnnfuse; cnnfuse.export writes a "
                 "torch.export program instead")


def _resolve_function(ns_name: str, name: str):
    """The function a saved name may stand for, or None: torch's builtins and torch.functional,
    torch.nn.functional, operator, math, builtins.getattr and cnnfuse's public functions."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    if ns_name.startswith("cnnfuse."):
        if not _graph_namespace(ns_name):
            return None
        try:
            ns = importlib.import_module(ns_name)
        except ImportError:
            return None
        fn = getattr(ns, name, None)
        return fn if isinstance(fn, types.FunctionType) and fn.__module__ == ns_name else None
    ns = _FUNCTION_NAMESPACES.get(ns_name)
    fn = getattr(ns, name, None) if ns is not None else None
    if fn is None or isinstance(fn, type) or not callable(fn):
        return None
    if ns is builtins:
        return fn if fn is getattr else None
    if ns is operator:
        return fn if name in _OPERATORS else None
    home = getattr(fn, "__module__", None)
    if ns is torch and not (isinstance(fn, types.BuiltinFunctionType)
                            or home == "torch.functional"):
        return None  # torch.load, torch.save, torch.compile, ... are not graph calls
    if ns is F and not (isinstance(fn, types.BuiltinFunctionType)
                        or home in ("torch.nn.functional", "torch._C._nn")):
        return None  # handle_torch_function, boolean_dispatch: they call what they are given
    return fn if name != "from_file" else None


def _graph_namespace(ns_name: str) -> bool:
    return (all(p.isidentifier() for p in ns_name.split("."))
            and (ns_name == "cnnfuse.ops" or ns_name.startswith(_CNNFUSE_NAMESPACES)))


def decode_function(spec, where: str):
    fn = None
    if isinstance(spec, dict) and isinstance(spec.get("function"), str) and \
            spec["function"].count(":") == 1:
        fn = _resolve_function(*spec["function"].split(":"))
    elif isinstance(spec, dict) and isinstance(spec.get("op"), str):
        ns, _, name = spec["op"].partition("::")
        overload = spec.get("overload")
        if ns in _OP_NAMESPACES and name.isidentifier() and (
                overload is None or (isinstance(overload, str) and overload.isidentifier())):
            try:
                packet = getattr(getattr(torch.ops, ns), name)
                fn = packet if overload is None else getattr(packet, overload)
            except (AttributeError, RuntimeError):
                fn = None
    if fn is None:
        raise FormatError(f"{where}: the call {str(spec)[:80]} is not one a cnnfuse model may make")
    return fn


def identifier(name, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise FormatError(f"{where}: {str(name)[:60]!r} is not an identifier")
    return name


def module_path(path, where: str) -> str:
    if not isinstance(path, str) or not all((p.isidentifier() and not p.startswith("__"))
                                            or p.isdigit() for p in path.split(".")):
        raise FormatError(f"{where}: {str(path)[:60]!r} is not an attribute path")
    return path


def tensor_method(name, where: str) -> str:
    if isinstance(name, str) and (name in _TENSOR_DUNDERS or (
            name.isidentifier() and not name.startswith("_") and hasattr(torch.Tensor, name))):
        return name
    raise FormatError(f"{where}: {str(name)[:60]!r} is not a tensor method")
