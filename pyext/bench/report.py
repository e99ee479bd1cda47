"""The report: `python -m cnnfuse.bench.report results/*.json [--out DIR] [--profile P.json]`.

Reads any mix of three JSON kinds, told apart by content: pytest-benchmark files
(`--benchmark-json`; entries whose extra_info has `model` are end-to-end timings, the others
per-layer timings with `floor_ms` and `fraction_of_floor`), the main job's files
("kind": "cnnfuse.bench", a list of model records) and profiles ("kind": "cnnfuse.profile",
per-op times of one model). For the same (model, batch, dtype, provider), or the same layer and
provider, the later file on the command line wins.

Writes into --out (default report/): report.md (machine, models table, summary of cnnfuse's
speed-ups, per-layer table; also printed to stdout), speedup.png, and one
roofline_<model>_b<batch>.png per profile. Without matplotlib, the markdown only.

From Python: `load(paths, profile_paths=()) -> Loaded(models, layers, profiles, machine)`, then
`render_markdown(loaded)`, `plot_speedup(loaded.models, path)`, `plot_roofline(profile, path)`.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

PROVIDER_ORDER = ("cudnn", "cudnn_folded", "inductor", "cnnfuse", "cnnfuse+inductor")
BASELINES = ("cudnn", "cudnn_folded", "inductor")
DTYPE_ORDER = ("fp16", "bf16", "fp32")
MACHINE_KEYS = ("gpu", "driver", "cuda", "torch", "triton", "cudnn", "cnnfuse", "date")
_OPTIONAL = ("compute_floor_ms", "memory_floor_ms", "max_rel_error", "peak_mem_mb")


@dataclass
class ModelRecord:
    model: str
    batch: int
    dtype: str
    provider: str
    ms: float
    compute_floor_ms: Optional[float] = None
    memory_floor_ms: Optional[float] = None
    max_rel_error: Optional[float] = None
    peak_mem_mb: Optional[float] = None


@dataclass
class LayerRow:
    layer: str  # the benchmark name with the provider taken out of its id
    provider: str
    ms: float
    fraction_of_floor: Optional[float] = None


class Loaded(NamedTuple):
    models: list  # [ModelRecord], duplicates resolved, in first-seen order
    layers: list  # [LayerRow]
    profiles: list  # [dict] as cnnfuse.bench.profile wrote them, plus "source": the path
    machine: dict  # MACHINE_KEYS -> str; distinct values across files joined by " / "


def is_cnnfuse(provider: str) -> bool:
    return provider.startswith("cnnfuse")


def _order(value: str, known: tuple) -> tuple:
    return (known.index(value), "") if value in known else (len(known), value)


def _read(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise SystemExit(f"{path}: cannot read ({e.strerror or e})")
    except ValueError as e:
        raise SystemExit(f"{path}: not JSON ({e})")
    return doc if isinstance(doc, dict) else {}


def kind_of(doc: dict) -> Optional[str]:  # pytest-benchmark, cnnfuse.bench, cnnfuse.profile
    if doc.get("kind") in ("cnnfuse.bench", "cnnfuse.profile"):
        return doc["kind"]
    if isinstance(doc.get("benchmarks"), list) and "machine_info" in doc:
        return "pytest-benchmark"
    return None


def _layer_key(name: str, provider: str) -> str:
    """'test_x[cudnn-128-resnet50-...]' -> 'test_x[128-resnet50-...]'."""
    base, bracket, ident = name.partition("[")
    if not bracket:
        return name
    ident = f"-{ident.rstrip(']')}-".replace(f"-{provider}-", "-", 1)[1:-1]
    return f"{base}[{ident}]" if ident else base


def _model_record(path, where: str, d: dict, ms) -> ModelRecord:
    try:
        r = ModelRecord(str(d["model"]), int(d["batch"]), str(d["dtype"]), str(d["provider"]),
                        float(ms), **{k: None if d.get(k) is None else float(d[k])
                                      for k in _OPTIONAL})
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{path}: {where}: missing or bad field {e}")
    if not 0 < r.ms < math.inf:  # every ratio in the report divides by it
        raise SystemExit(f"{path}: {where}: time {r.ms} ms is not a positive number")
    return r


def _from_benchmark(path, doc: dict, models: dict, layers: dict, machine: list) -> None:
    machine.append({**(doc.get("machine_info") or {}), "date": doc.get("datetime")})
    for b in doc["benchmarks"]:
        name, extra, params = b.get("name", "?"), b.get("extra_info") or {}, b.get("params") or {}
        try:  # the CUDA-event median of the replays when recorded, else the wall-clock one
            ms = float(extra["device_ms"]) if "device_ms" in extra else (
                float(b["stats"]["median"]) * 1e3)
        except (KeyError, TypeError, ValueError):
            ms = math.nan
        if not 0 < ms < math.inf:
            raise SystemExit(f"{path}: benchmark {name!r} has no positive stats.median")
        machine.append({k: extra[k] for k in ("gpu", "torch") if extra.get(k)})
        if "model" in extra:
            r = _model_record(path, f"benchmark {name!r}", {**params, **extra}, ms)
            models[(r.model, r.batch, r.dtype, r.provider)] = r
        else:
            provider = str(params.get("provider") or extra.get("provider") or "default")
            floor = extra.get("floor_ms")
            row = LayerRow(_layer_key(name, provider), provider, ms,
                           extra.get("fraction_of_floor", floor / ms if floor else None))
            layers[(row.layer, provider)] = row


def _cudnn_version(v) -> str:
    """torch reports 90100 for cuDNN 9.1.0 and 8902 for 8.9.2."""
    if not str(v).isdigit():
        return str(v)
    major, rest = divmod(int(v), 10000 if int(v) >= 10000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _merge_machine(infos: list) -> dict:
    seen = {k: [] for k in MACHINE_KEYS}
    for info in infos:
        for k in MACHINE_KEYS:
            v = info.get(k)
            if v in (None, "", "unknown"):
                continue
            v = _cudnn_version(v) if k == "cudnn" else str(v)
            v = v[:16].replace("T", " ") if k == "date" else v
            if v not in seen[k]:
                seen[k].append(v)
    out = {k: " / ".join(v) or "unknown" for k, v in seen.items()}
    if len(seen["date"]) > 1:
        out["date"] = f"{min(seen['date'])} to {max(seen['date'])}"
    return out


def load(paths, profile_paths=()) -> Loaded:
    """Read result files in order, later ones winning; profiles may be among `paths` too."""
    models, layers, profiles, machine = {}, {}, {}, []
    for path in [*paths, *profile_paths]:
        doc = _read(path)
        kind = kind_of(doc)
        if kind is None or (path in profile_paths and kind != "cnnfuse.profile"):
            raise SystemExit(f"{path}: not a pytest-benchmark, cnnfuse.bench or cnnfuse.profile "
                             "JSON (no 'benchmarks' with 'machine_info', no known 'kind')"
                             if kind is None else f"{path}: --profile needs a cnnfuse.profile")
        if kind == "pytest-benchmark":
            _from_benchmark(path, doc, models, layers, machine)
            continue
        machine.append(doc.get("machine") or {})
        if kind == "cnnfuse.bench":
            if not isinstance(doc.get("records"), list):
                raise SystemExit(f"{path}: cnnfuse.bench JSON without a 'records' list")
            for i, d in enumerate(doc["records"]):
                r = _model_record(path, f"record {i}", d, d.get("ms"))
                models[(r.model, r.batch, r.dtype, r.provider)] = r
        elif not isinstance(doc.get("ops"), list) or not {"model", "batch"} <= doc.keys():
            raise SystemExit(f"{path}: cnnfuse.profile JSON needs 'model', 'batch' and 'ops'")
        else:
            profiles[Path(path).resolve()] = {**doc, "source": str(path)}
    if not models and not layers and not profiles:
        raise SystemExit("no benchmark records in " + (", ".join(map(str, paths)) or "no files"))
    return Loaded(list(models.values()), list(layers.values()), list(profiles.values()),
                  _merge_machine(machine))


def fmt(x: Optional[float], kind: str) -> str:
    """kind: 'ms' (12.34, 0.512), 'x' (1.87×), 'frac' (0.42), 'err' (3.1e-04), 'rate', 'mb'."""
    if x is None:
        return "–"
    if kind == "ms":
        digits = next((d for lim, d in ((1000, 0), (100, 1), (10, 2), (0.1, 3)) if x >= lim), None)
        return f"{x:.3g}" if digits is None else f"{x:.{digits}f}"
    if kind == "rate":
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
    return {"x": f"{x:.2f}×", "frac": f"{x:.2f}", "err": f"{x:.1e}", "mb": f"{x:.0f}"}[kind]


def _md_table(header: list, rows: list, left: int = 1) -> str:
    """The first `left` columns are labels; the rest are numbers, right-aligned."""
    rule = "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule,
                      *("| " + " | ".join(r) + " |" for r in rows)])


def group_models(records: list) -> dict:
    """(model, batch, dtype) -> {provider: record}, in the report's row order."""
    first = {}
    for r in records:
        first.setdefault(r.model, len(first))
    groups = {}
    for r in sorted(records, key=lambda r: (first[r.model], r.batch, _order(r.dtype, DTYPE_ORDER),
                                            _order(r.provider, PROVIDER_ORDER))):
        groups.setdefault((r.model, r.batch, r.dtype), {})[r.provider] = r
    return groups


