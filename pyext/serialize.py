"""cnnfuse.save / cnnfuse.load: a fused model in one file, without the original model's code
(cnnfuse.export, in export.py, writes a torch.export program instead).

A saved model is a zip of four members: `manifest.json` (format, versions, the SHA-256 of each
other member), `model.json` (the module tree: each FX graph as a list of nodes, each module's
type and plain settings), `tensors.bin` (the raw bytes of every parameter, buffer and graph
constant, in its own memory layout, indexed in model.json) and `picks.json` (the autotuner's
picks, a picks file keyed by GPU and versions; see cnnfuse.tune).

Loading runs no code from the file. There is no pickle: JSON and raw bytes only. What a file
may name is in allowlist.py: module types (torch.nn's own modules and cnnfuse's fused ones,
rebuilt from their settings, never by calling something the file names); graph calls into
torch, its functional API, `operator`'s arithmetic, `math` and cnnfuse's graph functions;
node names and attribute paths that are identifiers, so the code FX generates from the
graph is made of them only.
`torch.export.load` is not used for this: it falls back to `torch.load(weights_only=False)` and
`pickle.loads` for some members, which runs whatever the file says.

The digests catch a truncated, damaged or hand-edited file (a clear ValueError, never a crash
or a silently different model); they do not authenticate it, as whoever edits the file can
recompute them: keep the file's own digest elsewhere to check where it came from.
"""
import functools
import hashlib
import importlib
import json
import math
import os
import types
import zipfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import fx, nn

from .allowlist import (FormatError as _Error, allowed_type, decode_function, encode_function,
                        identifier, module_path, tensor_method, type_name)
from .backend import log

FORMAT, VERSION = "cnnfuse-model", 1
MEMBERS = ("model.json", "tensors.bin", "picks.json")
PathLike = Union[str, os.PathLike]

_DTYPES = {str(d)[6:]: d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8, torch.bool)}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format,
                   "channels_last": torch.channels_last, "preserve_format": torch.preserve_format}
# nn.Module's own bookkeeping (hooks, registries): never saved, never set from a file.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}


# ------------------------------------------------------------------------------- values

