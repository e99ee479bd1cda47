"""Static quality report of the conv kernels for Hopper, without a GPU:

    python -m cnnfuse.bench.static --model resnet50 --batch 128 [--json] [--all]
    python -m cnnfuse.bench.static --shape 128,64,56,56,64,3,3,1,1,1,1 --dtype bf16

For each shape (every distinct conv of a zoo model, or N,C,H,W,K,R,S,stride,pad,dil,groups;
stride, pad and dil take "a" or "hxw") the Triton conv kernel is compiled for sm_90 exactly as
a launch specialises it (kernels.conv2d.compile_for_shape) at the default pick, with
--candidates N also at the first N - 1 other candidates, with --all at every candidate.
Depthwise convs (groups == C) are read from the CUDA C++ depthwise kernel's instantiation in
the built cnnfuse._C that the dispatch picks for them (with --all, every instantiation of the
dtype). One row each:

  registers     per thread (ptxas, cuobjdump -res-usage)
  spill_bytes   stack frame + local memory per thread: where spills go (0 for a clean kernel)
  shared_bytes  shared memory per block (Triton's dynamic allocation; static for C++)
  mma           HGMMA (sm_90 warpgroup MMA), HMMA or none, from the SASS
  load_bytes    widest global load of the activation (conv: accesses through x_ptr, found by
                a taint walk over the PTX; depthwise: the widest LDG in the SASS)
  store_bytes   widest global store of the output (y_ptr; with split-K, by the second kernel
                that sums the partial tiles; depthwise: the widest STG)
  tma           a tensor-memory-accelerator load (UTMALDG in the SASS, whichever operand:
                the conv's weight where its config asks for it and the geometry allows)
  whole_reduction_pipelined
                conv: the rule of cnnfuse.bench.sass.whole_reduction_pipelined on the TTGIR
                after Triton's pipeliner (one top-level scf.for holds every MMA, issues and
                waits for async copies, with a prologue of copies before it); depthwise: the
                fixed variants, whose taps are fully unrolled (no reduction loop to drain)
  warps_per_sm  theoretical, from registers, warps per block and shared memory

Gates (exit status 1, each failing row named; only default picks are gated, --all rows are
information): a spill; an MMA other than HGMMA on a conv tile of 64 rows or more; a load
narrower than 16 bytes on a layer whose input channels are a multiple of 8 (the stem counts
after its padding to kernels.conv2d.STEM_CHANNELS; grouped convs by their channels per
group); a conv reduction not pipelined as a whole. Compiles are cached per distinct
(specialisation, config): shapes that Triton specialises alike share one compile.
"""
import argparse
import concurrent.futures
import functools
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import sass

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KEYS = ("kernel", "shape", "config", "default", "registers", "spill_bytes", "shared_bytes", "mma",
        "load_bytes", "store_bytes", "tma", "whole_reduction_pipelined", "warps_per_sm")
RELU = 1  # cnnfuse.ref.activation code: the zoo's convs are folded with BN and a ReLU


