"""A fused module's plan once its backend is known for good: that backend called directly.

`cnnfuse.ops._eager` plans on every backend but the reference start by calling the op's
implementation (`conv2d._run`, `run_pair`), which per call looks the backend up, builds the
candidate list and the autotuner's key, and asks the autotuner. Once the answer cannot change
for the plan's inputs (the CPU builds: at once; CUDA: the autotuner's pick is final, see
`autotune.Pick`), the plan keeps what `_run` would call, with its config, and calls only that,
after the same operand conversions `_run` makes. `valid()` sends it back to `_run` whenever
the picks could change.
"""
import functools
import importlib
import sys

import torch

from .. import autotune, ref
from ..backend import ran, triton_interpreting, warn_once

_CL = torch.channels_last


def op_module(name: str):
    """cnnfuse.ops.<name> the module (the package's attribute of that name is the function)."""
    module = sys.modules.get(f"{__package__}.{name}")
    return module if module is not None else importlib.import_module(f".{name}", __package__)


class _Resolved:
    """A backend picked for good, while the picks it came from stand."""
    __slots__ = ("tuned", "preset", "tf32")

    def __init__(self, tuned: bool):
        self.tuned = tuned  # from an autotuner pick (else fixed by the plan's key)
        self.preset, self.tf32 = autotune.preset, torch.backends.cudnn.allow_tf32

    def valid(self) -> bool:
        return not self.tuned or (autotune.preset is self.preset and autotune.recording is None
                                  and torch.backends.cudnn.allow_tf32 is self.tf32)


class DirectConv(_Resolved):
    """One conv backend of `conv2d._run`, called as `_run` would call it for this plan's
    inputs: kind 'triton' (the Triton kernel at `config`, prologue and pool in the kernel),
    'depthwise' (the C++ kernel, pooling in its epilogue), 'cudnn_fused' or 'cudnn' (a library
    conv; the prologue and the pool as passes of their own)."""
    __slots__ = ("kind", "config", "label", "geometry", "to_cl", "residual_to_cl",
                 "weight_to_cl")

    def __init__(self, kind, config, label, geometry, x, weight, residual, tuned):
        super().__init__(tuned)
        self.kind, self.config, self.label, self.geometry = kind, config, label, geometry
        from .depthwise_conv2d import is_depthwise
        cuda = x.device.type == "cuda"  # _run makes NHWC operands on CUDA only
        self.to_cl = cuda and x.stride(1) != 1 and x.shape[1] > 1
        self.residual_to_cl = cuda and residual is not None and not residual.is_contiguous(
            memory_format=_CL)
        # as _run: a depthwise conv's weight keeps its (tap-major packed) layout whichever
        # backend runs it, the layout the autotuner timed and checked
        self.weight_to_cl = cuda and not is_depthwise(x, weight, geometry[3])

    @classmethod
    def from_pick(cls, picks, x, weight, residual, geometry):
        """The backend of the one final conv2d pick in `picks`, or None."""
        pick = _only_pick(picks, "conv2d")
        if pick is None:
            return None
        from .conv2d import backend_label
        name = pick.name
        if name.startswith("triton_"):
            config = _config_named(pick.candidate, name)
            if config is None:
                return None
            return cls("triton", config, backend_label(name), geometry, x, weight, residual,
                       True)
        if name in ("depthwise", "cudnn_fused", "cudnn"):
            return cls(name, None, backend_label(name), geometry, x, weight, residual, True)
        return None

    @classmethod
    def for_cpu(cls, x, weight, geometry):
        """What `_run` runs on CPU tensors under CNNFUSE_BACKEND=cuda (the CPU build of the
        C++ kernels) or triton (the interpreter), or None (it falls back to the reference)."""
        from ..backend import requested_backend
        from .depthwise_conv2d import is_depthwise
        backend, groups = requested_backend(), geometry[3]
        if backend == "cuda":
            if is_depthwise(x, weight, groups):
                return cls("depthwise", None, "CUDA C++ depthwise (CPU build)", geometry, x,
                           weight, None, False)
            return cls("cudnn", None, "PyTorch conv + bias_act (CPU build)", geometry, x,
                       weight, None, False)
        if backend == "triton" and triton_interpreting():
            from ..kernels import conv2d as kernel
            config = kernel.INTERPRETER_CONFIG if groups == 1 else \
                kernel.INTERPRETER_GROUPED_CONFIG
            return cls("triton", config, "Triton (interpreter)", geometry, x, weight, None,
                       False)
        return None

    def __call__(self, x, weight, bias, residual, input_scale, input_affine, dest, pool):
        op = op_module("conv2d")
        ran("conv2d", self.label)
        stride, pads, dilation, groups, activation, input_activation = self.geometry
        if self.to_cl:
            warn_once("conv2d: input is not channels_last; converting it costs a copy per call "
                      "(pass channels_last tensors, or use cnnfuse.fuse which does)")
            x = x.contiguous(memory_format=_CL)
        if self.residual_to_cl:
            residual = residual.contiguous(memory_format=_CL)
        if self.weight_to_cl:
            weight = weight.contiguous(memory_format=_CL)
        kind = self.kind
        if kind == "triton":
            return op._triton(self.config, x, weight, bias, stride, pads, dilation, groups,
                              activation, residual, dest,
                              (input_scale, input_affine, input_activation), pool)
        if input_scale is not None or input_affine is not None:
            x = ref.prologue(x, input_scale, input_affine, input_activation)
        if kind == "depthwise":
            return op._depthwise(x, weight, bias, stride, pads, dilation, groups, activation,
                                 residual, dest, pool)
        fn = op._cudnn_fused if kind == "cudnn_fused" else op._library_conv
        y = fn(x, weight, bias, stride, pads, dilation, groups, activation, residual, dest)
        if pool is not None:
            torch.mean(y, (2, 3), dtype=torch.float32, out=pool)
        return y


