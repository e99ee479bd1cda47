"""The main job without a GPU: it checks the fused logits on the CPU path and says that
timing needs CUDA."""
import json

import pytest

from cnnfuse.bench.__main__ import main


def test_cpu_run_checks_and_writes_json(tmp_path, capsys):
    assert main(["--model", "squeezenet1_1", "--batch", "64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "26/26 conv sites fused" in out and "(ok)" in out
    assert "No CUDA GPU" in out and "GPU timing needs CUDA" in out
    doc = json.loads((tmp_path / "squeezenet1_1_b2_fp32.json").read_text())
    assert doc["kind"] == "cnnfuse.bench" and doc["records"] == []
    assert doc["max_rel_error"] < 2e-5 and doc["machine"]["torch"]


def test_unknown_provider_is_named():
    with pytest.raises(SystemExit):
        main(["--providers", "cudnn,tensorrt"])
