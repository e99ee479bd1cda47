"""FusedConv2d: a Conv2d with BatchNorm folded in and activation / residual in its epilogue."""
from typing import Optional

import torch
from torch import nn

from ... import ops
from ...backend import warn_once
from ...ops import _eager
from ...ops._eager import signature
from ...ops.conv2d import output_hw
from ...ops.depthwise_conv2d import pack_weight as pack_depthwise
from ...ref import activation_code, apply_activation
from .precision import fits


def _fits(residual, x: torch.Tensor, conv: "FusedConv2d") -> bool:
    if not isinstance(residual, torch.Tensor) or residual.dtype != x.dtype:
        return False
    oh, ow = output_hw(x.shape[2], x.shape[3], conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation)
    return tuple(residual.shape) == (x.shape[0], conv.out_channels, oh, ow)


def _describe(r) -> str:
    return f"{tuple(r.shape)} {r.dtype}" if isinstance(r, torch.Tensor) else type(r).__name__


def with_epilogue(module: nn.Module, op, x: torch.Tensor, residual, out, activation: str):
    """op(activation=, residual=, out=) for a fused pair (FusedSeparableConv2d,
    FusedPoolConv2d) whose second conv ends in `activation`; a broadcast or mixed-dtype
    residual is added outside the kernel (exact, just not fused): op() then the add."""
    name = type(module).__name__
    if module.has_residual != (residual is not None):
        raise ValueError(f"{name} was built with has_residual={module.has_residual} but "
                         f"forward got residual={'a tensor' if residual is not None else 'None'}")
    if residual is not None and not _fits(residual, x, module):
        warn_once(f"{name}: residual {_describe(residual)} does not match the output; adding "
                  "it outside the kernel")
        y = apply_activation(op() + residual, activation)
        return y if out is None else out.copy_(y)
    return op(activation=activation, residual=residual, out=out)


