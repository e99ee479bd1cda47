"""Cached launches of a @triton.jit kernel: Triton's per-call Python work done once per
specialisation.

`kernel[grid](*args, **kwargs)` binds the arguments, specialises each one (dtype and 16-byte
alignment of pointers, divisibility by 16 and equality to 1 of ints), builds a cache key
string, looks the compiled kernel up and only then launches it: tens of µs of host time per
call, more than a small layer's GPU time. `launch` does the first call of each specialisation
that way, keeps the CompiledKernel it returns, and afterwards calls the compiled kernel's
launcher directly with the grid, the current stream and every parameter's value in the
kernel's declaration order, which is what `JITFunction.run` passes it.

The key is finer than Triton's: each int or float argument by its exact value, each tensor by
its dtype and its address modulo 16, a host-side TMA descriptor by its base's dtype and
address modulo 16, its shape, strides, box and padding, every constexpr and launch option by
value, the type of every argument, and the current device. A call that differs from a cached one in anything
Triton specialises on therefore misses and is compiled (or found) by Triton itself; a cache
held by a caller whose own key fixes shapes and strides (a fused module's plan) sees one
entry per plan.

What is launched the plain way, always: the interpreter (TRITON_INTERPRET=1; the kernel is an
InterpretedFunction), a Triton version whose launch convention has not been checked (said once),
a callable grid, a kernel with pre-run hooks, an argument that is neither a tensor nor a
plain value (its identity would be the key), an asynchronously compiled kernel.

CNNFUSE_CHECK_LAUNCH=1 checks every cached launch: each tensor argument is copied (same
strides, same address modulo 16), the plain launch runs on the copies and every tensor must
come out bit for bit equal; a RuntimeError names the first one that does not.
"""
import logging
import os

import torch
import triton

log = logging.getLogger("cnnfuse")

# Versions whose JITFunction.run launches as the direct call does: kernel.run(grid_0, grid_1,
# grid_2, stream, function, packed_metadata, launch_metadata, knobs.runtime.launch_enter_hook,
# knobs.runtime.launch_exit_hook, *bound_args.values()), every parameter's value, constexprs
# included (the launcher skips them). Read: 3.8 as installed; 3.4, 3.5 and 3.6 as the
# triton-runner project mirrors their run() per release. 3.2 and older passed only the
# non-constexpr values and CompiledKernel's own hooks: not this call.
VERIFIED_VERSIONS = ("3.4.", "3.5.", "3.6.", "3.8.")
MAX_ENTRIES = 64  # per cache: a caller feeding ever new shapes starts over, not grows
MAX_PATTERNS = 4  # binders per kernel (types of the arguments: a tensor or None, an int or a bool)

_PLAIN_VALUES = (int, float, bool, str, type(None), torch.dtype)

_ENV = getattr(os.environ, "_data", None)  # as cnnfuse.ops._eager reads it: per call, cheap
if _ENV is not None and not all(isinstance(k, bytes) for k in list(_ENV)[:1]):
    _ENV = None


def checking() -> bool:
    """CNNFUSE_CHECK_LAUNCH=1: every cached launch is compared with the plain one."""
    if _ENV is None:
        return os.environ.get("CNNFUSE_CHECK_LAUNCH") == "1"
    return _ENV.get(b"CNNFUSE_CHECK_LAUNCH") == b"1"


def _warn_once(message: str, _said=set()) -> None:
    if message not in _said:
        _said.add(message)
        log.warning("cnnfuse: %s", message)


def version_verified(version: str = None) -> bool:
    """Whether `version` (default: the installed Triton's) launches the checked way."""
    return (triton.__version__ if version is None else version).startswith(VERIFIED_VERSIONS)


class _Entry:
    """One specialisation's compiled kernel and the pieces its launcher takes."""
    __slots__ = ("kernel", "run", "function", "packed_metadata")

    def __init__(self, kernel):
        self.kernel = kernel
        self.run = kernel.run  # initialises the handles (the plain launch already did)
        self.function = kernel.function
        self.packed_metadata = kernel.packed_metadata


