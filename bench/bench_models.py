"""End to end: every model of the zoo (cnnfuse.bench.zoo.ZOO) against cuDNN and torch.compile.

Parametrised by model, batch (1, 32, 256), dtype (fp16, bf16) and provider
(cnnfuse.bench.providers.PROVIDERS); channels_last, CUDA graphs, random weights, randomised
BatchNorm statistics. Before a provider is timed its logits are checked against the unfused
model in fp64 (cnnfuse's must be within providers.TOLERANCE, or the case fails untimed); the
error and the provider's steady-state peak memory go into the JSON beside the time and both
floors. `--quick` keeps zoo.QUICK at batch 256 in fp16; `-k` selects (`-k "mobilenet and 256"`).

`test_model_eager` is the same comparison as users run it, without CUDA graphs: at batch 1
and 32 (fp16) the host's time per op, not the GPU's, sets the speed there. Each round is one
forward plus a synchronise, wall-clock (`-k eager`).
"""
import functools

import pytest
import torch

from cnnfuse.bench import providers, zoo

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=2)
def _model(name: str):
    model = zoo.build(name)
    return model, zoo.flops_per_image(model, zoo.input_size(name))


@functools.lru_cache(maxsize=2)
def _input_and_reference(name: str, batch: int, dtype: str):
    x = providers.example_input(batch, zoo.input_size(name), DTYPES[dtype], "cuda")
    return x, providers.reference_logits(_model(name)[0], x)


@pytest.mark.parametrize("provider", providers.PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 32, 256])
@pytest.mark.parametrize("model", zoo.ZOO, ids=[n.replace("/", ".") for n in zoo.ZOO])
def test_model(model, batch, dtype, provider, timed):
    net, flops_per_image = _model(model)
    x, reference = _input_and_reference(model, batch, dtype)
    try:
        prepared = providers.prepare(provider, net, x, reference)
    except AssertionError as exc:
        pytest.fail(str(exc))
    try:
        moved = zoo.min_bytes(net, batch, zoo.input_size(model), DTYPES[dtype])
        timed(prepared.replay, flops_per_image * batch, moved,
              rounds=20, model=model, batch=batch, dtype=dtype, provider=provider,
              max_rel_error=prepared.max_rel_error, peak_mem_mb=prepared.peak_mem_mb)
    finally:
        del prepared
        providers.release()


@pytest.mark.parametrize("provider", providers.PROVIDERS)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("model", zoo.ZOO, ids=[n.replace("/", ".") for n in zoo.ZOO])
def test_model_eager(model, batch, provider, benchmark):
    dtype = "fp16"
    net, flops_per_image = _model(model)
    x, reference = _input_and_reference(model, batch, dtype)
    try:
        prepared = providers.prepare(provider, net, x, reference)
    except AssertionError as exc:
        pytest.fail(str(exc))
    try:
        fn = prepared.fn

        def once():
            with torch.no_grad():
                fn(x)
            torch.cuda.synchronize()
        benchmark.pedantic(once, rounds=30, iterations=1, warmup_rounds=5)
        stats = getattr(benchmark.stats, "stats", None)  # None with --benchmark-disable
        ms = stats.median * 1e3 if stats is not None else None
        benchmark.extra_info.update(
            gpu=torch.cuda.get_device_name(), model=model, batch=batch, dtype=dtype,
            provider=provider, cuda_graphs=False, wall_ms=ms,
            tflops=flops_per_image * batch / (ms * 1e-3) / 1e12 if ms else None,
            max_rel_error=prepared.max_rel_error)
    finally:
        del prepared
        providers.release()
