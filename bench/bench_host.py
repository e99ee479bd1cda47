"""Host overhead: what a fused op costs on the host against the eager ops it replaces.

Eager use (no CUDA graph) at batch 1 to 32 is bound by host time per op, which the CUDA-graph
suites hide. Each case is an eager block (what the original model runs: conv, BatchNorm,
activation, residual add, pool, SE layers) and the one fused module `cnnfuse.fuse` makes of
it, called at a tiny shape so that the compute is negligible; both are timed interleaved
(rounds of `calls` calls each, alternating, the median of the rounds), in µs of the calling
thread's CPU time per call, without synchronising the GPU inside a round (host time only).
The models part times a whole forward of the small zoo models at 1×3×16×16, original in
channels_last against fused, also as µs per conv of the original.

On a GPU the same cases run in float16 (channels_last), each fused module on the backend
its autotuned plan resolved to, and a launch part times one Triton kernel (the SE gate's)
launched through Triton (`kernel[grid](...)`) against the cached launch of
cnnfuse.kernels.launch. GPU calls are queued without waiting for the GPU (it synchronises
only between rounds); a tiny shape keeps the queue from filling, so the clock sees host work.

    python bench/bench_host.py                  # every device there is (CPU: 1 thread)
    python bench/bench_host.py --device cpu     # CPU only: the reference path
    python bench/bench_host.py --device cuda    # a GPU's host time (Triton / C++ launches)
    pytest bench/bench_host.py --benchmark-only # the same cases as pytest-benchmark rows (GPU)

Figures are medians; on a shared machine rerun and compare the ratios, not the µs.
"""
import argparse
import statistics
import sys
import time

import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse.models.modules import (FusedConv2d, FusedPoolConv2d, FusedSeparableConv2d,
                                    FusedSqueezeExcite)

SMALL_ZOO = ("resnet50", "googlenet", "mobilenet_v2", "mobilenet_v3_large", "mnasnet1_0",
             "efficientnet_b0", "shufflenet_v2_x1_0", "squeezenet1_1")


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


class _Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1, bias=False), _bn(c)

    def forward(self, x, r):
        return torch.relu(self.bn(self.conv(x)) + r)


class _IntoSlice(nn.Module):  # a branch of an Inception block: the conv output copied by cat
    def __init__(self, c):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), _bn(c), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), _bn(c), nn.ReLU(inplace=True))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class _Block(nn.Module):  # so that fuse sees one FX graph of the whole sequence
    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class _SE(nn.Module):  # torchvision's SqueezeExcitation
    def __init__(self, c, r):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return s

    def fused(self) -> FusedSqueezeExcite:
        fc1, fc2 = FusedConv2d.from_conv(self.fc1), FusedConv2d.from_conv(self.fc2)
        fc1.activation, fc2.activation = "relu", "sigmoid"
        return FusedSqueezeExcite.from_convs(fc1, fc2)


