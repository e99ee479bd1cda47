"""The main job: `python -m cnnfuse.bench --model googlenet --batch 64` (or `cnnfuse-bench`).

Builds the model with random weights, fuses it, checks the fused logits against the unfused
model in fp64, then times every provider (cuDNN eager, eager with conv + BN folded,
torch.compile with freezing, cnnfuse, torch.compile of cnnfuse) under CUDA graphs in the same
dtype and layout, prints a table and writes JSON (which `python -m cnnfuse.bench.report`
reads) and a PNG bar chart. Without a GPU it checks correctness on the CPU path at a small
batch and says that timing needs CUDA.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import cnnfuse

from . import providers, zoo

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cnnfuse-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="googlenet",
                   help="torchvision name, or timm/<name> (default googlenet)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--iters", type=int, default=50, help="timed graph replays per provider")
    p.add_argument("--providers", default=",".join(providers.PROVIDERS),
                   help=f"comma-separated, from {', '.join(providers.PROVIDERS)}")
    p.add_argument("--out", default="results", help="folder for the JSON and the PNG")
    args = p.parse_args(argv)
    unknown = set(args.providers.split(",")) - set(providers.PROVIDERS)
    if unknown:
        p.error(f"unknown provider(s) {', '.join(sorted(unknown))}; "
                f"expected {', '.join(providers.PROVIDERS)}")
    return args


def time_providers(model, x, reference, names, iters, bar) -> dict:
    """provider -> {ms, max_rel_error, peak_mem_mb}, each built, checked and timed in turn."""
    from .timing import median_ms
    results = {}
    for provider in names:
        bar.set_description(f"timing {provider}")
        prepared = providers.prepare(provider, model, x, reference)
        results[provider] = {"ms": median_ms(prepared.replay, iters=iters),
                             "max_rel_error": prepared.max_rel_error,
                             "peak_mem_mb": prepared.peak_mem_mb}
        del prepared
        providers.release()
        bar.update(1)
    return results


def table(results: dict, batch: int, floor_ms: float) -> str:
    base = results.get("cudnn", {}).get("ms")
    rows = [f"{'provider':<17} {'ms':>9} {'img/s':>10} {'vs cudnn':>9} {'of floor':>9} "
            f"{'rel err':>8} {'peak MB':>8}"]
    for provider, r in results.items():
        ms = r["ms"]
        rows.append(f"{provider:<17} {ms:>9.3f} {batch / ms * 1e3:>10.0f} "
                    f"{(base / ms if base else float('nan')):>8.2f}x {floor_ms / ms:>9.3f} "
                    f"{r['max_rel_error']:>8.1e} {r['peak_mem_mb']:>8.0f}")
    return "\n".join(rows)


def plot(results: dict, title: str, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3))
    colours = ["#888" if not p.startswith("cnnfuse") else "#d62" for p in results]
    ax.bar(list(results), [r["ms"] for r in results.values()], color=colours)
    ax.set_ylabel("ms per batch (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    from .machine import info
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    dtype = DTYPES[args.dtype] if gpu else torch.float32
    device = "cuda" if gpu else "cpu"
    batch = args.batch if gpu else min(args.batch, 2)
    names = args.providers.split(",") if gpu else []
    size = zoo.input_size(args.model)
    with tqdm(total=3 + len(names), desc="building", unit=" step", file=sys.stderr) as bar:
        model = zoo.build(args.model)
        flops = zoo.flops_per_image(model, size) * batch
        x = providers.example_input(batch, size, dtype, device)
        reference = providers.reference_logits(model, x)
        bar.update(1)
        bar.set_description("fusing")
        fused = cnnfuse.fuse(model, dtype=dtype).to(device)
        report = cnnfuse.explain(model)
        bar.update(1)
        bar.set_description("checking logits")
        with cnnfuse.autotune.progress("autotuning conv shapes"), torch.no_grad():
            err = providers.relative_error(fused(x), reference)
        del fused
        bar.update(1)
        results = time_providers(model, x, reference, names, args.iters, bar)

    ok = err <= providers.TOLERANCE[dtype]
    dtype_name = args.dtype if gpu else "fp32"
    print(f"{args.model}, batch {batch}, {dtype_name}, {size}x{size}, channels_last: "
          f"{report.conv_fused}/{report.conv_sites} conv sites fused; max relative error vs "
          f"the unfused model in fp64 {err:.2e} ({'ok' if ok else 'TOO LARGE'})")
    compute_floor = zoo.compute_floor_ms(flops)
    memory_floor = zoo.memory_floor_ms(model, batch, size, dtype)
    common = {"model": args.model, "batch": batch, "dtype": dtype_name,
              "compute_floor_ms": compute_floor, "memory_floor_ms": memory_floor}
    record = {"kind": "cnnfuse.bench", "machine": info(), "input": size, "gflops": flops / 1e9,
              "fused_sites": report.conv_fused, "conv_sites": report.conv_sites,
              "max_rel_error": err,
              "records": [dict(common, provider=p, **r) for p, r in results.items()]}
    if not gpu:
        print("No CUDA GPU: checked correctness on the CPU path (fp32 reference kernels) at "
              f"batch {batch}. GPU timing needs CUDA.")
    else:
        print(table(results, batch, max(compute_floor, memory_floor)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model.replace('/', '_')}_b{batch}_{dtype_name}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    if results and plot(results, f"{args.model} batch {batch} {args.dtype} "
                        f"({record['machine']['gpu']})", out / f"{stem}.png"):
        print(f"wrote {out / stem}.json and .png")
    else:
        print(f"wrote {out / stem}.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
