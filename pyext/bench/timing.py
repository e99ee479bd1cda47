"""GPU timing as every provider gets it: warm-up, CUDA graph capture, replay, median."""
import statistics
from typing import Callable

import torch


def graph_callable(fn: Callable[[], torch.Tensor], warmup: int = 3) -> Callable[[], None]:
    """Capture fn() in a CUDA graph after a warm-up on a side stream; returns a replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def median_ms(run: Callable[[], None], iters: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