def cases(c: int = 8, hw: int = 4):
    """name -> (eager block, fused module kind, input builder). Inputs are channels_last."""
    return {
        "conv3x3+bn+relu": (_Block(nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c),
                                   nn.ReLU(inplace=True)), FusedConv2d, 1),
        "conv3x3+relu (no bn)": (_Block(nn.Conv2d(c, c, 3, padding=1),
                                        nn.ReLU(inplace=True)), FusedConv2d, 1),
        "conv1x1+bn+add+relu": (_Residual(c), FusedConv2d, 2),
        "2x conv1x1+bn+relu, cat": (_IntoSlice(c), FusedConv2d, 1),
        "dw3x3+bn+relu6": (_Block(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                                         _bn(c), nn.ReLU6(inplace=True)), FusedConv2d, 1),
        "dw3x3+bn+relu6, 1x1+bn": (_Block(
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), _bn(c), nn.ReLU6(inplace=True),
            nn.Conv2d(c, c, 1, bias=False), _bn(c)), FusedSeparableConv2d, 1),
        "maxpool3x3, 1x1+bn+relu": (_Block(
            nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, c, 1, bias=False), _bn(c),
            nn.ReLU(inplace=True)), FusedPoolConv2d, 1),
        "SE gate (2 FC)": (_SE(c, max(c // 4, 1)), FusedSqueezeExcite, 1),
    }, (1, c, hw, hw)


def _median_us(fns, calls: int, rounds: int, device: str) -> list:
    """Interleaved rounds; per fn the median over rounds of the µs per call. The clock is
    this thread's CPU time (time.thread_time): host work only, and on a shared machine not
    the time the thread waited for a core."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns:  # warm-up: plans, autotuning, compilation
        for _ in range(5):
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            sync()
            t = time.thread_time()
            for _ in range(calls):
                fn()
            times[i].append((time.thread_time() - t) / calls * 1e6)
    sync()
    return [statistics.median(t) for t in times]


def prepare_op(name: str, device: str = "cpu", dtype=torch.float32):
    """(eager call, fused call, functional cnnfuse.ops call or None) for one case."""
    table, shape = cases()
    block, kind, n_inputs = table[name]
    block = block.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    args = (x,) if n_inputs == 1 else (x, torch.randn_like(x))
    fused = cnnfuse.fuse(block)
    if kind is FusedSqueezeExcite:
        fused = block.fused().to(device=device, dtype=dtype)
    module = next(m for m in fused.modules() if isinstance(m, kind))
    if kind is FusedSqueezeExcite:
        margs = (x.mean((2, 3), dtype=torch.float32),) if module.takes_pooled else (x,)
    else:
        margs = args
    if name.startswith("2x"):  # the fused graph, which writes both convs into one buffer
        return (lambda: block(*args)), (lambda: fused(*args)), None
    functional = None
    if kind is FusedConv2d and n_inputs == 1:
        w, b = module.weight, module.bias
        functional = (lambda: cnnfuse.ops.conv2d(x, w, b, module.stride, list(module.padding),
                                                 module.dilation, module.groups,
                                                 activation=module.activation))
    return (lambda: block(*args)), (lambda: module(*margs)), functional


DTYPES = {"cpu": torch.float32, "cuda": torch.float16}  # what each device runs models in


def bench_ops(device: str, calls: int, rounds: int) -> list:
    rows = []
    with torch.inference_mode():
        for name in cases()[0]:
            eager, fused, functional = prepare_op(name, device, DTYPES[device])
            fns = [eager, fused] + ([functional] if functional else [])
            t = _median_us(fns, calls, rounds, device)
            rows.append((name, t[0], t[1], t[2] if functional else None))
    return rows


def launch_calls() -> list:
    """(what, call) pairs launching the SE gate kernel (a CUDA GPU) the same way: Triton's
    launch and the cached one."""
    import triton
    from cnnfuse.kernels import launch as cached
    from cnnfuse.kernels.se_gate import _se_gate_kernel, _tiles
    n, c, r = 4, 64, 16
    f16 = dict(device="cuda", dtype=torch.float16)
    pooled, gate = torch.randn(n, c, device="cuda"), torch.empty(n, c, **f16)
    w1, b1 = torch.randn(r, c, **f16), torch.randn(r, **f16)
    w2, b2 = torch.randn(c, r, **f16), torch.randn(c, **f16)
    tiles = _tiles(r)
    grid = (triton.cdiv(n, tiles["BLOCK_N"]),)
    args = (pooled, w1, b1, w2, b2, gate, n, c, r, *pooled.stride(), *w1.stride(),
            *w2.stride(), *gate.stride())
    kwargs = dict(HAS_B1=True, HAS_B2=True, ACT1=1, ACT2=6, **tiles, num_warps=4,
                  num_stages=1)
    return [("Triton kernel[grid](...)", lambda: _se_gate_kernel[grid](*args, **kwargs)),
            ("cnnfuse.kernels.launch", lambda: cached.launch(_se_gate_kernel, grid, args,
                                                             kwargs))]


def bench_launch(calls: int, rounds: int) -> list:
    """(what, µs per launch) for launch_calls()."""
    named = launch_calls()
    return list(zip([w for w, _ in named], _median_us([f for _, f in named], calls, rounds,
                                                      "cuda")))


def bench_models(names, device: str, rounds: int) -> list:
    from cnnfuse.bench import zoo
    rows = []
    with torch.inference_mode():
        for name in names:
            net = zoo.build(name).to(device=device, dtype=DTYPES[device])
            x = torch.randn(1, 3, 16, 16, device=device, dtype=DTYPES[device])
            fused = cnnfuse.fuse(net)
            original = net.to(memory_format=torch.channels_last)
            xc = x.contiguous(memory_format=torch.channels_last)
            convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
            try:
                t = _median_us([lambda: original(xc), lambda: fused(xc)], 3, rounds, device)
            except RuntimeError as exc:  # e.g. pooled to nothing at 16x16 (SqueezeNet)
                print(f"{name}: skipped ({str(exc).splitlines()[0]})")
                continue
            rows.append((name, convs, t[0], t[1]))
    return rows


def report(device: str, args) -> None:
    torch.set_num_threads(args.threads)
    print(f"host time per call, {device} ({str(DTYPES[device])[6:]}), "
          f"{torch.get_num_threads()} CPU thread(s), backend "
          f"{cnnfuse.backend.requested_backend()}, medians of {args.rounds} rounds")
    print(f"{'op':28s} {'eager µs':>9s} {'fused µs':>9s} {'ratio':>6s} {'ops.* µs':>9s}")
    for name, eager, fused, functional in bench_ops(device, args.calls, args.rounds):
        print(f"{name:28s} {eager:9.1f} {fused:9.1f} {fused / eager:6.2f} "
              + (f"{functional:9.1f}" if functional is not None else f"{'':>9s}"))
    if device == "cuda":
        print(f"\n{'launch (SE gate kernel)':28s} {'µs':>9s}")
        for what, us in bench_launch(args.calls, args.rounds):
            print(f"{what:28s} {us:9.1f}")
    names = SMALL_ZOO if args.models == "small" else [n for n in args.models.split(",") if n]
    if names:
        print(f"\n{'model 1x3x16x16':20s} {'convs':>5s} {'orig ms':>8s} {'fused ms':>8s} "
              f"{'ratio':>6s} {'orig µs/conv':>12s} {'fused µs/conv':>13s}")
        for name, convs, orig, fused in bench_models(names, device, args.rounds):
            print(f"{name:20s} {convs:5d} {orig / 1e3:8.2f} {fused / 1e3:8.2f} "
                  f"{fused / orig:6.2f} {orig / convs:12.1f} {fused / convs:13.1f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: the CPU, then the GPU if there is one")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--calls", type=int, default=200, help="calls per round (ops)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default=",".join(SMALL_ZOO[:3]),
                        help="comma-separated zoo names ('' for none; 'small' for all of "
                             f"{', '.join(SMALL_ZOO)})")
    args = parser.parse_args(argv)
    devices = [args.device] if args.device else ["cpu"] + (
        ["cuda"] if torch.cuda.is_available() else [])
    for i, device in enumerate(devices):
        if i:
            print()
        report(device, args)


# pytest-benchmark rows (bench/conftest.py runs them where a GPU is): host time per call.
@pytest.mark.parametrize("provider", ["eager", "cnnfuse"])
@pytest.mark.parametrize("case", list(cases()[0]))
def test_host_op(case, provider, benchmark):
    eager, fused, _ = prepare_op(case, "cuda", DTYPES["cuda"])
    fn = eager if provider == "eager" else fused
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=200, iterations=10, warmup_rounds=20)
    torch.cuda.synchronize()
    benchmark.extra_info.update(case=case, provider=provider, what="host time per call")


@pytest.mark.parametrize("how", ["triton", "cached"])
def test_host_launch(how, benchmark):
    """Host time of one Triton launch (the SE gate kernel): Triton's own, or the cached."""
    fn = dict(zip(["triton", "cached"], [f for _, f in launch_calls()]))[how]
    benchmark.pedantic(fn, rounds=200, iterations=10, warmup_rounds=20)
    torch.cuda.synchronize()
    benchmark.extra_info.update(how=how, what="host time per launch")


if __name__ == "__main__":
    main(sys.argv[1:])
