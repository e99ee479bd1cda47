"""The main job without a GPU: it checks the fused logits on the CPU path, says which batch it
used and why, and that timing needs CUDA; --help shows every default; no progress-bar control
codes reach a log."""
import argparse
import json

import pytest

from cnnfuse.bench import __main__ as job
from cnnfuse.bench.__main__ import main


def test_cpu_run_checks_and_writes_json(tmp_path, capsys):
    assert main(["--model", "squeezenet1_1", "--batch", "64", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "26/26 conv sites fused" in out and "(ok)" in out
    assert "No CUDA GPU" in out and "GPU timing needs CUDA" in out
    assert "batch 2, not the 64 asked: no CUDA GPU" in out and "--cpu-batch" in out
    assert "random weights, randomised BatchNorm statistics" in out
    doc = json.loads((tmp_path / "squeezenet1_1_b2_fp32.json").read_text())
    assert doc["kind"] == "cnnfuse.bench" and doc["records"] == []
    assert doc["max_rel_error"] < 2e-5 and doc["machine"]["torch"]
    assert doc["batch"] == 2 and doc["batch_asked"] == 64 and "images" not in doc
    # stderr is not a terminal here: plain step lines, no bar, no cursor control
    assert "cnnfuse-bench: fusing" in captured.err
    assert "\r" not in captured.err and "\x1b" not in captured.err
    assert "\r" not in out and "\x1b" not in out


@pytest.mark.parametrize("gpu, asked, cpu, used, note", [
    (False, 64, 2, 2, "batch 2, not the 64 asked"),
    (False, 3, 3, 3, ""),
    (False, 1, 2, 2, "batch 2, not the 1 asked"),
    (True, 64, 2, 64, ""),
], ids=["cpu-smaller", "cpu-same", "cpu-larger", "gpu-as-asked"])
def test_batch_used_is_the_one_asked_or_says_why(gpu, asked, cpu, used, note):
    args = argparse.Namespace(batch=asked, cpu_batch=cpu)
    got, why = job._batch(args, gpu)
    assert got == used
    assert (note in why) if note else why == ""


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    options = [o for o in text.split() if o.startswith("--") and o != "--help"]
    blocks = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif stripped and blocks:
            blocks[current] += " " + stripped
    assert {"--model", "--checkpoint", "--images", "--labels", "--size", "--mean", "--std",
            "--batch", "--cpu-batch", "--trust-pickle"} <= set(options)
    missing = [o for o, block in blocks.items() if "(default:" not in block]
    assert not missing, f"no default shown for {missing}"
    assert "(default: googlenet)" in blocks["--model"] and "(default: 64)" in blocks["--batch"]


def test_unknown_provider_is_named():
    with pytest.raises(SystemExit):
        main(["--providers", "cudnn,tensorrt"])


@pytest.mark.parametrize("argv, says", [
    (["--model", "no_such_net_xyz"], "--model 'no_such_net_xyz'"),
    (["--model", "timm:resnet26x"], "timm has no model 'resnet26x'"),
    (["--checkpoint", "/nonexistent/ck.pt"], "--checkpoint '/nonexistent/ck.pt': no such file"),
    (["--images", "/nonexistent/dir"], "--images '/nonexistent/dir': not a folder"),
    (["--model", "squeezenet1_1", "--size", "0"], "--size must be a positive"),
    (["--model", "squeezenet1_1", "--std", "0.2", "0", "0.2"], "--std takes three numbers"),
], ids=["model", "timm-model", "checkpoint", "images", "size", "std"])
def test_bad_options_are_named(argv, says, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert says in capsys.readouterr().err


def test_batch_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--cpu-batch", "0"])
    assert "--cpu-batch must be at least 1" in capsys.readouterr().err
