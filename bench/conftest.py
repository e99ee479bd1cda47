"""pytest-benchmark suites; they need a CUDA GPU (`pytest bench/ --benchmark-only`)."""
import pytest
import torch

from cnnfuse.bench.zoo import PEAK_BYTES, PEAK_FLOPS


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def timed(benchmark):
    """Benchmark a CUDA-graph replay (synchronised), and record the floor beside the time."""
    def run(replay, flops: float, bytes_moved: float, rounds: int = 30):
        def once():
            replay()
            torch.cuda.synchronize()
        benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=5)
        floor_s = max(flops / PEAK_FLOPS, bytes_moved / PEAK_BYTES)
        benchmark.extra_info.update(
            gpu=torch.cuda.get_device_name(), torch=torch.__version__, floor_ms=floor_s * 1e3,
            fraction_of_floor=floor_s / benchmark.stats.stats.median,
            tflops=flops / benchmark.stats.stats.median / 1e12)
    return run
