"""The report command on small synthetic result files: the numbers below are chosen by the test
to check the report's arithmetic and layout, and say nothing about real performance."""
import json
import math
import sys

import pytest

from cnnfuse.bench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54", "torch": "2.5.1",
           "triton": "3.1.0", "cudnn": 90100, "cnnfuse": "0.2.0"}
LAYER = "test_conv_bn_relu[{}-128-resnet50-64x56x56-64-1x1s1]"


def _bench(model, provider, ms, peak=None, batch=256, **extra):
    return {"name": f"test_model[{model}-{batch}-{provider}]",
            "params": {"name": model, "batch": batch, "provider": provider},
            "stats": {"median": ms / 1e3, "mean": ms / 1e3},
            "extra_info": {"model": model, "batch": batch, "dtype": "fp16", "provider": provider,
                           "compute_floor_ms": None, "memory_floor_ms": None,
                           "max_rel_error": None, "peak_mem_mb": peak, **extra}}


def _layer(provider, ms, frac):
    return {"name": LAYER.format(provider), "params": {"provider": provider, "batch": 128},
            "stats": {"median": ms / 1e3},
            "extra_info": {"floor_ms": ms * frac, "fraction_of_floor": frac, "tflops": 1.0}}


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    bench = _write(d / "bench_models.json", {
        "machine_info": MACHINE, "datetime": "2026-01-02T03:04:05.000001+00:00",
        "benchmarks": [
            _bench("resnet50", "cudnn", 10.0, peak=1000),
            _bench("resnet50", "inductor", 5.0, peak=900),
            _bench("resnet50", "cnnfuse", 4.0, peak=1200, compute_floor_ms=2.0,
                   memory_floor_ms=1.0, max_rel_error=3.1e-4),
            _bench("googlenet", "cudnn", 8.0, peak=500),
            _bench("googlenet", "inductor", 2.4, peak=450),
            _bench("googlenet", "cnnfuse", 4.0, peak=400),  # replaced by main.json's 1.6 ms
            _layer("cudnn", 0.2, 0.25), _layer("cnnfuse", 0.1, 0.5)]})
    rec = dict(dtype="fp16", compute_floor_ms=None, memory_floor_ms=None, max_rel_error=None)
    main = _write(d / "main.json", {
        "kind": "cnnfuse.bench", "machine": {**MACHINE, "date": "2026-01-03T10:00:00"},
        "records": [
            {**rec, "model": "googlenet", "batch": 256, "provider": "cnnfuse", "ms": 1.6,
             "peak_mem_mb": 400},
            {**rec, "model": "resnet50", "batch": 1, "provider": "cudnn", "ms": 2.0,
             "peak_mem_mb": None},
            {**rec, "model": "resnet50", "batch": 1, "provider": "cnnfuse", "ms": 2.5,
             "peak_mem_mb": None}]})
    op = dict(calls=1, share=0.25)
    profile = _write(d / "profile.json", {
        "kind": "cnnfuse.profile", "machine": MACHINE, "model": "timm/inception_v4",
        "batch": 64, "dtype": "fp16", "device": "cuda", "total_ms": 4.0, "ops": [
            {**op, "name": "conv1", "what": "conv", "backend": "triton", "ms": 1.0,
             "ms_per_call": 1.0, "flops": 2e11, "bytes": 1e9, "floor_ms": 0.3},
            {**op, "name": "conv2", "what": "conv", "backend": "cudnn_fused", "ms": 1.0,
             "ms_per_call": 1.0, "flops": 5e10, "bytes": 1e8, "floor_ms": 0.1},
            {**op, "name": "dw", "what": "depthwise", "backend": "cuda", "ms": 1.0,
             "ms_per_call": 1.0, "flops": 1e9, "bytes": 1e9, "floor_ms": 0.3},
            {**op, "name": "cat", "what": "copy", "backend": "torch", "ms": 1.0,
             "ms_per_call": 1.0, "flops": 0.0, "bytes": 1e9, "floor_ms": 0.3}]})
    return bench, main, profile


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    bench, main, profile = inputs
    out = tmp_path_factory.mktemp("report")
    assert report.main([str(bench), str(main), "--profile", str(profile), "--out", str(out)]) == 0
    return out, (out / "report.md").read_text()


def _table(md, heading):
    """The markdown table under `heading` as a list of {column: cell}."""
    section = md.split(f"## {heading}\n", 1)[1].lstrip("\n")
    lines = section[:section.find("\n\n")].splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(rows[0], r)) for r in rows[2:]]