def bn_affine(bn: nn.BatchNorm2d) -> tuple:
    """An eval-mode BatchNorm as y = x · scale + shift, per channel, in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


class FusedConv2d(nn.Module):
    """act(conv2d(x, weight) + bias + residual) through `cnnfuse.ops.conv2d`.

    `weight` and `bias` are the folded parameters; BatchNorm statistics are gone once folded.
    With `has_residual`, forward takes the tensor to add as its second argument.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=(1, 1),
                 padding=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1, bias: bool = True,
                 activation: str = "none", has_residual: bool = False):
        super().__init__()
        activation_code(activation)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kh, kw)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = tuple(padding)  # (left, right, top, bottom)
        self.activation, self.has_residual = activation, has_residual
        self.has_input_scale = False  # forward takes a squeeze-excitation gate (N, C_in)
        # forward returns (y, mean_hw(y) as (N, C_out) float32): an SE block's squeeze, summed
        # in the epilogue instead of read back
        self.returns_pooled = False
        # A BatchNorm (+ activation) before the conv, applied as the input loads: (2, C_in)
        # scale and shift rows.
        self.register_buffer("input_affine", None)
        self.input_activation = "none"
        self.folded_bn = False
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None

    def _apply(self, fn, *args, **kwargs):
        # The prologue's scale and shift stay float32 whatever dtype the model is cast to: the
        # shift cancels against x · scale, and fp16 would lose what eager BatchNorm keeps.
        affine = self.input_affine
        # Weights (and bias) that a cast would take out of the new dtype's range, or a channel
        # wholly into its subnormals, stay float32 (forward computes in the weight's dtype
        # then): eager never rounds the product of a conv weight and a BatchNorm scale (or a
        # merged or scaled weight) to the low-precision dtype.
        before = {name: p.data for name, p in self._parameters.items() if p is not None}
        result = super()._apply(fn, *args, **kwargs)
        if affine is not None:
            moved = self._buffers["input_affine"]
            self._buffers["input_affine"] = affine.to(device=moved.device, dtype=torch.float32)
        after = {name: p.data for name, p in self._parameters.items() if p is not None}
        if any(a.dtype != b.dtype and a.dtype.itemsize < 4
                                  and not fits(b, a.dtype)
                                  for a, b in zip(after.values(), before.values())):
            for name, old in before.items():
                new = after[name]
                self._parameters[name].data = old.to(device=new.device, dtype=torch.float32)
            self.pack_weight()
        return result

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FusedConv2d":
        """A copy of `conv` (zeros padding) with the weight in channels_last."""
        if isinstance(conv.padding, str):
            from ..ops.conv2d import normalize_padding
            padding = normalize_padding(conv.padding, conv.kernel_size, list(conv.stride),
                                        list(conv.dilation))
        else:
            ph, pw = conv.padding
            padding = (pw, pw, ph, ph)
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None)
        fused.weight.data = conv.weight.detach().clone()
        fused.pack_weight()
        if conv.bias is not None:
            fused.bias.data = conv.bias.detach().clone()
        return fused

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels and self.weight.shape[1] == 1

    def pack_weight(self) -> None:
        """The layout the kernels read fastest: channels_last, or tap-major for depthwise
        (16-byte channel vectors per tap). Any layout computes the same result."""
        w = self.weight.data
        self.weight.data = (pack_depthwise(w) if self.depthwise
                            else w.contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def absorb_input_bn(self, bn: nn.BatchNorm2d, activation: str = "none") -> None:
        """Apply an eval-mode BatchNorm that feeds this conv (and the activation after it) to
        the input as it loads: a pre-activation block."""
        if self.input_affine is not None or self.has_input_scale:
            raise ValueError("absorb_input_bn: the conv already has an input prologue")
        activation_code(activation)
        scale, shift = bn_affine(bn)
        self.input_affine = torch.stack([scale, shift]).float().to(self.weight.device)
        self.input_activation = activation

    @torch.no_grad()
    def fold_bn(self, bn: nn.BatchNorm2d) -> None:
        """Fold an eval-mode BatchNorm that reads this conv's output, using its running
        statistics (in float64, then back to the weight's dtype)."""
        if self.activation != "none" or self.has_residual:
            raise ValueError("fold_bn: BatchNorm must come before the activation and residual add")
        scale, shift = bn_affine(bn)
        if self.bias is not None:
            shift = shift + self.bias.double() * scale
        dtype, device = self.weight.dtype, self.weight.device
        self.weight.data = (self.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype)
        self.pack_weight()
        self.bias = nn.Parameter(shift.to(dtype=dtype, device=device), requires_grad=False)
        self.folded_bn = True

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                input_scale: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None):
        """out: a view of the result's shape to write into (a slice of a concatenation).

        A weight in another dtype than x (kept wider so it does not overflow) computes in the
        weight's dtype; the result comes back in x's. Eager calls run a plan cached per call
        signature (`cnnfuse.ops._eager`); tracing, compiling and capturing take the op."""
        if _eager.active(x):
            weight, bias = self._parameters["weight"], self._parameters.get("bias")
            affine = self._buffers.get("input_affine")
            key = (signature(x), signature(residual), signature(input_scale), signature(out),
                   weight.dtype, weight.device, None if bias is None else bias.dtype,
                   None if affine is None else affine.device, _eager.environment(),
                   self.activation, self.has_residual, self.has_input_scale,
                   self.returns_pooled, self.input_activation, self.stride, self.padding,
                   self.dilation, self.groups)
            plan = _eager.cached(self, key,
                                 lambda: self._eager_plan(x, residual, input_scale, out))
            if plan is not None:
                if self.returns_pooled:
                    pool = torch.empty((x.shape[0], self.out_channels), dtype=torch.float32,
                                       device=x.device)
                    return plan(x, weight, bias, residual, input_scale, affine, None, pool), pool
                return plan(x, weight, bias, residual, input_scale, affine, out)
        return self._forward_op(x, residual, input_scale, out)

    def _eager_plan(self, x, residual, input_scale, out):
        """The cached plan for calls like this one, or None where the op path handles it (a
        missing or unexpected argument, which it reports; a broadcast or mixed-dtype
        residual)."""
        if (self.has_residual != (residual is not None)
                or self.has_input_scale != (input_scale is not None)
                or (residual is not None and not _fits(residual, x, self))):
            return None
        return _eager.plan_conv2d(x, self.weight, self.bias, self.stride, list(self.padding),
                                  self.dilation, self.groups, self.activation, residual,
                                  input_scale, self.input_affine, self.input_activation, out,
                                  self.returns_pooled)

    def _check_inputs(self, residual, input_scale) -> None:
        """A residual and an input scale exactly where the module was built to take them."""
        for flag, name, value in ((self.has_residual, "residual", residual),
                                  (self.has_input_scale, "input_scale", input_scale)):
            if flag != (value is not None):
                raise ValueError(f"{self.__class__.__name__} was built with has_{name}={flag} "
                                 f"but forward got {name}="
                                 f"{'a tensor' if value is not None else 'None'}")

    def _in_weight_dtype(self, forward, x, residual, input_scale, out):
        """forward(x, residual, input_scale, None) computed in the weight's (wider) dtype,
        returned in x's, into `out` if given, with the pooled mean of what is returned."""
        dtype = self.weight.dtype

        def wide(t):
            return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == x.dtype else t
        y = forward(x.to(dtype), wide(residual), wide(input_scale), None)
        y = (y[0] if self.returns_pooled else y).to(x.dtype)
        y = y if out is None else out.copy_(y)
        return (y, y.mean((2, 3), dtype=torch.float32)) if self.returns_pooled else y

    def _forward_op(self, x, residual, input_scale, out):
        """forward through `cnnfuse.ops.conv2d` (the torch.library op)."""
        self._check_inputs(residual, input_scale)
        if _eager.wider_weight(self.weight, x):
            return self._in_weight_dtype(self._forward_op, x, residual, input_scale, out)
        if residual is not None and not _fits(residual, x, self):
            # A broadcast or mixed-dtype add: exact, just not fused.
            warn_once(f"FusedConv2d: residual {_describe(residual)} does not match the conv "
                      "output; adding it outside the kernel")
            y = apply_activation(self._conv_only(x, input_scale) + residual, self.activation)
            y = y if out is None else out.copy_(y)
            return (y, y.mean((2, 3), dtype=torch.float32)) if self.returns_pooled else y
        return ops.conv2d(x, self.weight, self.bias, self.stride, list(self.padding),
                          self.dilation, self.groups, activation=self.activation,
                          residual=residual, input_scale=input_scale,
                          input_affine=self.input_affine,
                          input_activation=self.input_activation, out=out,
                          return_pooled=self.returns_pooled)

    def _conv_only(self, x, input_scale):
        """The conv and its prologue without activation or residual (through the op)."""
        return ops.conv2d(x, self.weight, self.bias, self.stride, list(self.padding),
                          self.dilation, self.groups, input_scale=input_scale,
                          input_affine=self.input_affine,
                          input_activation=self.input_activation)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}",
                 f"stride={self.stride}", f"padding={self.padding}"]
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.folded_bn:
            parts.append("bn=folded")
        if self.activation != "none":
            parts.append(f"activation={self.activation}")
        if self.has_residual:
            parts.append("residual=add")
        if self.has_input_scale:
            parts.append("input_scale=se_gate")
        if self.input_affine is not None:
            parts.append(f"input=bn+{self.input_activation}")
        if self.returns_pooled:
            parts.append("returns_pooled")
        return ", ".join(parts)