def models_table(records: list) -> str:
    baselines = [p for p in BASELINES if any(r.provider == p for r in records)]
    header = ["model", "batch", "dtype", "provider", "ms", "img/s", *(f"× {p}" for p in baselines),
              "of compute floor", "of memory floor", "max rel err", "peak MB"]
    rows = []
    for (model, batch, dtype), by in group_models(records).items():
        best = min(r.ms for r in by.values())
        ref_mem = by["cudnn"].peak_mem_mb if "cudnn" in by else None
        for p, r in by.items():
            peak = fmt(r.peak_mem_mb, "mb")
            if is_cnnfuse(p) and None not in (r.peak_mem_mb, ref_mem) and r.peak_mem_mb > ref_mem:
                peak += " ⚠"
            rows.append([
                f"`{model}`", str(batch), dtype, p,
                f"**{fmt(r.ms, 'ms')}**" if r.ms == best else fmt(r.ms, "ms"),
                fmt(batch / r.ms * 1e3, "rate"),
                *(fmt(by[b].ms / r.ms if b in by else None, "x") for b in baselines),
                *(fmt(None if f is None else f / r.ms, "frac")
                  for f in (r.compute_floor_ms, r.memory_floor_ms)),
                fmt(r.max_rel_error, "err"), peak])
    return _md_table(header, rows, left=4)


