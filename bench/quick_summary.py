"""One screen after `bash bench/gpu_session.sh quick`: `python bench/quick_summary.py OUT SECONDS`.

Reads what the quick phase left in OUT: each part's time (quick_times.txt), the static gates
(quick_static.txt), the GPU tests' outcome (quick_tests.txt), the per-layer JSON
(bench_ops.json: cnnfuse_triton against cudnn_conv_only, cnnfuse against cuDNN's conv + BN +
ReLU, geometric means over ResNet-50's 3x3 and 1x1 layers and over all) and the end-to-end
JSON (bench_models.json: ms per model, batch and provider). Missing pieces are said missing.
"""
import json
import math
import re
import sys
from pathlib import Path


def _geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _benchmarks(path: Path) -> list:
    try:
        return json.loads(path.read_text())["benchmarks"]
    except (OSError, ValueError, KeyError):
        return []


def _ms(bench) -> float:
    return bench.get("extra_info", {}).get("device_ms") or bench["stats"]["median"] * 1e3


def layers(out: Path) -> list:
    """Lines on the per-layer suite: speed-ups over cuDNN per provider pair."""
    by_layer: dict = {}
    for b in _benchmarks(out / "bench_ops.json"):
        m = re.match(r"test_conv_bn_relu\[(.+)-(b\d+)-([a-z_]+)\]", b["name"])
        if m:
            by_layer.setdefault((m[1], m[2]), {})[m[3]] = _ms(b)
    if not by_layer:
        return ["layers: no bench_ops.json results"]
    lines = []
    for fast, base, what in (("cnnfuse_triton", "cudnn_conv_only", "Triton forced vs cuDNN conv"),
                             ("cnnfuse", "cudnn", "cnnfuse conv+BN+ReLU vs cuDNN eager")):
        pairs = {key: t[base] / t[fast] for key, t in by_layer.items() if fast in t and base in t}
        if not pairs:
            lines.append(f"{what}: no pairs")
            continue

        def sel(pred):
            return [v for (layer, _), v in pairs.items() if pred(layer)]
        r3 = sel(lambda layer: layer.startswith("resnet50") and "-3x3" in layer)
        r1 = sel(lambda layer: layer.startswith("resnet50") and "-1x1" in layer)
        worst = min(pairs, key=pairs.get)
        lines.append(f"{what}: geomean {_geomean(pairs.values()):.2f}x over {len(pairs)} layers; "
                     f"RN50 3x3 {_geomean(r3):.2f}x (min {min(r3, default=float('nan')):.2f}), "
                     f"1x1 {_geomean(r1):.2f}x (min {min(r1, default=float('nan')):.2f}); "
                     f"worst {worst[0]} {pairs[worst]:.2f}x")
    return lines


def models(out: Path) -> list:
    table: dict = {}
    for b in _benchmarks(out / "bench_models.json"):
        x = b.get("extra_info", {})
        if "model" in x:
            table.setdefault((x["model"], x["batch"]), {})[x["provider"]] = _ms(b)
    if not table:
        return ["models: no bench_models.json results"]
    lines = [f"{'model':14s} {'batch':>5s} {'cudnn':>8s} {'inductor':>9s} {'cnnfuse':>8s}  "
             "vs inductor"]
    for (model, batch), t in sorted(table.items()):
        cells = [f"{t[p]:8.3f}" if p in t else f"{'-':>8s}" for p in ("cudnn", "inductor")]
        cells.append(f"{t['cnnfuse']:8.3f}" if "cnnfuse" in t else f"{'-':>8s}")
        ratio = (f"{t['inductor'] / t['cnnfuse']:.2f}x" if "inductor" in t and "cnnfuse" in t
                 else "-")
        lines.append(f"{model:14s} {batch:5d} {cells[0]} {cells[1]:>9s} {cells[2]}  {ratio}")
    return lines


def _tail(path: Path, pattern: str, keep: int = 4) -> list:
    try:
        text = path.read_text().splitlines()
    except OSError:
        return [f"{path.name}: missing"]
    found = [line for line in text if re.search(pattern, line)]
    return found[-keep:] or text[-2:]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "results")
    elapsed = argv[1] if len(argv) > 1 else "?"
    lines = [f"== cnnfuse quick GPU check: {elapsed} s in all =="]
    lines += _tail(out / "quick_times.txt", r"exit|processes", keep=10)
    lines += ["-- static (sm_90, default picks) --"]
    lines += _tail(out / "quick_static.txt", r"GATE|gate", keep=6)
    lines += ["-- GPU tests --"]
    lines += _tail(out / "quick_tests.txt", r"passed|failed|error", keep=8)
    lines += ["-- per layer, batch 128, fp16 (speed-up = cuDNN time / ours) --"]
    lines += layers(out)
    lines += ["-- end to end, fp16, ms (CUDA graphs) --"]
    lines += models(out)
    lines += [f"report: {out / 'report' / 'report.md'}, {out / 'report' / 'speedup.png'}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
