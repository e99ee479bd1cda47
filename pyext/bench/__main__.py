"""The main job: `python -m cnnfuse.bench --model googlenet --batch 64` (or `cnnfuse-bench`).

Builds the model with random weights, fuses it, checks the fused logits against the unfused
fp32 model, then times cuDNN eager, torch.compile (freezing) and cnnfuse under CUDA graphs in
the same dtype and layout, prints a table and writes JSON and a PNG bar chart. Without a GPU it
checks correctness on the CPU path at a small batch and says that timing needs CUDA.
"""
import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import cnnfuse

from . import zoo

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative max error of the fused logits against the unfused fp32 model.
TOLERANCE = {torch.float16: 3e-2, torch.bfloat16: 8e-2, torch.float32: 1e-3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cnnfuse-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="googlenet",
                   help="torchvision name, or timm/<name> (default googlenet)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--iters", type=int, default=50, help="timed graph replays per provider")
    p.add_argument("--providers", default="cudnn,inductor,cnnfuse")
    p.add_argument("--out", default="results", help="folder for the JSON and the PNG")
    return p.parse_args(argv)


def check_correctness(model, fused, batch, size, dtype, device) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        expected = model.float().cpu()(x).double()
        got = fused(x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last))
    return ((got.double().cpu() - expected).abs().max() / expected.abs().max()).item()


def time_providers(model, fused, args, size, dtype, bar) -> dict:
    from .timing import graph_callable, median_ms
    x = torch.randn(args.batch, 3, size, size, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    eager = model.to(device="cuda", dtype=dtype, memory_format=torch.channels_last)
    results = {}
    for provider in args.providers.split(","):
        bar.set_description(f"timing {provider}")
        if provider == "cudnn":
            fn = eager
        elif provider == "inductor":
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
            fn = torch.compile(eager)
        elif provider == "cnnfuse":
            fn = fused
        else:
            raise SystemExit(f"unknown provider {provider!r}")
        with torch.no_grad():
            fn(x)  # compiles / autotunes outside the graph
            ms = median_ms(graph_callable(lambda: fn(x)), iters=args.iters)
        results[provider] = ms
        bar.update(1)
    return results


def table(results: dict, batch: int, floor_ms: float) -> str:
    base = results.get("cudnn")
    rows = [f"{'provider':<10} {'ms':>9} {'img/s':>10} {'vs cudnn':>9} {'of floor':>9}"]
    for provider, ms in results.items():
        rows.append(f"{provider:<10} {ms:>9.3f} {batch / ms * 1e3:>10.0f} "
                    f"{(base / ms if base else float('nan')):>8.2f}x {floor_ms / ms:>9.3f}")
    return "\n".join(rows)


def plot(results: dict, title: str, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(results), list(results.values()), color=["#888", "#58a", "#d62"][:len(results)])
    ax.set_ylabel("ms per batch (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype, gpu = DTYPES[args.dtype], torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    batch = args.batch if gpu else min(args.batch, 2)
    size = zoo.input_size(args.model)
    steps = 3 + (len(args.providers.split(",")) if gpu else 0)
    with tqdm(total=steps, desc="building", unit=" step", file=sys.stderr) as bar:
        model = zoo.build(args.model)
        flops = zoo.flops_per_image(model, size) * args.batch
        bar.update(1)
        bar.set_description("fusing")
        fused = cnnfuse.fuse(model, dtype=dtype if gpu else torch.float32).to(device)
        report = cnnfuse.explain(model)
        bar.update(1)
        bar.set_description("checking logits")
        if gpu:
            with cnnfuse.autotune.progress("autotuning conv shapes"):
                err = check_correctness(model, fused, batch, size, dtype, device)
        else:
            err = check_correctness(model, fused, batch, size, torch.float32, device)
        bar.update(1)
        results = time_providers(model, fused, args, size, dtype, bar) if gpu else {}

    ok = err <= TOLERANCE[dtype if gpu else torch.float32]
    print(f"{args.model}, batch {batch}, {args.dtype if gpu else 'fp32'}, {size}x{size}, "
          f"channels_last: {report.conv_fused}/{report.conv_sites} conv sites fused; "
          f"max relative error vs unfused fp32 {err:.2e} ({'ok' if ok else 'TOO LARGE'})")
    record = {
        "model": args.model, "batch": batch, "dtype": args.dtype if gpu else "fp32",
        "input": size, "max_rel_error": err, "fused_sites": report.conv_fused,
        "conv_sites": report.conv_sites, "gflops": flops / 1e9,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
        "cnnfuse": cnnfuse.__version__, "python": platform.python_version(), "ms": results,
    }
    if not gpu:
        print("No CUDA GPU: checked correctness on the CPU path (fp32 reference kernels) at "
              f"batch {batch}. GPU timing needs CUDA.")
    else:
        floor = zoo.compute_floor_ms(flops)
        record["compute_floor_ms"] = floor
        print(table(results, batch, floor))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model.replace('/', '_')}_b{batch}_{record['dtype']}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    if results and plot(results, f"{args.model} batch {batch} {args.dtype} "
                        f"({record['gpu']})", out / f"{stem}.png"):
        print(f"wrote {out / stem}.json and .png")
    else:
        print(f"wrote {out / stem}.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