def _encode(value, where: str):
    """A JSON form of a graph argument or module setting; ValueError for anything else."""
    if isinstance(value, fx.Node):
        return {"$node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[_encode(k, where), _encode(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value)[6:]}
    if isinstance(value, torch.memory_format):
        return {"$memory_format": str(value)[6:]}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if value is Ellipsis:
        return {"$ellipsis": True}
    raise _Error(f"{where}: a {type(value).__name__} cannot be saved")


def _decode(value, nodes: Optional[dict] = None):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise _Error(f"unreadable value {str(value)[:80]}")
    (tag, body), = value.items()
    if tag == "$node" and nodes is not None and body in nodes:
        return nodes[body]
    if tag == "$float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "$size" and isinstance(body, list) and all(type(v) is int for v in body):
        return torch.Size(body)
    if tag == "$tuple" and isinstance(body, list):
        return tuple(_decode(v, nodes) for v in body)
    if tag == "$dict" and isinstance(body, list) and all(
            isinstance(kv, list) and len(kv) == 2 for kv in body):
        return {_decode(k, nodes): _decode(v, nodes) for k, v in body}
    if tag == "$slice" and isinstance(body, list) and len(body) == 3:
        return slice(*(_decode(v, nodes) for v in body))
    if tag == "$dtype" and body in _DTYPES:
        return _DTYPES[body]
    if tag == "$memory_format" and body in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[body]
    if tag == "$device" and isinstance(body, str):
        return torch.device(body)
    if tag == "$ellipsis" and body is True:
        return Ellipsis
    raise _Error(f"unreadable value {str(value)[:80]}")


# ------------------------------------------------------------------------------ tensors

def _dim_order(shape, stride) -> list:
    """Dims from outermost to innermost in memory."""
    return sorted(range(len(shape)), key=lambda d: (-stride[d], -shape[d]))


class _TensorWriter:
    """Indexes tensors as the description is built; writes their bytes afterwards, one tensor
    at a time (a VGG's half gigabyte is never held twice)."""

    def __init__(self):
        self.index, self.pending, self.offset, self._seen = [], [], 0, {}

    def add(self, t: torch.Tensor) -> int:
        if id(t) in self._seen:  # a tied parameter stays one tensor
            return self._seen[id(t)]
        data = t.detach()
        if str(data.dtype)[6:] not in _DTYPES:
            raise _Error(f"a {data.dtype} tensor cannot be saved")
        order = _dim_order(data.shape, data.stride())
        if not data.permute(order).is_contiguous():  # a broadcast or sliced view: keep values
            data = data.contiguous()
            order = list(range(data.dim()))
        nbytes = data.numel() * data.element_size()
        self.index.append({"dtype": str(data.dtype)[6:], "shape": list(data.shape),
                           "stride": list(data.stride()), "device": str(t.device),
                           "offset": self.offset, "nbytes": nbytes})
        self.pending.append(data.permute(order))
        self.offset += nbytes
        self._seen[id(t)] = len(self.index) - 1
        return len(self.index) - 1

    def write(self, f) -> str:
        """Write every tensor's bytes (in its memory order) to f; returns their SHA-256."""
        digest = hashlib.sha256()
        for data in self.pending:
            raw = data.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            digest.update(raw)
            f.write(memoryview(raw))
        return digest.hexdigest()


def _read_tensor(spec, blob: bytes, device) -> torch.Tensor:
    try:
        dtype, shape, stride = _DTYPES[spec["dtype"]], spec["shape"], spec["stride"]
        offset, nbytes = spec["offset"], spec["nbytes"]
        ok = (all(type(v) is int and v >= 0 for v in shape + stride + [offset, nbytes])
              and len(shape) == len(stride))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise _Error(f"tensors: unreadable entry {str(spec)[:80]}")
    numel = math.prod(shape)
    if nbytes != numel * dtype.itemsize or offset + nbytes > len(blob):
        raise _Error(f"tensors: an entry of {nbytes} bytes at {offset} does not fit its shape "
                     f"{shape} or the {len(blob)} bytes stored")
    order = _dim_order(shape, stride)
    out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if not out.permute(order).is_contiguous():
        raise _Error(f"tensors: strides {stride} do not lay out shape {shape} densely")
    if numel:
        raw = torch.frombuffer(blob, dtype=torch.uint8, count=nbytes, offset=offset)
        out.permute(order).copy_(raw.view(dtype).reshape([shape[d] for d in order]))
    return out


# ------------------------------------------------------------------------ the module tree

def _describe(m: nn.Module, path: str, tensors: _TensorWriter) -> dict:
    where = path.rstrip(".") or "<model>"
    kind = type_name(m, where)
    if m._forward_pre_hooks or getattr(m, "_state_dict_hooks", None) or any(
            m._forward_hooks_with_kwargs.values()) or m._forward_hooks_always_called:
        raise _Error(f"module {where} has hooks (code); remove them before saving")
    desc = {"type": kind, "training": m.training,
            "forward_hooks": [_encode_hook(h, where) for h in m._forward_hooks.values()],
            "parameters": {n: None if p is None else {"tensor": tensors.add(p),
                                                      "requires_grad": p.requires_grad}
                           for n, p in m._parameters.items()},
            "buffers": {n: None if b is None else tensors.add(b)
                        for n, b in m._buffers.items()},
            "non_persistent": sorted(m._non_persistent_buffers_set),
            "modules": {n: None if c is None else _describe(c, f"{path}{n}.", tensors)
                        for n, c in m._modules.items()}}
    if desc["type"] == "graph":
        desc["class_name"] = type(m).__name__
        desc["graph"], desc["constants"] = _describe_graph(m, where, tensors)
        return desc
    attrs = {}
    for name, value in vars(m).items():
        if name in _MODULE_INTERNALS:
            continue
        try:
            attrs[name] = _encode(value, f"{where}.{name}")
        except _Error:
            if not name.startswith("_"):
                raise
            # a private cache (per-signature plans) is rebuilt on the first call
            log.debug("cnnfuse.save: %s.%s not saved (a cache)", where, name)
    desc["attributes"] = attrs
    return desc


def _encode_hook(hook, where: str) -> dict:
    """A forward hook cnnfuse itself added (fuse's layout restore at a module-tree edge): one
    of its own functions, maybe partially applied to plain values."""
    fn, args = (hook.func, hook.args) if isinstance(hook, functools.partial) and \
        not hook.keywords else (hook, ())
    module = getattr(fn, "__module__", None) or ""
    if isinstance(fn, types.FunctionType) and module.startswith("cnnfuse.models.") and \
            getattr(importlib.import_module(module), fn.__name__, None) is fn:
        return {"function": f"{module}:{fn.__name__}", "args": _encode(tuple(args), where)}
    raise _Error(f"module {where} has hooks (code); remove them before saving")


def _decode_hook(spec, where: str):
    name = spec.get("function") if isinstance(spec, dict) else None
    module, _, attr = name.partition(":") if isinstance(name, str) else ("", "", "")
    fn = None
    if module.startswith("cnnfuse.models.") and all(p.isidentifier() for p in module.split(".")) \
            and attr.isidentifier() and not attr.startswith("__"):
        try:
            fn = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            fn = None
    args = _decode(spec.get("args")) if fn is not None else None
    if not isinstance(fn, types.FunctionType) or fn.__module__ != module or \
            not isinstance(args, tuple):
        raise _Error(f"module {where}: the hook {str(spec)[:80]} is not one of cnnfuse's")
    return functools.partial(fn, *args) if args else fn


def _describe_graph(gm: fx.GraphModule, where: str, tensors: _TensorWriter):
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise _Error(f"{where}: a graph with its own code generator cannot be saved")
    nodes, constants = [], {}
    for n in gm.graph.nodes:
        at = f"{where} node {n.name}"
        if n.op == "call_function":
            target = encode_function(n.target, at)
        else:
            target = n.target
        if n.op == "get_attr":
            owner, _, attr = n.target.rpartition(".")
            holder = gm.get_submodule(owner)
            if attr not in holder._parameters and attr not in holder._buffers and \
                    attr not in holder._modules:
                value = getattr(holder, attr)
                constants[n.target] = ({"tensor": tensors.add(value)}
                                       if isinstance(value, torch.Tensor)
                                       else {"value": _encode(value, at)})
        nodes.append({"name": n.name, "op": n.op, "target": target,
                      "args": _encode(n.args, at), "kwargs": _encode(n.kwargs, at)})
    return nodes, constants


def _build(desc, path: str, tensors: list, shared: dict) -> nn.Module:
    where = path.rstrip(".") or "<model>"
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str):
        raise _Error(f"module {where}: unreadable description")
    if desc["type"] == "graph":
        m = fx.GraphModule(nn.Module(), fx.Graph(),
                           class_name=identifier(desc.get("class_name"), where))
    else:
        module_name, _, qualname = desc["type"].rpartition(".")
        cls = allowed_type(module_name, qualname)
        if cls is None:
            raise _Error(f"module {where}: type {desc['type'][:80]!r} is not one a cnnfuse "
                         "model may hold")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for name, value in (desc.get("attributes") or {}).items():
            if name in _MODULE_INTERNALS or name.startswith("__"):
                raise _Error(f"module {where}: attribute {name[:60]!r} may not be set")
            object.__setattr__(m, identifier(name, where), _decode(value))
    for name, spec in (desc.get("parameters") or {}).items():
        identifier(name, where)
        if spec is None:
            m.register_parameter(name, None)
            continue
        key = ("p", spec.get("tensor") if isinstance(spec, dict) else None)
        if key not in shared:
            shared[key] = nn.Parameter(_tensor(tensors, key[1], where),
                                       requires_grad=bool(spec.get("requires_grad")))
        m.register_parameter(name, shared[key])
    non_persistent = desc.get("non_persistent") or []
    for name, index in (desc.get("buffers") or {}).items():
        m.register_buffer(identifier(name, where),
                          None if index is None else _tensor(tensors, index, where),
                          persistent=name not in non_persistent)
    for name, child in (desc.get("modules") or {}).items():
        module_path(name, where)
        m._modules[name] = None if child is None else _build(child, f"{path}{name}.",
                                                              tensors, shared)
    if desc["type"] == "graph":
        for target, spec in (desc.get("constants") or {}).items():
            owner, _, attr = module_path(target, where).rpartition(".")
            value = (_tensor(tensors, spec.get("tensor"), where) if "tensor" in spec
                     else _decode(spec.get("value")))
            setattr(m.get_submodule(owner), attr, value)
        m.graph = _build_graph(desc.get("graph"), where)
    for hook in desc.get("forward_hooks") or []:
        m.register_forward_hook(_decode_hook(hook, where))
    m.train(bool(desc.get("training")))
    return m