def _pair(text: str, what: str) -> tuple:
    parts = text.lower().split("x")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        raise ValueError(f"--shape: {what} must be an int or HxW, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(f"--shape: {what} must be an int or HxW, got {text!r}")
    return values


@dataclass(frozen=True)
class Shape:
    """One conv: x (n, c, h, w), weight (k, c // groups, r, s); stride, pad (symmetric per
    axis) and dil as (h, w) pairs."""
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: tuple = (1, 1)
    pad: tuple = (0, 0)
    dil: tuple = (1, 1)
    groups: int = 1

    @staticmethod
    def parse(text: str) -> "Shape":
        """'N,C,H,W,K,R,S,stride,pad,dil,groups'; raises ValueError naming --shape."""
        parts = text.split(",")
        if len(parts) != 11:
            raise ValueError(f"--shape takes N,C,H,W,K,R,S,stride,pad,dil,groups (11 values), "
                             f"got {text!r}")
        try:
            ints = [int(v) for v in parts[:7]] + [int(parts[10])]
        except ValueError:
            raise ValueError(f"--shape: N,C,H,W,K,R,S and groups must be ints, got {text!r}") \
                from None
        n, c, h, w, k, r, s, groups = ints
        shape = Shape(n, c, h, w, k, r, s, _pair(parts[7], "stride"), _pair(parts[8], "pad"),
                      _pair(parts[9], "dil"), groups)
        if min(n, c, h, w, k, r, s, groups) < 1 or c % groups or k % groups:
            raise ValueError(f"--shape: sizes must be positive and C, K multiples of groups, "
                             f"got {text!r}")
        return shape

    @property
    def text(self) -> str:
        def pair(v):
            return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"
        return ",".join(map(str, (self.n, self.c, self.h, self.w, self.k, self.r, self.s,
                                  pair(self.stride), pair(self.pad), pair(self.dil),
                                  self.groups)))

    @property
    def depthwise(self) -> bool:
        return self.groups == self.c and self.groups > 1

    @property
    def out_hw(self) -> tuple:
        return tuple((size + 2 * p - d * (k - 1) - 1) // st + 1 for size, p, d, k, st in
                     zip((self.h, self.w), self.pad, self.dil, (self.r, self.s), self.stride))

    def problem(self):
        from cnnfuse.kernels.conv2d import Conv2dProblem
        ph, pw = self.pad
        return Conv2dProblem(self.n, self.c, self.h, self.w, self.k, self.r, self.s,
                             self.stride, (pw, pw, ph, ph), self.dil, self.groups,
                             bias=True, activation=RELU)


def model_shapes(name: str, batch: int) -> list:
    """Every distinct nn.Conv2d of zoo model `name` as called at `batch`, in call order."""
    return [Shape(batch, *rest) for rest in _model_convs(name)]


@functools.lru_cache(maxsize=None)
def _model_convs(name: str) -> tuple:
    """(c, h, w, k, r, s, stride, pad, dil, groups) of each distinct conv, read by hooks on
    one forward at batch 1 on the meta device (no weights, no arithmetic)."""
    from torch import nn

    from . import zoo
    with torch.device("meta"):
        model = zoo.build(name)
    seen = {}

    def hook(m, inputs, _):
        _, c, h, w = inputs[0].shape
        pad = m.padding if not isinstance(m.padding, str) else tuple(
            (d * (k - 1)) // 2 if m.padding == "same" else 0
            for d, k in zip(m.dilation, m.kernel_size))
        seen[(c, h, w, m.out_channels, *m.kernel_size, tuple(m.stride), tuple(pad),
              tuple(m.dilation), m.groups)] = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    size = zoo.input_size(name)
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return tuple(seen)


# --- the Triton conv ----------------------------------------------------------------------

def _dtype_name(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@functools.lru_cache(maxsize=None)
def _binder():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from cnnfuse.kernels import conv2d
    fn = conv2d._conv2d_kernel
    return create_function_from_signature(fn.signature, fn.params,
                                          make_backend(GPUTarget("cuda", 90, 32)))


def specialisation_key(problem, config, dtype) -> str:
    """What Triton's binder makes of the launch arguments of (problem, config): two shapes
    with one key compile to one kernel. Falls back to the problem itself if the launch
    arguments cannot be built here."""
    from cnnfuse.kernels import conv2d
    arguments = getattr(conv2d, "arguments", None) or getattr(conv2d, "_arguments", None)
    stand_ins = getattr(conv2d, "stand_ins", None) or getattr(conv2d, "_stand_ins", None)
    try:
        args, constexprs, _, _ = arguments(problem, config, dtype,
                                           stand_ins(problem, dtype, config.split_k),
                                           tma=conv2d.descriptors_supported())
        _, spec, options = _binder()(*args, **constexprs)
        return repr((spec, sorted(options.items()), str(dtype)))
    except (AttributeError, TypeError):  # the argument builder renamed: one compile per shape
        return repr((problem, config, str(dtype)))


def ptx_parameters(problem, config, dtype) -> dict:
    """{kernel parameter: the index of its (first) PTX parameter} for a launch of (problem,
    config), up to and including the first tensor descriptor: parameters Triton specialises to
    constants have no PTX parameter, and a descriptor expands to several (how many depends on
    Triton's version), so parameters after one are left out."""
    from cnnfuse.kernels import conv2d
    args, constexprs, _, _ = conv2d.arguments(problem, config, dtype,
                                              conv2d.stand_ins(problem, dtype, config.split_k),
                                              tma=conv2d.descriptors_supported())
    _, spec, _ = _binder()(*args, **constexprs)
    out, index = {}, 0
    for param, (kind, _) in zip(conv2d._conv2d_kernel.params, spec):
        if kind == "constexpr":
            continue
        out[param.name] = index
        if kind.startswith("tensordesc"):
            break
        index += 1
    return out


def _analyse_conv(problem, config, dtype_name: str) -> dict:
    """Compile one (problem, config) and read it; runs in a worker process."""
    from cnnfuse.kernels.conv2d import compile_for_shape
    from cnnfuse.kernels import conv2d
    compiled = compile_for_shape(problem, config, DTYPES[dtype_name])
    index = ptx_parameters(problem, config, DTYPES[dtype_name])
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "conv2d.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = sass.run_cuobjdump("-res-usage", "-sass", cubin)
    res = next(iter(sass.parse_res_usage(dump).values()))
    code = sass.summarise_sass(dump)
    x = sass.param_access(ptx, index["x_ptr"])
    y = sass.param_access(ptx, index["y_ptr"])
    if config.split_k > 1:  # y is written by the split-K sum, a second kernel
        reduce = compile_for_shape(problem, config, DTYPES[dtype_name], reduction=True)
        names_r = [n for n in conv2d._splitk_reduce_kernel.arg_names if n.endswith("_ptr")]
        y = sass.param_access(reduce.asm["ptx"], names_r.index("y_ptr"))
    total = re.search(r'"ttg\.total-num-warps"\s*=\s*(\d+)', ttgir)
    warps = int(total[1]) if total else compiled.metadata.num_warps
    shared = compiled.metadata.shared
    return dict(registers=res.registers, spill_bytes=res.spill_bytes, shared_bytes=shared,
                mma=code.mma, load_bytes=16 if x.tma_load and not x.loads else x.widest_load,
                store_bytes=16 if y.tma_store and not y.stores else y.widest_store,
                tma=code.tma,
                whole_reduction_pipelined=sass.whole_reduction_pipelined(ttgir),
                warps_per_sm=sass.warps_per_sm(res.registers, warps, shared))


class _Cache:
    """Analysed rows on disk (static.json in $CNNFUSE_CACHE_DIR, default ~/.cache/cnnfuse),
    keyed by the specialisation and by everything that could change the answer: the conv
    kernel's Triton cache key (its source and what it calls), Triton's version and this
    report's own code. Compiling is what costs (seconds a kernel); a warm run only builds the
    launch arguments."""

    def __init__(self):
        import hashlib

        import triton

        from cnnfuse.kernels import conv2d
        from cnnfuse.autotune import cache_dir
        self.path = cache_dir() / "static.json"
        salt = hashlib.sha256()
        for part in (conv2d._conv2d_kernel.cache_key, triton.__version__,
                     Path(__file__).read_text(), Path(sass.__file__).read_text()):
            salt.update(part.encode())
        self.salt = salt
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def _key(self, key: str) -> str:
        h = self.salt.copy()
        h.update(key.encode())
        return h.hexdigest()

    def get(self, key: str):
        return self.entries.get(self._key(key))

    def put(self, key: str, row: dict):
        self.entries[self._key(key)] = row
        self.dirty = True

    def save(self):
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home: the report still stands, uncached
            print(f"static: cache not saved ({exc})", file=sys.stderr)


def bounded_candidates(*args, limit: int = 1, **kw) -> list:
    """The default pick and the first limit - 1 other candidate configs (arguments as for
    kernels.conv2d.candidate_configs): the bounded list the quick GPU session tunes over and
    --candidates compiles."""
    from cnnfuse.kernels.conv2d_configs import candidate_configs, default_config
    pick = default_config(*args, **kw)
    rest = [cfg for cfg in candidate_configs(*args, **kw) if cfg != pick]
    return [pick] + rest[:max(limit, 1) - 1]


def conv_rows(shapes, dtype, limit, jobs: int) -> list:
    """(row, meta) pairs of the Triton conv for each non-depthwise shape at its default pick
    and up to limit - 1 other candidates (every candidate if limit is None); meta carries
    what the gates need (block_m, the channels the loads see)."""
    from cnnfuse.kernels.conv2d import STEM_CHANNELS, default_config
    todo, keys = [], {}
    for shape in shapes:
        p = shape.problem()
        pick = default_config(p, dtype=dtype)
        configs = bounded_candidates(p, limit=limit or 10 ** 6, dtype=dtype)
        for cfg in configs:
            key = specialisation_key(p, cfg, dtype)
            keys.setdefault(key, (p, cfg))
            channels = STEM_CHANNELS if p.stem else shape.c // shape.groups
            todo.append((shape, cfg, cfg == pick, key, channels))
    name = _dtype_name(dtype)
    cache = _Cache()
    results = {key: cache.get(key) for key in keys}
    missing = [key for key, found in results.items() if found is None]
    if jobs > 1 and len(missing) > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            futures = {key: pool.submit(_analyse_conv, *keys[key], name) for key in missing}
            results.update({key: f.result() for key, f in futures.items()})
    else:
        results.update({key: _analyse_conv(*keys[key], name) for key in missing})
    for key in missing:
        cache.put(key, results[key])
    cache.save()
    return [(dict(kernel="conv2d", shape=shape.text, config=cfg.name, default=default,
                  **results[key]), dict(block_m=cfg.block_m, channels=channels))
            for shape, cfg, default, key, channels in todo]


# --- the CUDA C++ depthwise kernel --------------------------------------------------------

_DW_TYPE = {torch.float16: "N3c104HalfE", torch.bfloat16: "N3c108BFloat16E", torch.float32: "f"}
_DW_NAME = re.compile(r"depthwise_conv2d_kernelI(N3c104HalfE|N3c108BFloat16E|f|d)NS_9DwVariantI"
                      r"Li(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")
SM_COUNT = 132


def depthwise_variant(shape: Shape, dtype) -> tuple:
    """(VEC, KH, KW, stride, TW) of the instantiation csrc/depthwise_conv2d's dispatch picks
    for a dense, aligned channels_last call of `shape` (dw_dispatch and the strips rule of
    depthwise_conv2d_cuda)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    mult = shape.k // shape.c
    wide = mult == 1 and shape.k % vec == 0
    fixed = (wide and shape.dil == (1, 1) and shape.r == shape.s
             and shape.stride[0] == shape.stride[1] and shape.stride[0] in (1, 2)
             and shape.r in (3, 5, 7))
    if not fixed:
        return (vec if wide else 1, 0, 0, 0, 1)
    oh, ow = shape.out_hw
    strips = shape.n * oh * -(-ow // 4) * (shape.k // vec) >= SM_COUNT * 2048 * 2
    return (vec, shape.r, shape.s, shape.stride[0], 4 if strips else 1)


def _variant_name(v: tuple) -> str:
    vec, kh, kw, s, tw = v
    return f"dw_v{vec}_k{kh}x{kw}_s{s}_tw{tw}" if kh else f"dw_generic_v{vec}"


@functools.lru_cache(maxsize=None)
def _depthwise_code() -> dict:
    """{(dtype token, variant): (Resources, SassSummary)} of the built cnnfuse._C, or {}
    without CUDA code in it."""
    import importlib.util
    spec = importlib.util.find_spec("cnnfuse._C")
    if spec is None or spec.origin is None:
        return {}
    dump = sass.run_cuobjdump("-res-usage", "-sass", spec.origin)
    res, code = sass.parse_res_usage(dump), sass.split_sass(dump)
    out = {}
    for name, text in code.items():
        m = _DW_NAME.search(name)
        if m and name in res:
            out[(m[1], tuple(int(v) for v in m.groups()[1:]))] = (res[name],
                                                                   sass.summarise_sass(text))
    return out


def _depthwise_row(shape_text, variant, dtype, default):
    found = _depthwise_code().get((_DW_TYPE[dtype], variant))
    if found is None:
        return None
    res, code = found
    return dict(kernel="depthwise_conv2d", shape=shape_text, config=_variant_name(variant),
                default=default, registers=res.registers, spill_bytes=res.spill_bytes,
                shared_bytes=res.shared, mma=code.mma, load_bytes=code.widest_load,
                store_bytes=code.widest_store, tma=code.tma,
                whole_reduction_pipelined=variant[1] > 0,
                warps_per_sm=sass.warps_per_sm(res.registers, 8, res.shared))


def depthwise_rows(shapes, dtype, all_variants: bool) -> list:
    rows, listed = [], set()
    for shape in shapes:
        v = depthwise_variant(shape, dtype)
        row = _depthwise_row(shape.text, v, dtype, True)
        if row is None:
            print(f"static: no {_variant_name(v)} instantiation in cnnfuse._C (CPU-only "
                  f"build?); {shape.text} left out", file=sys.stderr)
            continue
        listed.add(v)
        rows.append((row, dict(block_m=0, channels=shape.c)))
    if all_variants:
        for token, v in sorted(_depthwise_code()):
            if token == _DW_TYPE[dtype] and v not in listed:
                rows.append((_depthwise_row("-", v, dtype, False), dict(block_m=0, channels=0)))
    return rows


# --- gates and output ---------------------------------------------------------------------

def gate_failures(rows) -> list:
    """Messages for the default picks that break a gate (see the module docstring)."""
    out = []
    for i, (row, meta) in enumerate(rows):
        if not row["default"]:
            continue
        where = f"row {i} ({row['kernel']} {row['shape']} {row['config']})"
        if row["spill_bytes"]:
            out.append(f"{where}: spills ({row['spill_bytes']} bytes of stack/local)")
        if row["kernel"] == "conv2d" and meta["block_m"] >= 64 and row["mma"] != "HGMMA":
            out.append(f"{where}: MMA {row['mma']}, not HGMMA, on a {meta['block_m']}-row tile")
        if meta["channels"] % 8 == 0 and row["load_bytes"] < 16:
            out.append(f"{where}: activation loads of {row['load_bytes']} bytes on "
                       f"{meta['channels']} channels (16 expected)")
        if row["kernel"] == "conv2d" and not row["whole_reduction_pipelined"]:
            out.append(f"{where}: the reduction is not one pipelined loop")
    return out


def format_table(rows) -> str:
    head = ("kernel", "shape", "config", "def", "regs", "spill", "smem", "mma", "ld", "st",
            "tma", "pipe", "warps")
    lines = [head]
    for row, _ in rows:
        lines.append((row["kernel"], row["shape"], row["config"], "*" if row["default"] else "",
                      str(row["registers"]), str(row["spill_bytes"]), str(row["shared_bytes"]),
                      row["mma"], str(row["load_bytes"]), str(row["store_bytes"]),
                      "yes" if row["tma"] else "no",
                      "yes" if row["whole_reduction_pipelined"] else "no",
                      str(row["warps_per_sm"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip()
                     for line in lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cnnfuse.bench.static",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[],
                   help="zoo model (repeatable): every distinct conv of it")
    p.add_argument("--batch", action="append", type=int, default=[],
                   help="batch size for --model (repeatable; default 128)")
    p.add_argument("--shape", action="append", default=[],
                   help="N,C,H,W,K,R,S,stride,pad,dil,groups (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.add_argument("--all", action="store_true",
                   help="every candidate config and depthwise instantiation, not only the "
                        "default picks")
    p.add_argument("--candidates", type=int, default=1, metavar="N",
                   help="the default pick and N - 1 other candidates per shape (default 1)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="compile processes")
    args = p.parse_args(argv)
    if not args.model and not args.shape:
        p.error("give --model NAME or --shape N,C,H,W,K,R,S,stride,pad,dil,groups")
    if any(b < 1 for b in args.batch):
        p.error("--batch must be positive")
    if args.candidates < 1:
        p.error("--candidates must be positive")
    try:
        args.shapes = [Shape.parse(s) for s in args.shape]
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("static: compiling for sm_90 needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    from . import zoo
    shapes = list(args.shapes)
    for name in args.model:
        if name not in zoo.ZOO:
            print(f"static: --model {name!r} is not in cnnfuse.bench.zoo.ZOO", file=sys.stderr)
            return 2
        for batch in args.batch or [128]:
            shapes += model_shapes(name, batch)
    shapes = list(dict.fromkeys(shapes))
    dtype = DTYPES[args.dtype]
    rows = conv_rows([s for s in shapes if not s.depthwise], dtype,
                     None if args.all else args.candidates, args.jobs)
    rows += depthwise_rows([s for s in shapes if s.depthwise], dtype, args.all)
    failures = gate_failures(rows)
    if args.json:
        print(json.dumps([{k: row[k] for k in KEYS} for row, _ in rows], indent=1))
    else:
        print(format_table(rows))
    for line in failures:
        print(f"GATE {line}", file=sys.stderr)
    if not failures:
        print(f"static: {len(rows)} rows, every gate holds", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
