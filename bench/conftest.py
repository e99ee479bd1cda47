"""pytest-benchmark suites; they need a CUDA GPU (`pytest bench/ --benchmark-only`).

`--quick` keeps a few-minute selection: the models of cnnfuse.bench.zoo.QUICK at batch 256 in
fp16, every provider. The JSON (`--benchmark-json`, `--benchmark-autosave`) carries the GPU,
driver and library versions in its machine_info, so `--benchmark-compare` across runs and
`python -m cnnfuse.bench.report` know what each figure was measured on.
"""
import pytest
import torch

from cnnfuse.bench.zoo import PEAK_BYTES, PEAK_FLOPS, QUICK


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="only cnnfuse.bench.zoo.QUICK models at batch 256, fp16")


def _quick(item) -> bool:
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    return (params.get("model") in QUICK and params.get("batch") == 256
            and params.get("dtype") == "fp16")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--quick"):
        kept = [item for item in items if _quick(item)]
        config.hook.pytest_deselected(items=[item for item in items if not _quick(item)])
        items[:] = kept
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
        for item in items:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    from cnnfuse.bench.machine import info
    machine_info.update(info())


@pytest.fixture
def timed(benchmark):
    """Benchmark a CUDA-graph replay; record the floors beside the time.

    pytest-benchmark's own figures are wall-clock (replay + synchronise, so they include the
    launch and sync latency: tens of µs, visible at batch 1); `device_ms`, the median of CUDA
    events around each replay as the main job measures it, is what the floors and the report
    use."""
    def run(replay, flops: float, bytes_moved: float, rounds: int = 30, **extra):
        from cnnfuse.bench.timing import median_ms

        def once():
            replay()
            torch.cuda.synchronize()
        benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=5)
        device_s = median_ms(replay, iters=max(rounds, 20)) * 1e-3
        floor_s = max(flops / PEAK_FLOPS, bytes_moved / PEAK_BYTES)
        benchmark.extra_info.update(
            gpu=torch.cuda.get_device_name(), device_ms=device_s * 1e3, floor_ms=floor_s * 1e3,
            compute_floor_ms=flops / PEAK_FLOPS * 1e3,
            memory_floor_ms=bytes_moved / PEAK_BYTES * 1e3,
            fraction_of_floor=floor_s / device_s, tflops=flops / device_s / 1e12, **extra)
    return run