def _tensor(tensors: list, index, where: str) -> torch.Tensor:
    if type(index) is not int or not 0 <= index < len(tensors):
        raise _Error(f"module {where}: tensor index {index!r} out of range")
    return tensors[index]


def _build_graph(spec, where: str) -> fx.Graph:
    if not isinstance(spec, list):
        raise _Error(f"{where}: unreadable graph")
    graph, nodes = fx.Graph(), {}
    for item in spec:
        if not isinstance(item, dict):
            raise _Error(f"{where}: unreadable graph node")
        name = identifier(item.get("name"), f"{where} node")
        at, op, target = f"{where} node {name}", item.get("op"), item.get("target")
        if op == "call_function":
            target = decode_function(target, at)
        elif op in ("placeholder",):
            target = identifier(target, at)
        elif op in ("get_attr", "call_module"):
            target = module_path(target, at)
        elif op == "call_method":
            target = tensor_method(target, at)
        elif op != "output":
            raise _Error(f"{at}: unknown node kind {str(op)[:40]!r}")
        args, kwargs = _decode(item.get("args"), nodes), _decode(item.get("kwargs"), nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict) or not all(
                isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise _Error(f"{at}: unreadable arguments")
        if target is getattr and not (len(args) == 2 and isinstance(args[1], str)
                                      and not args[1].startswith("_")):
            raise _Error(f"{at}: getattr of a private attribute")
        node = graph.create_node(op, target if op != "output" else "output", args, kwargs,
                                 name=name)
        if node.name != name or name in nodes:
            raise _Error(f"{at}: a duplicate node name")
        nodes[name] = node
    return graph


# ------------------------------------------------------------------------ save and load

def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(fused: nn.Module, path: PathLike) -> None:
    """Write `fused` (a model from cnnfuse.fuse) to `path`: its graphs, fused modules,
    parameters and buffers in their dtypes, devices and memory layouts, and the autotuner
    picks this process holds (from cnnfuse.tune or a picks file). cnnfuse.load reads it back
    without the original model's code.

    Raises TypeError for a non-module; ValueError naming the module for what a file cannot
    carry without code: a module class of the user's own (a part fuse could not trace), a
    call into a library other than torch, or hooks. cnnfuse.export handles those.
    """
    if not isinstance(fused, nn.Module):
        raise TypeError(f"fused must be a torch.nn.Module, got {type(fused).__name__}")
    from . import __version__
    from .tune import current_picks, environment
    tensors = _TensorWriter()
    model = {"root": _describe(fused, "", tensors), "tensors": tensors.index}
    picks = current_picks()
    for op, table in (fused.__dict__.get("_cnnfuse_picks") or {}).items():
        picks[op] = {**picks.get(op, {}), **table}
    members = {
        "model.json": json.dumps(model, separators=(",", ":"), allow_nan=False).encode(),
        "picks.json": json.dumps({"format": "cnnfuse-picks", "version": 1,
                                  "environment": environment(), "picks": picks}).encode()}
    listed = {n: {"sha256": _digest(d), "size": len(d)} for n, d in members.items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
            with zf.open("tensors.bin", "w", force_zip64=True) as f:
                listed["tensors.bin"] = {"sha256": tensors.write(f), "size": tensors.offset}
            manifest = {"format": FORMAT, "version": VERSION, "cnnfuse": __version__,
                        "torch": torch.__version__, "members": listed}
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
        os.replace(tmp, path)  # a reader never sees half a file
    finally:
        tmp.unlink(missing_ok=True)


def _read_members(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read("manifest.json"))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise _Error("not a cnnfuse model file")
            if manifest.get("version") != VERSION:
                raise _Error(f"format version {manifest.get('version')!r}; this cnnfuse reads "
                             f"version {VERSION}")
            listed = manifest.get("members")
            if not isinstance(listed, dict) or set(listed) != set(MEMBERS):
                raise _Error(f"the manifest lists {sorted(listed or [])}, not {list(MEMBERS)}")
            members = {name: zf.read(name) for name in MEMBERS if name != "tensors.bin"}
            with zf.open("tensors.bin") as f:  # read in place: torch.frombuffer shares it
                blob = bytearray(zf.getinfo("tensors.bin").file_size)
                if f.readinto(memoryview(blob)) != len(blob) or f.read(1):
                    raise _Error("tensors.bin is shorter or longer than its zip entry says")
                members["tensors.bin"] = blob
    except KeyError as exc:
        raise _Error(f"a member is missing ({exc})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise _Error(f"not a cnnfuse model file, or truncated or damaged ({exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Error(f"unreadable manifest ({exc})") from None
    for name, data in members.items():
        want = listed[name]
        if not isinstance(want, dict) or want.get("size") != len(data) or \
                want.get("sha256") != _digest(data):
            raise _Error(f"{name} does not match the SHA-256 in the manifest: the file was "
                         "changed or damaged after it was saved")
    return members


def _saved_device(spec) -> torch.device:
    device = torch.device(str(spec.get("device") if isinstance(spec, dict) else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Error(f"it was saved on {device} and this process has no CUDA device; pass "
                     "map_location='cpu'")
    return device


def load(path: PathLike, map_location: Union[str, torch.device, None] = None) -> nn.Module:
    """The model cnnfuse.save wrote to `path`, in eval mode (as saved), computing what the
    saved model computed, bit for bit on the same device. map_location: the device for every
    tensor (default: the device each was saved from). The picks saved with it are used when
    they were made on this GPU with these versions (else ignored, with a log line).

    Runs no code from the file (see the module docstring). Raises ValueError for a file that
    is not a cnnfuse model, is truncated, damaged or edited (its digests do not match), or
    names a module type or call outside the allowlist; FileNotFoundError for a missing path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r}: no such file")
    try:
        device = None if map_location is None else torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"map_location {map_location!r} is not a device ({exc})") from None
    try:
        members = _read_members(path)
        model = json.loads(members["model.json"])
        picks = json.loads(members["picks.json"])
        blob = members["tensors.bin"]
        index = model.get("tensors") if isinstance(model, dict) else None
        if not isinstance(index, list):
            raise _Error("model.json has no tensor index")
        tensors = [_read_tensor(spec, blob, device or _saved_device(spec)) for spec in index]
        fused = _build(model.get("root"), "", tensors, {})
        for gm in fused.modules():
            if isinstance(gm, fx.GraphModule):
                gm.graph.lint()
    except _Error as exc:
        raise ValueError(f"cnnfuse.load: {path}: {exc}") from None
    except (KeyError, TypeError, AttributeError, RuntimeError, json.JSONDecodeError,
            UnicodeDecodeError) as exc:  # a well-formed file never gets here
        raise ValueError(f"cnnfuse.load: {path}: malformed model description "
                         f"({type(exc).__name__}: {exc})") from None
    from .tune import use_picks
    try:
        if isinstance(picks, dict) and picks.get("picks"):
            use_picks(picks)
    except ValueError as exc:
        raise ValueError(f"cnnfuse.load: {path}: {exc}") from None
    return fused