def summary_rows(records: list) -> list:
    """Per (batch, dtype): the geometric mean over models of the best cnnfuse provider's
    speed-up over each baseline {baseline: (geomean, models in it)}, and how often it is the
    fastest of all providers."""
    out = {}
    for (_, batch, dtype), by in group_models(records).items():
        ours = min((r.ms for p, r in by.items() if is_cnnfuse(p)), default=None)
        if ours is None:
            continue
        s = out.setdefault((batch, dtype), {"batch": batch, "dtype": dtype, "models": 0,
                                            "fastest": 0, "logs": {}})
        s["models"] += 1
        s["fastest"] += ours <= min((r.ms for p, r in by.items() if not is_cnnfuse(p)),
                                    default=math.inf)
        for b in BASELINES:
            if b in by:
                s["logs"].setdefault(b, []).append(math.log(by[b].ms / ours))
    for s in out.values():
        s["geomean"] = {b: (math.exp(sum(v) / len(v)), len(v)) for b, v in s.pop("logs").items()}
    return [out[k] for k in sorted(out, key=lambda k: (k[0], _order(k[1], DTYPE_ORDER)))]


def summary_table(records: list) -> str:
    rows = summary_rows(records)
    baselines = [b for b in BASELINES if any(b in s["geomean"] for s in rows)]
    body = []
    for s in rows:
        cells = []
        for b in baselines:
            g, k = s["geomean"].get(b, (None, 0))
            cells.append(fmt(g, "x") + (f" ({k} models)" if g and k != s["models"] else ""))
        body.append([str(s["batch"]), s["dtype"], *cells,
                     f"fastest on {s['fastest']} of {s['models']} models"])
    return _md_table(["batch", "dtype", *(f"× {b}" for b in baselines), "cnnfuse"], body, left=2)


def layers_table(rows: list) -> str:
    providers = sorted({r.provider for r in rows}, key=lambda p: _order(p, PROVIDER_ORDER))
    others = [p for p in providers if p != "cnnfuse"] if "cnnfuse" in providers else []
    by = {}
    for r in rows:
        by.setdefault(r.layer, {})[r.provider] = r
    body = []
    for layer, cells in by.items():
        best = min(r.ms for r in cells.values())
        ms = [fmt(cells[p].ms if p in cells else None, "ms") for p in providers]
        ms = [f"**{m}**" if p in cells and cells[p].ms == best else m
              for p, m in zip(providers, ms)]
        frac = [fmt(cells[p].fraction_of_floor if p in cells else None, "frac") for p in providers]
        ours = cells.get("cnnfuse")
        x = [fmt(cells[p].ms / ours.ms if ours and p in cells else None, "x") for p in others]
        body.append([f"`{layer}`", *ms, *frac, *x])
    return _md_table(["layer", *(f"{p} ms" for p in providers),
                      *(f"{p} of floor" for p in providers),
                      *(f"cnnfuse × {p}" for p in others)], body)