def _only_pick(picks, op: str):
    """The one pick for `op` among those one call made, if it is final (the two-ops backend
    of a pair makes picks of its own, for its convs)."""
    mine = [p for p in picks if p.op == op]
    return mine[0] if len(mine) == 1 and mine[0].final else None


def _config_named(candidate, name: str):
    """The kernel config named `name` inside an autotuner candidate (a functools.partial of a
    Triton launcher, possibly wrapped in another), or None."""
    seen = 0
    while isinstance(candidate, functools.partial) and seen < 4:
        for arg in candidate.args:
            if getattr(arg, "name", None) == name:
                return arg
        candidate = next((a for a in candidate.args if isinstance(a, functools.partial)),
                         candidate.func)
        seen += 1
    return None


class DirectPair(_Resolved):
    """One backend of `run_pair` (the Triton kernel at a config, or the two ops) called with
    the op's `_run` arguments, x made channels_last first on CUDA as run_pair does."""
    __slots__ = ("op", "fn", "label", "to_cl")

    def __init__(self, op, fn, label, x, tuned):
        super().__init__(tuned)
        self.op, self.fn, self.label = op, fn, label
        self.to_cl = x.device.type == "cuda" and x.stride(1) != 1 and x.shape[1] > 1

    @classmethod
    def from_pick(cls, picks, op: str, x):
        """The backend of the one final pick for `op` in `picks`, or None."""
        pick = _only_pick(picks, op)
        if pick is None:
            return None
        from .conv2d import backend_label
        module, name = op_module(op), pick.name
        if name == "two_ops":
            return cls(op, module._two_ops, backend_label(name), x, True)
        if name.startswith("triton_"):
            config = _config_named(pick.candidate, name)
            if config is not None:
                return cls(op, functools.partial(module._triton, config),
                           backend_label(name), x, True)
        return None

    @classmethod
    def for_cpu(cls, op: str, x):
        """What `run_pair` runs on CPU tensors under CNNFUSE_BACKEND=cuda, or triton with the
        interpreter; None elsewhere (the op's implementation then says why it falls back)."""
        from ..backend import requested_backend
        backend, module = requested_backend(), op_module(op)
        if backend == "cuda":
            return cls(op, module._two_ops, "two ops (CPU build)", x, False)
        if backend == "triton" and triton_interpreting():
            from ..kernels import conv2d as kernel
            return cls(op, functools.partial(module._triton, kernel.INTERPRETER_CONFIG),
                       "Triton (interpreter)", x, False)
        return None

    def __call__(self, args):
        ran(self.op, self.label)
        if self.to_cl:
            warn_once(f"{self.op}: input is not channels_last; converting it costs a copy")
            args = (args[0].contiguous(memory_format=_CL),) + args[1:]
        return self.fn(*args)
