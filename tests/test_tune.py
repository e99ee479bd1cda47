"""cnnfuse.tune and picks files: tuning ahead on a model, picks that travel in a file keyed by
GPU and versions, a foreign file ignored with a log line, CNNFUSE_PICKS."""
import importlib
import json
import logging

import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse import autotune
from cnnfuse.ops.conv2d import _key

tune_module = importlib.import_module("cnnfuse.tune")  # the module; cnnfuse.tune is the function

GPU = {"device": "NVIDIA H200", "capability": "9.0", "cnnfuse": cnnfuse.__version__,
       "torch": torch.__version__, "triton": "3.6.0"}


@pytest.fixture(autouse=True)
def _fresh_picks(monkeypatch):
    """No picks loaded and none recorded before or after each test."""
    monkeypatch.delenv("CNNFUSE_PICKS", raising=False)
    monkeypatch.setattr(autotune, "preset", None)
    monkeypatch.setattr(autotune, "recording", None)


@pytest.fixture
def on_gpu(monkeypatch):
    """Pretend this process runs on an H200, and make the autotuner's own search answer
    'searched' (never timing anything), so picks can be checked without a GPU."""
    monkeypatch.setattr(tune_module, "environment", lambda: dict(GPU))
    searched = []

    def search(self, key, candidates, reference, tolerance, default):
        searched.append(key)
        return default
    monkeypatch.setattr(autotune.Autotuner, "_pick", search)
    return searched


def _never():
    raise AssertionError("a candidate ran although a pick was given")


CANDIDATES = {"triton_a": _never, "triton_b": _never, "cudnn": _never}


def _pick(op, key):
    return autotune.Autotuner(op).pick(key, CANDIDATES, reference=_never, tolerance=1e-3,
                                       default="cudnn")


def _write(path, picks, **environment):
    path.write_text(json.dumps({"format": "cnnfuse-picks", "version": 1,
                                "environment": {**GPU, **environment}, "picks": picks}))
    return path


def test_tune_on_cpu_runs_the_model_and_says_there_is_nothing_to_tune(tmp_path, caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    fused = cnnfuse.fuse(model)
    x = torch.randn(2, 3, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = fused(x)
    with caplog.at_level(logging.INFO, logger="cnnfuse"):
        report = cnnfuse.tune(fused, x, batch_sizes=[1, 3], save=tmp_path / "p.json")
    assert report.shapes == [(1, 3, 9, 7), (3, 3, 9, 7)]
    assert report.picks == {} and "nothing to tune" in str(report)
    assert "nothing to tune" in caplog.text
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["environment"]["device"] == "cpu" and doc["picks"] == {}
    with torch.no_grad():
        assert torch.equal(fused(x), before)


def test_tune_records_every_pick_and_saves_them(tmp_path, on_gpu):
    class Calls(nn.Module):  # stands in for a model whose ops ask the autotuner on a GPU
        def forward(self, x):
            _pick("conv2d", f"float16 x{list(x.shape)}")
            _pick("separable_conv2d", f"float16 x{list(x.shape)} dw")
            return x

    report = cnnfuse.tune(Calls(), torch.zeros(4, 3, 5, 5), batch_sizes=[1, 2],
                          save=tmp_path / "p.json")
    want = {"conv2d": {"float16 x[1, 3, 5, 5]": "cudnn", "float16 x[2, 3, 5, 5]": "cudnn"},
            "separable_conv2d": {"float16 x[1, 3, 5, 5] dw": "cudnn",
                                 "float16 x[2, 3, 5, 5] dw": "cudnn"}}
    assert report.picks == want
    assert "conv2d: cuDNN + CUDA C++ bias_act x2" in str(report)
    assert autotune.recording is None  # only while tuning
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["environment"] == GPU and doc["picks"] == want


def test_picks_from_a_file_come_before_the_search(tmp_path, on_gpu):
    path = _write(tmp_path / "p.json", {"conv2d": {"k1": "triton_b"}, "pool_conv2d": {"k1": "x"}})
    assert cnnfuse.use_picks(path) == 2
    assert _pick("conv2d", "k1") == "triton_b"
    assert on_gpu == []
    # a key the file does not have, or a pick that is not a candidate here, is searched
    assert _pick("conv2d", "k2") == "cudnn"
    assert _pick("pool_conv2d", "k1") == "cudnn"
    assert on_gpu == ["k2", "k1"]


def test_fuse_takes_a_picks_file(tmp_path, on_gpu):
    path = _write(tmp_path / "p.json", {"conv2d": {"k1": "triton_b"}})
    cnnfuse.fuse(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), picks=path)
    assert _pick("conv2d", "k1") == "triton_b" and on_gpu == []
    with pytest.raises(ValueError, match="cannot be read"):
        cnnfuse.fuse(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), picks=tmp_path / "missing")