def _row(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_models_table_arithmetic(built):
    rows = _table(built[1], "Models")
    ours = _row(rows, model="`resnet50`", batch="256", provider="cnnfuse")
    assert ours["× cudnn"] == "2.50×" and ours["× inductor"] == "1.25×"
    assert ours["img/s"] == "64,000"
    assert ours["of compute floor"] == "0.50" and ours["of memory floor"] == "0.25"
    assert ours["max rel err"] == "3.1e-04"
    assert _row(rows, model="`resnet50`", batch="256", provider="cudnn")["× cudnn"] == "1.00×"
    assert "× cudnn_folded" not in rows[0]  # no cudnn_folded timings anywhere
    assert _row(rows, model="`resnet50`", batch="1", provider="cnnfuse")["× inductor"] == "–"


def test_fastest_bold_and_order(built):
    rows = _table(built[1], "Models")
    order = [(r["model"], r["batch"], r["provider"]) for r in rows]
    assert order == [("`resnet50`", "1", "cudnn"), ("`resnet50`", "1", "cnnfuse"),
                     ("`resnet50`", "256", "cudnn"), ("`resnet50`", "256", "inductor"),
                     ("`resnet50`", "256", "cnnfuse"), ("`googlenet`", "256", "cudnn"),
                     ("`googlenet`", "256", "inductor"), ("`googlenet`", "256", "cnnfuse")]
    bold = {(r["model"], r["batch"]): r["provider"] for r in rows if r["ms"].startswith("**")}
    assert bold == {("`resnet50`", "1"): "cudnn", ("`resnet50`", "256"): "cnnfuse",
                    ("`googlenet`", "256"): "cnnfuse"}
    assert _row(rows, model="`resnet50`", batch="256", provider="cnnfuse")["ms"] == "**4.000**"


def test_later_file_wins(inputs, built):
    bench, main, _ = inputs
    ours = _row(_table(built[1], "Models"), model="`googlenet`", provider="cnnfuse")
    assert ours["ms"] == "**1.600**" and ours["× cudnn"] == "5.00×"
    ms = {r.ms for r in report.load([main, bench]).models
          if (r.model, r.provider) == ("googlenet", "cnnfuse")}
    assert ms == {4.0}


def test_memory_flag(built):
    rows = _table(built[1], "Models")
    assert _row(rows, model="`resnet50`", batch="256", provider="cnnfuse")["peak MB"] == "1200 ⚠"
    assert _row(rows, model="`resnet50`", batch="256", provider="inductor")["peak MB"] == "900"
    assert _row(rows, model="`googlenet`", provider="cnnfuse")["peak MB"] == "400"


def test_summary_geomean(built):
    rows = _table(built[1], "Summary")
    big = _row(rows, batch="256")
    assert big["× cudnn"] == f"{math.sqrt(10 / 4 * 8 / 1.6):.2f}×" == "3.54×"
    assert big["× inductor"] == f"{math.sqrt(5 / 4 * 2.4 / 1.6):.2f}×" == "1.37×"
    assert big["cnnfuse"] == "fastest on 2 of 2 models"
    one = _row(rows, batch="1")
    assert (one["× cudnn"], one["× inductor"], one["cnnfuse"]) == (
        "0.80×", "–", "fastest on 0 of 1 models")


def test_layer_table(built):
    (row,) = _table(built[1], "Per layer")
    assert row["layer"] == "`test_conv_bn_relu[128-resnet50-64x56x56-64-1x1s1]`"
    assert (row["cudnn ms"], row["cnnfuse ms"]) == ("0.200", "**0.100**")
    assert (row["cudnn of floor"], row["cnnfuse of floor"]) == ("0.25", "0.50")
    assert row["cnnfuse × cudnn"] == "2.00×"


def test_header_and_stdout(inputs, tmp_path, capsys):
    bench, main, _ = inputs
    report.main([str(bench), str(main), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.strip() == (tmp_path / "report.md").read_text().strip()
    header = out.splitlines()[2]
    for part in ("NVIDIA H100 80GB HBM3", "550.54", "2.5.1", "3.1.0", "cuDNN 9.1.0", "0.2.0",
                 "2026-01-02 03:04 to 2026-01-03 10:00"):
        assert part in header


def test_pngs(built):
    out, md = built
    for name in ("speedup.png", "roofline_timm_inception_v4_b64_fp16.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({name})" in md


def test_speedup_without_cudnn(tmp_path):
    recs = [report.ModelRecord("m", 8, "bf16", "inductor", 3.0),
            report.ModelRecord("m", 8, "bf16", "cnnfuse", 2.0)]
    assert report.plot_speedup(recs, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.main([str(inputs[0]), "--out", str(tmp_path)]) == 0
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("content", ['{"foo": 1}', "not json", "[1, 2]",
                                     '{"kind": "cnnfuse.bench", "records": [{"model": "m"}]}'])
def test_bad_file(tmp_path, content):
    bad = tmp_path / "odd_name.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        report.main([str(bad), "--out", str(tmp_path / "r")])
    assert str(bad) in str(e.value.code)


def test_no_records(tmp_path):
    empty = _write(tmp_path / "empty.json", {"machine_info": {}, "benchmarks": []})
    with pytest.raises(SystemExit, match="no benchmark records in .*empty.json"):
        report.main([str(empty), "--out", str(tmp_path / "r")])


def test_profile_flag_rejects_other_kinds(inputs, tmp_path):
    with pytest.raises(SystemExit, match="main.json"):
        report.load([], [inputs[1]])


def test_ceilings_named_on_other_gpus(inputs, tmp_path):
    doc = json.loads(inputs[2].read_text())
    other = _write(tmp_path / "a100.json", {**doc, "machine": {**MACHINE, "gpu": "NVIDIA A100"}})
    md = report.render_markdown(report.load([other]))
    assert "profiled on NVIDIA A100: the ceilings drawn are H100's" in md
    assert "## Models" not in md  # a profile alone makes a roofline-only report


def test_device_time_is_preferred_to_wall_clock(tmp_path):
    """bench/ records the CUDA-event median as device_ms; the wall-clock median also counts
    the launch and synchronisation."""
    doc = {"machine_info": MACHINE, "datetime": "2026-01-01T00:00:00",
           "benchmarks": [_bench("resnet50", "cudnn", 10.0, device_ms=8.0),
                          _bench("resnet50", "cnnfuse", 5.0)]}
    loaded = report.load([_write(tmp_path / "b.json", doc)])
    assert {r.provider: r.ms for r in loaded.models} == {"cudnn": 8.0, "cnnfuse": 5.0}
