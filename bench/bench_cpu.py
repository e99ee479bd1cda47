"""The CPU path end to end: is a fused model at least as fast as the original on the CPU?

For the small zoo models (bench_host.SMALL_ZOO): the original in NCHW, the original in
channels_last (model and input), and `cnnfuse.fuse(model)` (channels_last), fp32, eval,
`torch.inference_mode`, at a given batch, image size and thread count (the defaults, batch 8
at 224² on 2 threads, are how a user would try it). The three are timed interleaved (one
forward each per round, after a warm-up), so load on a shared machine hits them alike, and
each variant's best round is reported (wall clock: the process's CPU time would count the
OpenMP workers' spinning, the median a shared machine's load); the ratio fused / original
channels_last is the figure that counts (≤ 1.0 is the target). The fused logits are checked
against the original's first.

    python bench/bench_cpu.py                           # every small zoo model
    python bench/bench_cpu.py --models mobilenet_v2 --rounds 9 --threads 2 --batch 8
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import cnnfuse

sys.path.insert(0, str(Path(__file__).parent))
from bench_host import SMALL_ZOO  # noqa: E402


_clock = time.perf_counter


def compare(name: str, batch: int, size: int, rounds: int) -> dict:
    """Best ms per forward of the three variants, and the fused logits' error."""
    from cnnfuse.bench import zoo
    torch.manual_seed(0)
    net = zoo.build(name)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        nchw = net
        fused = cnnfuse.fuse(net)
        expected = nchw(x)
        import copy
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        got = fused(xc)
        error = ((got.float() - expected).abs().max() / expected.abs().max()).item()
        variants = {"original NCHW": lambda: nchw(x), "original channels_last": lambda: cl(xc),
                    "fused": lambda: fused(xc)}
        for fn in variants.values():
            fn()
        times = {k: [] for k in variants}
        for _ in range(rounds):
            for k, fn in variants.items():
                t = _clock()
                fn()
                times[k].append((_clock() - t) * 1e3)
    return {"model": name, "error": error, **{k: min(v) for k, v in times.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SMALL_ZOO))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, batch {args.batch}, {args.size}², fp32, "
          f"backend {cnnfuse.backend.requested_backend()}, best of {args.rounds} rounds "
          "(best wall ms per forward)")
    print(f"{'model':20s} {'NCHW':>9s} {'ch_last':>9s} {'fused':>9s} {'fused/cl':>8s} "
          f"{'fused/NCHW':>10s} {'rel err':>8s}")
    for name in args.models.split(","):
        r = compare(name, args.batch, args.size, args.rounds)
        a, b, c = r["original NCHW"], r["original channels_last"], r["fused"]
        print(f"{name:20s} {a:9.1f} {b:9.1f} {c:9.1f} {c / b:8.2f} {c / a:10.2f} "
              f"{r['error']:8.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