def _profiled_on(profile: dict) -> str:
    gpu = (profile.get("machine") or {}).get("gpu")
    return str(gpu) if gpu else ("the CPU" if profile.get("device") == "cpu" else "unknown GPU")


def roofline_name(profile: dict) -> str:
    return (f"roofline_{str(profile['model']).replace('/', '_')}_b{profile['batch']}"
            f"_{profile.get('dtype', 'fp16')}.png")


def render_markdown(loaded: Loaded, images: Optional[dict] = None, notes=()) -> str:
    """images: {"speedup": file name, <profile source>: file name} of the charts written."""
    images, m = images or {}, loaded.machine
    out = ["# cnnfuse benchmark report", "",
           f"GPU {m['gpu']} · driver {m['driver']} · CUDA {m['cuda']} · torch {m['torch']} · "
           f"triton {m['triton']} · cuDNN {m['cudnn']} · cnnfuse {m['cnnfuse']} · "
           f"date {m['date']}", "", *(f"_{n}_\n" for n in notes)]
    if loaded.models:
        out += ["## Models", "", models_table(loaded.models), "",
                "ms: median per batch; × P: P's time over this row's (higher: this row is "
                "faster); bold: the fastest provider for that model, batch and dtype; ⚠: peak "
                "memory above cuDNN eager's; floors: time at the H100 ceilings over measured time.",
                ""]
        if "speedup" in images:
            out += [f"![speed-up per model]({images['speedup']})", ""]
        if summary_rows(loaded.models):
            out += ["## Summary", "", summary_table(loaded.models), "",
                    "Per model the faster of cnnfuse and cnnfuse+inductor; geometric mean of "
                    "its speed-up over the models.", ""]
    if loaded.layers:
        out += ["## Per layer", "", layers_table(loaded.layers), "",
                "ms: median; of floor: floor time over measured time.", ""]
    if loaded.profiles:
        from .zoo import PEAK_BYTES, PEAK_FLOPS
        out += ["## Roofline", "", f"Ceilings: H100 dense fp16/bf16, {PEAK_FLOPS / 1e12:.0f} "
                f"TFLOP/s and {PEAK_BYTES / 1e12:.1f} TB/s (cnnfuse.bench.zoo).", ""]
        for p in loaded.profiles:
            gpu = _profiled_on(p)
            what = f"{p['model']} batch {p['batch']} {p.get('dtype', '')} ({p['source']})"
            png = images.get(p["source"])
            out += [f"![roofline of {what}]({png})" if png else f"{what}: chart not drawn", ""]
            if "H100" not in gpu:
                out += [f"{what} was profiled on {gpu}: the ceilings drawn are H100's.", ""]
    return "\n".join(out)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _save(plt, fig, path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_speedup(records: list, path) -> bool:
    """One panel per (batch, dtype): bars from 1 to each provider's speed-up over cuDNN eager
    (or over the first provider present when there is no cudnn), log scale."""
    plt = _pyplot()
    if plt is None or not records:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator
    providers = sorted({r.provider for r in records}, key=lambda p: _order(p, PROVIDER_ORDER))
    ref = "cudnn" if "cudnn" in providers else providers[0]
    shown = [p for p in providers if p != ref]
    panels = {}
    for (model, batch, dtype), by in group_models(records).items():
        panels.setdefault((batch, dtype), {})[model] = by
    n = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, 1 + 0.9 * n), 3.6 * len(panels)))
    width, colours = 0.8 / max(len(shown), 1), plt.get_cmap("tab10").colors
    for ax, ((batch, dtype), models) in zip(axes[:, 0], panels.items()):
        top = 2.0
        for j, p in enumerate(shown):
            pts = [(i - 0.4 + (j + 0.5) * width, by[ref].ms / by[p].ms)
                   for i, by in enumerate(models.values()) if ref in by and p in by]
            if not pts:
                continue
            top = max([top, *(max(y, 1 / y) for _, y in pts)])
            # Bars grow from 1 so slower-than-reference shows as a bar pointing down.
            ax.bar([x for x, _ in pts], [y - 1 for _, y in pts], width, bottom=1, label=p,
                   color=colours[_order(p, PROVIDER_ORDER)[0] % len(colours)])
        ax.axhline(1, color="k", lw=1, label=ref)
        ax.set(yscale="log", ylim=(1 / (top * 1.3), top * 1.3), xlim=(-0.6, len(models) - 0.4))
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        for axis_set in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_set(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.set_xticks(range(len(models)), list(models), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"speed-up over {ref}")
        what = "cuDNN eager" if ref == "cudnn" else f"{ref} (no cudnn timings in the data)"
        ax.set_title(f"batch {batch}, {dtype}: speed-up over {what}", fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(shown) + 1, 5))
    return _save(plt, fig, path)


