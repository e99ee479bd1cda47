"""Differential fuzzer: random small networks (fuzz_programs) fused and run against the
original, in float32, float16 and bfloat16, NCHW or channels_last, on the reference path and
on the kernels' CPU paths. The fused result must be within twice eager's own error against a
float64 run of the same network (the op contract's bound), with eager's output layout, for
every way the network may be called.

CI runs a fixed set (derandomised); `pytest tests/models/test_fuzz.py --fuzz-examples N`
draws N fresh programs per test. A program that once failed stays below as a named
regression."""
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnfuse

from ..util import DTYPE_IDS, DTYPES, triton_runnable
from .fuzz_programs import ACTIVATIONS, Conv, build, programs

# |fused - ref64| <= 2 |eager - ref64| + ATOL * max(|ref64|, 1), maximum over each output:
# the op contract's bound; the atol is one unit in the last place of the largest value for
# float16 / bfloat16 (a network of a few dozen outputs may see eager round luckily where a
# fused epilogue rounds once), and the model tests' 1e-5 for float32.
ATOL = {torch.float32: 1e-5, torch.float16: torch.finfo(torch.float16).eps,
        torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def _clone(x):
    return x.clone(memory_format=torch.preserve_format)


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


def _run(model, x, skip):
    with torch.no_grad():
        return _flat(model(_clone(x)) if skip is None else model(_clone(x), _clone(skip)))


def check_program(program, dtype, channels_last=False, model_channels_last=False,
                  memory_format=torch.channels_last):
    """Fuse the program's network and compare it with the original; pytest.skip where eager
    itself fails or overflows (nothing to compare)."""
    n, c, h, w = program["input"]
    g = torch.Generator().manual_seed(sum(program["input"]) + len(program["steps"]))
    x64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    x = x64.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x64 = x.double()  # the same rounded input
    model = build(program)
    if model_channels_last:
        model = model.to(memory_format=torch.channels_last)
    ref_model = build(program).double()
    eager_model = build(program).to(dtype)
    if model_channels_last:
        eager_model = eager_model.to(memory_format=torch.channels_last)
        ref_model = ref_model.to(memory_format=torch.channels_last)
    calls = [None]
    if program.get("default_arg"):
        out_shape = _run(build(program), x64.float(), None)[0].shape
        calls.append(torch.randn(out_shape, generator=g, dtype=torch.float64))
    try:
        wants = [(_run(eager_model, x, None if s is None else s.to(dtype)),
                  _run(ref_model, x64, s)) for s in calls]
    except RuntimeError as exc:  # e.g. a .view eager cannot take on channels_last
        pytest.skip(f"eager fails: {str(exc).splitlines()[0][:80]}")
    for eager, ref in wants:
        if not all(torch.isfinite(t).all() for t in eager + ref if t.is_floating_point()):
            pytest.skip("eager overflows in this dtype")
    fused = cnnfuse.fuse(model, dtype=dtype, memory_format=memory_format)
    for s, (eager, ref) in zip(calls, wants):
        got = _run(fused, x, None if s is None else s.to(dtype))
        assert len(got) == len(eager)
        for i, (ours, theirs, want) in enumerate(zip(got, eager, ref)):
            where = f"output {i} ({'skip given' if s is not None else 'default call'})"
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, where
            assert torch.isfinite(ours).all(), f"{where}: non-finite values"
            err = (ours.double() - want).abs().max().item()
            bound = 2 * (theirs.double() - want).abs().max().item() + ATOL[dtype] * max(
                want.abs().max().item(), 1.0)
            assert err <= bound, f"{where}: error {err:.3e} > bound {bound:.3e}"
            # NCHW in, NCHW out (with channels_last inputs or weights, eager's own layouts
            # vary by op: a concatenation of mixed layouts, a shuffle's .contiguous(); the
            # fused model keeps to channels_last there)
            if ours.dim() == 4 and not channels_last and not model_channels_last:
                assert ours.is_contiguous() == theirs.is_contiguous() and (
                    ours.is_contiguous(memory_format=torch.channels_last)
                    == theirs.is_contiguous(memory_format=torch.channels_last)), \
                    f"{where}: layout {ours.stride()} where eager has {theirs.stride()}"


def _settings(request, default: int):
    n = request.config.getoption("--fuzz-examples")
    return settings(max_examples=n or default, derandomize=n is None, deadline=None,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _fuzz(request, default, dtype, max_steps=5, max_size=9):
    @_settings(request, default)
    @given(program=programs(max_steps=max_steps, max_size=max_size),
           channels_last=st.booleans(), model_channels_last=st.sampled_from([False] * 4 + [True]),
           memory_format=st.sampled_from([torch.channels_last, None]))
    def run(program, channels_last, model_channels_last, memory_format):
        counts["ran"] += 1
        try:
            check_program(program, dtype, channels_last, model_channels_last, memory_format)
        except pytest.skip.Exception:
            return  # eager itself fails or overflows: nothing to compare
        counts["compared"] += 1
    counts = {"ran": 0, "compared": 0}
    run()
    # a generator whose programs eager mostly cannot run would test nothing and still pass
    assert counts["compared"] * 2 >= counts["ran"], counts


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fuzz_reference(request, backend, dtype):
    backend("reference")
    _fuzz(request, 100, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fuzz_cpu_build_of_the_cuda_kernels(request, backend, dtype):
    backend("cuda")
    _fuzz(request, 12, dtype, max_steps=3, max_size=6)


@pytest.mark.skipif(not triton_runnable(), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fuzz_triton_interpreter(request, backend, dtype):
    backend("triton")
    _fuzz(request, 4, dtype, max_steps=2, max_size=5)


# Activations no kernel computes (kept as they are, the fuzzer checks they stay right), and
# spellings the patterns do not match yet: x.prelu(weight).
UNFUSED = {"softsign", "prelu_channels"}
UNMATCHED = {("prelu", "method")}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_spelling_drawn_computes_its_activation(name):
    """Each form the fuzzer draws computes what the module form computes, and, where a kernel
    computes the activation, fuses into the conv as that activation."""
    spec = ACTIVATIONS[name]
    x = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(0)) * 3
    for i, form in enumerate(spec.forms()):
        params = spec.values[i % len(spec.values)]
        model = Conv(4, 4, 1, 1, 0, 1, 1, True, None, (name, form, params), None, i).eval()
        want = Conv(4, 4, 1, 1, 0, 1, 1, True, None, (name, "module", params), None, i).eval()
        with torch.no_grad():
            assert torch.equal(model(x.clone()), want(x.clone())), (form, params)
            fused = cnnfuse.fuse(model)
            torch.testing.assert_close(fused(x.clone()), want(x.clone()), rtol=1e-5,
                                       atol=1e-5)
        activations = {m.activation for m in fused.modules() if hasattr(m, "activation")}
        if name in UNFUSED:
            assert activations == {"none"}, (form, params, activations)
        elif (name, form) not in UNMATCHED:
            assert activations and "none" not in activations, (form, params, activations)


# Programs the fuzzer once failed on, each named for the fault it found --------------------

def _conv(cin, cout, **kw):
    p = dict(cin=cin, cout=cout, k=1, stride=1, pad=0, dil=1, groups=1, bias=False, bn=None,
             act=None, reparam=None, seed=0)
    p.update(kw)
    return p


REGRESSIONS = {
    # In place relu_ on the input, a chunk of it, 1x1 convs with CELU (absorbed) from the
    # input and from the chunk: the last conv's result comes back channels_last where eager's
    # is contiguous (NCHW in, NCHW out). In the derandomised set of test_fuzz_reference[fp32].
    "layout-of-a-conv-on-a-chunk-of-the-input": (dict(
        input=(2, 2, 1, 2), outputs=[], default_arg=True, steps=[
            ("inplace", [0], dict(kind="relu_", k=1)),
            ("split", [0], dict(form="chunk", first=1)),
            ("conv", [0], _conv(2, 1, act=("celu", "module", None), seed=200)),
            ("conv", [0], _conv(2, 1, act=("celu", "module", None), seed=300)),
            ("conv", [1], _conv(1, 2, act=("celu", "module", None), seed=400))]),
        dict(memory_format=torch.channels_last)),
    # Two dense blocks in a row: the second's first part is the first block's output, which
    # the first rewrite replaced; the pass used the stale node ("used before defined").
    "dense-block-after-dense-block": (dict(
        input=(1, 3, 7, 4), outputs=[], default_arg=False, steps=[
            ("dense", [0], dict(c=3, growth=2, layers=3, seed=1334)),
            ("dense", [1], dict(c=9, growth=1, layers=2, seed=1434))]), {}),
    # `x += 1.0` on a tensor read again later: FX's Proxy has no __iadd__, so the trace
    # recorded x + 1.0, dropped it, and the write was lost.
    "augmented-assignment-on-the-input": (dict(
        input=(2, 3, 4, 3), outputs=[2, 1], default_arg=False, steps=[
            ("inplace", [0], dict(kind="slice_mul_", k=1)),
            ("inplace", [0], dict(kind="iadd", k=2)),
            ("inplace", [0], dict(kind="slice_mul_", k=2)),
            ("residual", [0], dict(c=3, form="add_", act=None, seed=982)),
            ("conv", [1], _conv(3, 3, stride=2, bn="tiny", seed=1082))]),
        dict(channels_last=True, memory_format=None)),
    # `x += conv(x)` into the block's input, a view of which is returned: the same lost
    # write, seen through the view.
    "augmented-assignment-through-a-view": (dict(
        input=(1, 3, 8, 5), outputs=[1, 3], default_arg=False, steps=[
            ("view", [0], dict(form="view")),
            ("conv", [1], _conv(3, 1, bn="ordinary", act=("tanh", "method"), seed=928)),
            ("conv", [1], _conv(3, 4, k=3, stride=2, bn="huge", seed=1028)),
            ("residual", [0], dict(c=3, form="into_input", act=("tanh", "method"),
                                   seed=1128))]), dict(channels_last=True, memory_format=None)),
    # The same into the input before a channel shuffle of it with itself.
    "augmented-assignment-before-a-shuffle": (dict(
        input=(1, 4, 1, 8), outputs=[], default_arg=False, steps=[
            ("residual", [0], dict(c=4, form="into_input", act=None, seed=126)),
            ("cat", [0, 0], dict(shuffle=2))]), dict(channels_last=True)),
    # A forward with a defaulted argument (fused per child) returning a slice of its input:
    # the layout hook copied the view into a contiguous tensor, eager returns the view.
    "per-child-fusion-returns-a-view-of-the-input": (dict(
        input=(2, 5, 4, 8), outputs=[], default_arg=True, steps=[
            ("split", [0], dict(form="narrow", first=2)),
            ("conv", [2], _conv(3, 3, k=3, groups=3, bn="ordinary", act=("sigmoid", "module"),
                                seed=4577)),
            ("split", [0], dict(form="chunk", first=3)),
            ("split", [0], dict(form="narrow", first=1))]), {}),
    # A slice y[:, k:] of a fused conv's output returned: the layout pass took the slice for
    # a tuple item of the conv and copied it; eager returns a view of the whole output.
    "slice-of-a-fused-output-returned": (dict(
        input=(2, 4, 4, 9), outputs=[3], default_arg=False, steps=[
            ("inplace", [0], dict(kind="slice_mul_", k=2)),
            ("inplace", [0], dict(kind="select_zero_", k=2)),
            ("act", [0], dict(act=("leaky_relu", "method"))),
            ("sep", [0], dict(
                dw=_conv(4, 4, k=3, stride=2, pad=1, groups=4, bias=True, bn="ordinary",
                         seed=705),
                pw=_conv(4, 7, bias=True, bn="tiny", act=("relu6", "inplace"), seed=755))),
            ("conv", [1], _conv(4, 8, k=2, pad=1, dil=2, groups=2, bias=True, bn="ordinary",
                                act=("gelu", "function"), seed=805)),
            ("view", [0], dict(form="view")),
            ("split", [3], dict(form="narrow", first=6))]), {}),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_regression(name, dtype):
    program, options = REGRESSIONS[name]
    check_program(program, dtype, **options)


# Programs the fuzzer fails on now, each checked to still fail (once the fault is fixed the
# test fails: move the program into REGRESSIONS).
KNOWN_FAILURES = {
    # bfloat16, a BatchNorm of tiny variance (folding multiplies by up to 300) folded into a
    # 1x1 conv, then a saturating activation kept outside it (softsign; tanh, which the conv
    # absorbs, fails too): about 2x the bound, where relu or no activation passes.
    "bf16-tiny-variance-fold-before-softsign": (dict(
        input=(1, 4, 1, 1), outputs=[], default_arg=False, steps=[
            ("conv", [0], _conv(4, 1, act=("softsign", "module", None), seed=9)),
            ("conv", [0], _conv(4, 3, bn="tiny", act=("softsign", "module", None),
                                seed=10))]), torch.bfloat16, {}),
    # A concatenation's buffer (channels_last) written in place and read by an eager ReLU
    # whose result is returned: the ReLU keeps channels_last where eager's is contiguous (the
    # layout pass restores eager's layout only where a fused op's own result is returned).
    "layout-after-in-place-add-into-a-concatenation": (dict(
        input=(1, 1, 1, 2), outputs=[], default_arg=False, steps=[
            ("dense", [0], dict(c=1, growth=1, layers=2, seed=0)),
            ("residual", [0], dict(c=1, form="plus", act=None, seed=100)),
            ("residual", [1], dict(c=3, form="into_input", act=("relu", "module", None),
                                   seed=200))]), torch.float32, {}),
}


@pytest.mark.parametrize("name", sorted(KNOWN_FAILURES))
def test_known_failure(name):
    program, dtype, options = KNOWN_FAILURES[name]
    with pytest.raises(AssertionError):
        check_program(program, dtype, **options)
    pytest.xfail(f"known failure: {name}")