@pytest.mark.parametrize("field,value", [
    ("device", "NVIDIA H100 80GB HBM3"), ("capability", "8.0"), ("cnnfuse", "0.0.1"),
    ("torch", "2.11.0+cu130"), ("triton", "3.8.0")])
def test_a_picks_file_from_elsewhere_is_ignored_with_a_log_line(tmp_path, on_gpu, caplog,
                                                                field, value):
    path = _write(tmp_path / "p.json", {"conv2d": {"k1": "triton_b"}}, **{field: value})
    with caplog.at_level(logging.WARNING, logger="cnnfuse"):
        assert cnnfuse.use_picks(path) == 0
    assert "made elsewhere" in caplog.text and field in caplog.text and value in caplog.text
    assert _pick("conv2d", "k1") == "cudnn" and on_gpu == ["k1"]


def test_a_pick_made_for_another_dtype_is_not_used(tmp_path, on_gpu):
    w = torch.empty(8, 4, 3, 3)
    args = ((1, 1), [1, 1, 1, 1], (1, 1), 1, "relu", None, None)
    key16 = _key(torch.empty(2, 4, 9, 9, dtype=torch.float16), w.half(), None, *args)
    key32 = _key(torch.empty(2, 4, 9, 9), w, None, *args)
    cnnfuse.use_picks(_write(tmp_path / "p.json", {"conv2d": {key16: "triton_a"}}))
    assert _pick("conv2d", key16) == "triton_a"
    assert _pick("conv2d", key32) == "cudnn" and on_gpu == [key32]


def test_cnnfuse_picks_environment_variable(tmp_path, on_gpu, monkeypatch, caplog):
    monkeypatch.setenv("CNNFUSE_PICKS", str(_write(tmp_path / "p.json",
                                                   {"conv2d": {"k1": "triton_a"}})))
    assert _pick("conv2d", "k1") == "triton_a"
    # a broken file named by the variable is reported and ignored, never fatal to the op
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setenv("CNNFUSE_PICKS", str(tmp_path / "bad.json"))
    monkeypatch.setattr(autotune, "preset", None)
    with caplog.at_level(logging.WARNING, logger="cnnfuse"):
        assert _pick("conv2d", "k1") == "cudnn"
    assert "not JSON" in caplog.text


def test_bad_arguments(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    with pytest.raises(TypeError, match="fused"):
        cnnfuse.tune(lambda x: x, torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="example_inputs"):
        cnnfuse.tune(model, [torch.zeros(1, 3, 4, 4), 3])
    with pytest.raises(ValueError, match="batch_sizes"):
        cnnfuse.tune(model, torch.zeros(1, 3, 4, 4), batch_sizes=[2, 0])
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a cnnfuse picks file"):
        cnnfuse.use_picks(tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot be read"):
        cnnfuse.use_picks(tmp_path / "missing.json")


@pytest.mark.cuda
def test_tune_then_a_cuda_graph_captures_the_tuned_picks():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32)).eval()
    fused = cnnfuse.fuse(model, dtype=torch.float16).cuda()
    x = torch.randn(8, 16, 20, 20, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    report = cnnfuse.tune(fused, x)
    assert len(report.picks.get("conv2d", {})) == 2, str(report)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        eager = fused(x)
        torch.cuda.synchronize()
        autotune.recording = {}  # from here: what the capture asks the autotuner
        with torch.cuda.graph(graph):
            captured = fused(x)
        asked = autotune.recording
        autotune.recording = None
    graph.replay()
    torch.cuda.synchronize()
    # the capture asked for, and got, the tuned pick of each conv
    assert asked.get("conv2d") == report.picks["conv2d"], (asked, report.picks)
    assert torch.equal(captured, eager)
    x.copy_(torch.randn_like(x))  # a replay reads the captured input buffer anew
    graph.replay()
    with torch.no_grad():
        assert torch.equal(captured, fused(x)) and not torch.equal(captured, eager)
