"""A fused model pickles into torch.multiprocessing spawn workers, which share one picks file
(CNNFUSE_PICKS) and one autotune cache (CNNFUSE_CACHE_DIR), and computes the same outputs
there as in the parent."""
import torch
import torch.multiprocessing as mp
from torch import nn

import cnnfuse
from cnnfuse.tune import save_picks

from .util import randomize_batchnorm


def _run(rank: int, model: nn.Module, x: torch.Tensor, results) -> None:
    import os
    from cnnfuse import autotune
    with torch.no_grad():
        y = model(x)
    # the picks file is consulted before any search (a pick that is not a candidate would be)
    pick = autotune.Autotuner("conv2d").pick(
        "a shape", {"cudnn": None, "triton_a": None}, reference=None, tolerance=0.0,
        default="cudnn")
    # numpy, sent by value: a shared tensor would need this process alive until it is read
    results.put((rank, y.numpy(), os.environ.get("CNNFUSE_PICKS"), str(autotune.cache_dir()),
                 pick))


def test_a_fused_model_runs_in_spawn_workers_with_the_same_outputs(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    fused = cnnfuse.fuse(randomize_batchnorm(model).eval())
    x = torch.randn(3, 3, 9, 11).contiguous(memory_format=torch.channels_last)
    picks = tmp_path / "picks.json"
    cnnfuse.tune(fused, x, save=picks)  # on the CPU: runs, picks nothing
    save_picks({"conv2d": {"a shape": "triton_a"}}, picks)  # as a GPU would have picked
    monkeypatch.setenv("CNNFUSE_PICKS", str(picks))
    monkeypatch.setenv("CNNFUSE_CACHE_DIR", str(tmp_path / "cache"))
    with torch.no_grad():
        want = fused(x)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    workers = [context.Process(target=_run, args=(rank, fused, x, results)) for rank in range(2)]
    for w in workers:
        w.start()
    got = [results.get() for _ in workers]
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    assert sorted(rank for rank, *_ in got) == [0, 1]
    for rank, y, picks_env, cache, pick in got:
        assert torch.equal(torch.from_numpy(y), want), f"worker {rank}"
        assert picks_env == str(picks) and cache == str(tmp_path / "cache")
        assert pick == "triton_a", f"worker {rank} did not use the shared picks file"