def plot_roofline(profile: dict, path) -> bool:
    """Each op's achieved TFLOP/s against its FLOP/byte, under the H100 roofline."""
    plt = _pyplot()
    if plt is None:
        return False
    from .zoo import PEAK_BYTES, PEAK_FLOPS
    pts, hidden = [], 0.0
    for op in profile["ops"]:
        share = float(op.get("share") or 0)
        flops, moved = float(op.get("flops") or 0), float(op.get("bytes") or 0)
        per_call = op.get("ms_per_call") or float(op.get("ms") or 0) / max(op.get("calls") or 1, 1)
        if flops > 0 and moved > 0 and math.isfinite(per_call) and per_call > 0:
            pts.append((op, flops / moved, flops / (per_call * 1e-3) / 1e12, share))
        else:
            hidden += share  # copies, concatenations: no place on a FLOP/s axis
    fig, ax = plt.subplots(figsize=(7, 4.8))
    colours = plt.get_cmap("tab10").colors
    for k, backend in enumerate(sorted({str(op.get("backend", "?")) for op, *_ in pts})):
        mine = [pt for pt in pts if str(pt[0].get("backend", "?")) == backend]
        ax.scatter([pt[1] for pt in mine], [pt[2] for pt in mine], alpha=0.7, label=backend,
                   s=[15 + 600 * min(pt[3], 1.0) for pt in mine], color=colours[k % len(colours)])
    lo = min([pt[1] for pt in pts] + [1.0]) / 3
    hi = max([pt[1] for pt in pts] + [PEAK_FLOPS / PEAK_BYTES]) * 3
    xs = [lo * (hi / lo) ** (k / 200) for k in range(201)]
    ax.plot(xs, [min(PEAK_FLOPS, PEAK_BYTES * x) / 1e12 for x in xs], "k-", lw=1,
            label=f"H100 roofline ({PEAK_FLOPS / 1e12:.0f} TFLOP/s, {PEAK_BYTES / 1e12:.1f} TB/s)")
    for op, i, t, _ in sorted(pts, key=lambda pt: -float(pt[0].get("ms") or 0))[:5]:
        ax.annotate(str(op.get("name", "?"))[:40], (i, t), fontsize=6, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)",
           ylabel="achieved TFLOP/s")
    gpu = _profiled_on(profile)
    title = (f"{profile['model']} batch {profile['batch']} {profile.get('dtype', '')} on {gpu}; "
             "point area: share of time")
    if "H100" not in gpu:
        title += "\nthe ceilings are H100's, not this device's"
    if len(pts) < len(profile["ops"]):
        title += (f"\nnot shown: {len(profile['ops']) - len(pts)} of {len(profile['ops'])} "
                  f"ops, without FLOPs ({hidden:.0%} of the time)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnnfuse.bench.report", description=(
        "Markdown tables and PNG charts from pytest-benchmark, cnnfuse.bench and "
        "cnnfuse.profile JSON files."))
    p.add_argument("files", nargs="*", type=Path,
                   help="pytest-benchmark, cnnfuse.bench or cnnfuse.profile JSON files")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (report/)")
    p.add_argument("--profile", type=Path, action="append", default=[],
                   help="a cnnfuse.profile JSON to draw a roofline of (repeatable)")
    args = p.parse_args(argv)
    if not args.files and not args.profile:
        p.error("no input files")
    loaded = load(args.files, args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    images, notes = {}, []
    if _pyplot() is None:
        notes.append("matplotlib is not installed: no charts, the markdown only")
    else:
        if loaded.models and plot_speedup(loaded.models, args.out / "speedup.png"):
            images["speedup"] = "speedup.png"
        for prof in loaded.profiles:
            if plot_roofline(prof, args.out / roofline_name(prof)):
                images[prof["source"]] = roofline_name(prof)
    text = render_markdown(loaded, images, notes)
    (args.out / "report.md").write_text(text)
    print(text)
    print("wrote " + ", ".join(str(args.out / f) for f in ["report.md", *images.values()]),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