def make_binder(fn, classes: tuple):
    """A function of the kernel's own parameters (defaults applied, launch options as keyword
    arguments) returning (key, values): values is every parameter's value in declaration
    order, constexprs included, as Triton's binder returns them; key is what a cached launch
    must match, or None when an argument's type is not the one in `classes` (the types of
    each parameter's value that the binder was made for). Generated per kernel and type
    pattern, so binding is Python's own call machinery and each argument costs one class
    check and, for a tensor, its dtype and address."""
    params = list(fn.signature.parameters.values())
    names = [p.name for p in params]
    if len(classes) != len(names) or any(p.kind not in (p.POSITIONAL_ONLY,
                                                       p.POSITIONAL_OR_KEYWORD)
                                         for p in params):
        return None
    arglist = "".join(n + ", " if p.default is p.empty else f"{n}=_default_{n}, "
                      for n, p in zip(names, params))
    guard = " and ".join(f"{n}.__class__ is _class_{i}" for i, n in enumerate(names)) or "True"
    def part(n, c):
        if issubclass(c, torch.Tensor):
            return f"({n}.dtype, {n}.data_ptr() & 15), "
        if _is_descriptor(c):  # the launcher unpacks it: its base as a pointer, then the rest
            return (f"({n}.base.dtype, {n}.base.data_ptr() & 15, tuple({n}.shape), "
                    f"tuple({n}.strides), tuple({n}.block_shape), {n}.padding, "
                    f"getattr({n}, 'round_f32_to_tf32', False)), ")
        return f"{n}, "
    parts = "".join(part(n, c) for n, c in zip(names, classes))
    source = (f"def bind({arglist}**options):\n"
              f"    values = ({''.join(n + ', ' for n in names)})\n"
              f"    if not ({guard}):\n"
              f"        return None, values\n"
              f"    return (_classes, {parts}tuple(options.items())), values\n")
    namespace = {f"_default_{n}": p.default for n, p in zip(names, params)
                 if p.default is not p.empty}
    namespace.update({f"_class_{i}": c for i, c in enumerate(classes)}, _classes=classes)
    exec(compile(source, f"<cnnfuse launch binder {fn.__name__}>", "exec"), namespace)
    return namespace["bind"]


def _is_descriptor(cls) -> bool:
    """A host-side TMA descriptor (triton.tools.tensor_descriptor.TensorDescriptor)."""
    return cls.__name__ == "TensorDescriptor" and cls.__module__.startswith("triton.")


def bind_values(fn, args: tuple, kwargs: dict) -> tuple:
    """Every parameter's value in declaration order (what make_binder's values are)."""
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items()
                                        if k in fn.signature.parameters})
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _plain_value(v) -> bool:
    if isinstance(v, tuple):
        return all(_plain_value(x) for x in v)
    return isinstance(v, _PLAIN_VALUES) or type(v).__module__.startswith("triton.language")


def cacheable(classes: tuple, key) -> bool:
    """No argument in the key stands for itself by identity (a tensor inside a tuple, an
    object with a data_ptr that is not a tensor): such a key could match a call it does not
    fit."""
    return all(issubclass(c, torch.Tensor) or _is_descriptor(c) or _plain_value(part)
               for c, part in zip(classes, key[1:-1])) and _plain_value(key[-1])


class _Kernel:
    """What `launch` keeps on a kernel: whether it can be launched directly, its binders (one
    per type pattern seen, most recent first), its default cache."""
    __slots__ = ("direct", "binders", "cache")

    def __init__(self, kernel):
        self.binders = []
        self.cache = {}
        self.direct = isinstance(kernel, triton.runtime.JITFunction)
        # else the interpreter, or a wrapper (autotuner, heuristics) with its own run
        if self.direct and not version_verified():
            _warn_once(f"Triton {triton.__version__}: its launch convention is not among the "
                       f"checked ones ({', '.join(v + 'x' for v in VERIFIED_VERSIONS)}); "
                       "kernels are launched through Triton's own launcher")
            self.direct = False

    def bind(self, kernel, args, kwargs):
        """(key, values) from the binder of this call's type pattern, made if it is new."""
        for bind in self.binders:
            key, values = bind(*args, **kwargs)
            if key is not None:
                return key, values
        try:
            values = bind_values(kernel, args, kwargs)
        except TypeError:
            return None, None  # Triton will report the bad call
        bind = make_binder(kernel, tuple(map(type, values)))
        if bind is None:  # a signature the generated binder does not cover (*args)
            self.direct = False
            return None, None
        self.binders = [bind] + self.binders[:MAX_PATTERNS - 1]
        return bind(*args, **kwargs)


_STATE = "_cnnfuse_launch"  # the attribute holding a kernel's _Kernel (a JITFunction's hash
# is its source hash, too slow for a per-call dict key)
_driver = []  # (get_current_device, get_current_stream), resolved on the first cached launch


def _current():
    if not _driver:
        from triton.runtime.driver import driver
        _driver.append((driver.active.get_current_device, driver.active.get_current_stream))
    return _driver[0]


def _hooks():
    """Triton's launch hooks as they are now (a profiler may set them at any time)."""
    if not _runtime_knobs:
        from triton import knobs
        _runtime_knobs.append(knobs.runtime)
    runtime = _runtime_knobs[0]
    return runtime.launch_enter_hook, runtime.launch_exit_hook


_runtime_knobs = []


