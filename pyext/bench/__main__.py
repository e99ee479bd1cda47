"""The main job: `python -m cnnfuse.bench --model googlenet --batch 64` (or `cnnfuse-bench`).

Builds the model (any torchvision or timm classifier, or a cnnfuse seed architecture; random
weights or `--checkpoint`), fuses it, checks the fused logits against the unfused model in
fp64, then times every provider (cuDNN eager, eager with conv + BN folded, torch.compile
with freezing, cnnfuse, torch.compile of cnnfuse) under CUDA graphs in the same dtype and
layout, prints a table and writes JSON (which `python -m cnnfuse.bench.report` reads) and a
PNG bar chart. With `--images DIR` the check and the timing run on those photographs,
preprocessed as the model's pretrained config says, and it reports how often fused and
unfused agree on the top-1 and top-5 classes. Without a GPU it checks correctness on the CPU
path at a small batch (`--cpu-batch`) and says that timing needs CUDA.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import cnnfuse

from . import agreement, images, providers, user_model, zoo

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHOWN = 8  # predictions printed side by side; all of them go into the JSON


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help; one whose default is None says in its own help what
    that means ("(default: the model's config)") instead of "(default: None)"."""

    def _get_help_string(self, action):
        if action.default is None and "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cnnfuse-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=_Defaults)
    p.add_argument("--model", default="googlenet",
                   help="a torchvision classification model, a timm model as timm:<name> "
                        "(or timm/<name>, or a plain name torchvision lacks), or a seed "
                        "architecture as cnnfuse/<name>")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="weights to load: a torch.save'd state_dict (also nested under "
                        "'state_dict', 'model', ...), read with weights_only=True (default: "
                        "none, random weights and randomised BatchNorm statistics)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="let --checkpoint be a whole pickled model, loaded with "
                        "weights_only=False: that runs code from the file, so only for files "
                        "you trust")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs of the architecture, for a checkpoint with its own "
                        "head (default: the architecture's own)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="a folder of JPEG/PNG photographs to check (and, on a GPU, time) "
                        "fused against unfused on (default: none, random inputs)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="class names: one per line, or a JSON list / {index: name} "
                        "(default: ImageNet's for 1000 classes, else the indices)")
    p.add_argument("--size", type=int, default=None,
                   help="input side in pixels (default: the model's pretrained config)")
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="normalisation mean of [0, 1] pixels (default: the model's config)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="normalisation std (default: the model's config)")
    p.add_argument("--batch", type=int, default=64, help="images per forward on the GPU")
    p.add_argument("--cpu-batch", type=int, default=2,
                   help="images per forward without a GPU (the CPU check; larger takes long)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16",
                   help="on the GPU; the CPU check runs fp32")
    p.add_argument("--iters", type=int, default=50, help="timed graph replays per provider")
    p.add_argument("--providers", default=",".join(providers.PROVIDERS),
                   help=f"comma-separated, from {', '.join(providers.PROVIDERS)}")
    p.add_argument("--out", default="results", help="folder for the JSON and the PNG")
    args = p.parse_args(argv)
    unknown = set(args.providers.split(",")) - set(providers.PROVIDERS)
    if unknown:
        p.error(f"unknown provider(s) {', '.join(sorted(unknown))}; "
                f"expected {', '.join(providers.PROVIDERS)}")
    for option in ("batch", "cpu_batch", "iters"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1")
    return args


class Steps:
    """Progress of the main job: a bar on a terminal, plain lines on stderr otherwise (a log,
    CI, make), so that no cursor-control codes land in a file."""

    def __init__(self, total: int):
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit=" step", file=sys.stderr, disable=not self.tty)

    def set_description(self, text: str) -> None:
        if self.tty:
            self.bar.set_description(text)
        else:
            print(f"cnnfuse-bench: {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def tuning(self, text: str):
        """The autotuner's own bar, on a terminal only."""
        return cnnfuse.autotune.progress(text) if self.tty else contextlib.nullcontext()

    def close(self) -> None:
        self.bar.close()


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


def _batch(args, gpu: bool) -> tuple[int, str]:
    """The batch this run uses and, when it is not the one asked for, why."""
    if gpu:
        return args.batch, ""
    if args.cpu_batch == args.batch:
        return args.batch, ""
    return args.cpu_batch, (f"batch {args.cpu_batch}, not the {args.batch} asked: no CUDA GPU, "
                            "so this run checks the fused model on the CPU path, where batch "
                            "size changes nothing the check sees (--cpu-batch sets it)")


def _inputs(photos, pre, batch: int, dtype, device) -> torch.Tensor:
    """The images repeated (or cut) to `batch` rows, for the fp64 check and the timing."""
    rows = photos.repeat((batch + len(photos) - 1) // len(photos), 1, 1, 1)[:batch]
    return rows.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def main(argv=None) -> int:
    from .machine import info
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    dtype = DTYPES[args.dtype] if gpu else torch.float32
    dtype_name = args.dtype if gpu else "fp32"
    device = "cuda" if gpu else "cpu"
    batch, batch_note = _batch(args, gpu)
    names = args.providers.split(",") if gpu else []
    try:
        user = user_model.load(args.model, args.checkpoint, trust_pickle=args.trust_pickle,
                               num_classes=args.num_classes)
        pre = images.resolve(user.model, user.family, user.arch, size=args.size,
                             mean=args.mean, std=args.std,
                             fallback_size=zoo.input_size(user.arch))
        files = images.find(args.images) if args.images else []
        photos = images.load(files, pre) if files else None
    except (ValueError, TypeError) as exc:
        print(f"cnnfuse-bench: error: {exc}", file=sys.stderr)
        return 2
    model, size = user.model, pre.size
    print(f"{args.model}: {user.family} {user.arch}, {user.weights}")
    print(batch_note or f"batch {batch}")
    if photos is not None:
        print(f"images: {len(files)} from {args.images}; {pre.describe()}")

    steps = Steps(total=3 + (photos is not None) + len(names))
    try:
        steps.set_description("building the fp64 reference")
        flops = zoo.flops_per_image(model, size) * batch
        x = (_inputs(photos, pre, batch, dtype, device) if photos is not None
             else providers.example_input(batch, size, dtype, device))
        reference = providers.reference_logits(model, x)
        if photos is not None:
            try:
                labels, label_source = images.labels(args.labels, reference.shape[1])
            except ValueError as exc:  # a labels file that does not fit the model's classes
                print(f"cnnfuse-bench: error: {exc}", file=sys.stderr)
                return 2
        steps.update()
        steps.set_description("fusing")
        fused = cnnfuse.fuse(model, dtype=dtype).to(device)
        report = cnnfuse.explain(model)
        steps.update()
        steps.set_description("checking logits")
        with steps.tuning("autotuning conv shapes"), torch.no_grad():
            err = providers.relative_error(fused(x), reference)
        steps.update()
        agreed = None
        if photos is not None:
            steps.set_description(f"comparing fused and unfused on {len(files)} images")
            unfused = providers.make("cudnn", model, dtype, device)
            with torch.no_grad():
                agreed = agreement.compare(
                    agreement.logits_of(unfused, photos, batch, device, dtype),
                    agreement.logits_of(fused, photos, batch, device, dtype),
                    [f.name for f in files])
            del unfused
            steps.update()
        del fused
        results = time_providers(model, x, reference, names, args.iters, steps)
    finally:
        steps.close()

    ok = err <= providers.TOLERANCE[dtype]
    inputs = "the images" if photos is not None else "random inputs"
    print(f"{args.model}, batch {batch}, {dtype_name}, {size}x{size}, channels_last: "
          f"{report.conv_fused}/{report.conv_sites} conv sites fused; max relative error vs "
          f"the unfused model in fp64 on {inputs} {err:.2e} ({'ok' if ok else 'TOO LARGE'})")
    record = {"kind": "cnnfuse.bench", "machine": info(), "input": size, "gflops": flops / 1e9,
              "model": args.model, "weights": user.weights, "batch": batch,
              "batch_asked": args.batch, "fused_sites": report.conv_fused,
              "conv_sites": report.conv_sites, "max_rel_error": err}
    if agreed is not None:
        print(agreement.summary(agreed, dtype_name))
        print(f"predictions (class names: {label_source}):")
        print(agreement.side_by_side(agreed, labels, SHOWN))
        record["images"] = dict(agreed.as_dict(), folder=str(args.images),
                                preprocessing=pre.describe())
    compute_floor = zoo.compute_floor_ms(flops)
    memory_floor = zoo.memory_floor_ms(model, batch, size, dtype)
    common = {"model": args.model, "batch": batch, "dtype": dtype_name,
              "compute_floor_ms": compute_floor, "memory_floor_ms": memory_floor}
    record["records"] = [dict(common, provider=p, **r) for p, r in results.items()]
    if not gpu:
        print("No CUDA GPU: checked correctness on the CPU path (fp32 reference kernels) at "
              f"batch {batch}. GPU timing needs CUDA.")
    else:
        if photos is not None:
            print(f"timed on the {len(files)} images, repeated to batch {batch}:")
        print(table(results, batch, max(compute_floor, memory_floor)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model.replace('/', '_').replace(':', '_')}_b{batch}_{dtype_name}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    if results and plot(results, f"{args.model} batch {batch} {args.dtype} "
                        f"({record['machine']['gpu']})", out / f"{stem}.png"):
        print(f"wrote {out / stem}.json and .png")
    else:
        print(f"wrote {out / stem}.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