def plain(kernel, grid, args, kwargs):
    """Triton's own launch; returns what it returns (the CompiledKernel for a JITFunction)."""
    return kernel[grid](*args, **kwargs)


def launch(kernel, grid, args: tuple, kwargs: dict, cache: dict = None):
    """kernel[grid](*args, **kwargs), Triton's per-call work skipped after the first call of
    each specialisation. grid: a tuple of 1 to 3 ints (a callable grid launches the plain
    way). cache: where the compiled kernels are kept (a dict the caller owns, e.g. in a
    plan); default one per kernel. Returns the CompiledKernel (None under the interpreter)."""
    state = getattr(kernel, _STATE, None)
    if state is None:
        state = _Kernel(kernel)
        setattr(kernel, _STATE, state)
    if not state.direct or getattr(kernel, "pre_run_hooks", None) or callable(grid):
        return plain(kernel, grid, args, kwargs)
    key, values = state.bind(kernel, args, kwargs)
    if key is None:
        return plain(kernel, grid, args, kwargs)
    get_device, get_stream = _current()
    device = get_device()
    if cache is None:
        cache = state.cache
    entry = cache.get((device, key))
    if entry is None:
        return _first(kernel, grid, args, kwargs, cache, (device, key))
    if entry is False:
        return plain(kernel, grid, args, kwargs)
    stream = get_stream(device)
    if checking():
        return _checked(entry, kernel, grid, args, kwargs, values, stream)
    _direct(entry, grid, stream, values)
    return entry.kernel


def _no_hook(hook) -> bool:
    """None, or an empty HookChain (Triton 3.8's default): calling it does nothing."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def _direct(entry, grid, stream, values):
    enter, leave = _hooks()
    if _no_hook(enter) and _no_hook(leave):  # the launcher skips None hooks (no metadata)
        enter = leave = metadata = None
    else:
        metadata = entry.kernel.launch_metadata(grid, stream, *values)
    n = len(grid)
    entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
              entry.function, entry.packed_metadata, metadata, enter, leave, *values)


def _first(kernel, grid, args, kwargs, cache, key):
    compiled = plain(kernel, grid, args, kwargs)
    if len(cache) >= MAX_ENTRIES:
        cache.clear()
    if compiled is None or hasattr(compiled, "result") or not cacheable(key[1][0], key[1]):
        cache[key] = False  # plain from now on: nothing safe to keep
    else:
        cache[key] = _Entry(compiled)
    return compiled


def _scratch_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in new memory with t's strides and t's address modulo 16, so that the plain
    launch specialises exactly as the cached one did."""
    span = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride()) if d > 0)
    esize = t.element_size()
    buf = torch.empty(span + 16 // esize + 1, dtype=t.dtype, device=t.device)
    shift = ((t.data_ptr() & 15) - (buf.data_ptr() & 15)) % 16 // esize
    copy = buf.as_strided(t.shape, t.stride(), buf.storage_offset() + shift)
    copy.copy_(t)
    return copy


def _bits(t: torch.Tensor) -> torch.Tensor:
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(as_int) if t.dtype != torch.bool else t


def _checked(entry, kernel, grid, args, kwargs, values, stream):
    """The cached launch on the caller's tensors, the plain one on copies; bit for bit equal
    or a RuntimeError naming the argument. Where two plain launches differ too (float atomics
    add in any order), that tensor is compared to within 1e-5 of its largest value instead."""
    import dataclasses
    tensors = {}
    for name, v in zip(kernel.arg_names, values):
        t = v.base if _is_descriptor(type(v)) else v
        if isinstance(t, torch.Tensor) and id(t) not in tensors:
            tensors[id(t)] = (name, t, _scratch_copy(t), _scratch_copy(t))

    def swapped(which):
        def swap(v):
            if isinstance(v, torch.Tensor):
                return tensors[id(v)][which]
            if _is_descriptor(type(v)):
                return dataclasses.replace(v, base=tensors[id(v.base)][which])
            return v
        return tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()}
    _direct(entry, grid, stream, values)
    plain(kernel, grid, *swapped(2))
    rerun = False
    for name, v, want, again in tensors.values():
        if torch.equal(_bits(v), _bits(want)):
            continue
        if not rerun:
            plain(kernel, grid, *swapped(3))
            rerun = True
        if not torch.equal(_bits(again), _bits(want)):  # not reproducible by Triton either
            scale = want.double().abs().max().item()
            if (v.double() - want.double()).abs().max().item() <= 1e-5 * scale:
                continue
        raise RuntimeError(
            f"cnnfuse: the cached launch of {kernel.fn.__name__} wrote other bits into "
            f"{name} than Triton's own launch (CNNFUSE_CHECK_LAUNCH=1)")
    return entry.kernel
