"""cnnfuse.save / cnnfuse.load: a fused model loads in a fresh process (no original model code)
to the same outputs bit for bit; layouts, dtypes and tied tensors survive; a truncated,
damaged or edited file is rejected with a clear ValueError and runs nothing it names.

CNNFUSE_TEST_ALL_ZOO=1 checks every zoo model instead of one per family (minutes; vgg16 alone
writes half a gigabyte)."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import cnnfuse
from cnnfuse.bench import zoo

from .util import randomize_batchnorm

# One per family and fusion kind: Inception concat buffers and pool projections, dense blocks,
# channel shuffle stores, depthwise + SE + hardswish, residual epilogues with SE tails. Every
# zoo model takes minutes (fusing alone is ~90 s of CPU time): CNNFUSE_TEST_ALL_ZOO=1.
FAMILIES = ("googlenet", "densenet121", "shufflenet_v2_x1_0", "mobilenet_v3_large",
            "timm/seresnet50")
MODELS = zoo.ZOO if os.environ.get("CNNFUSE_TEST_ALL_ZOO") == "1" else FAMILIES

LOAD_AND_RUN = """
import sys, torch, cnnfuse
directory, names = sys.argv[1], sys.argv[2:]
for name in names:
    model = cnnfuse.load(f"{directory}/{name}.cnnfuse")
    x = torch.load(f"{directory}/{name}.x.pt", weights_only=True)
    with torch.no_grad():
        torch.save(model(x), f"{directory}/{name}.got.pt")
    assert not any(type(m).__module__.startswith(("torchvision", "timm")) for m in model.modules())
"""


def _small_input(name: str) -> torch.Tensor:
    size = 299 if zoo.input_size(name) == 299 else 96  # the Inception stems need 299
    return torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)


def test_save_load_in_a_fresh_process_gives_identical_outputs(tmp_path):
    files = {}
    for name in MODELS:
        file = name.replace("/", "_")
        fused = cnnfuse.fuse(zoo.build(name))
        x = _small_input(name)
        with torch.no_grad():
            files[file] = fused(x)
        cnnfuse.save(fused, tmp_path / f"{file}.cnnfuse")
        torch.save(x, tmp_path / f"{file}.x.pt")
    subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path), *files], check=True,
                   timeout=600)
    for file, want in files.items():
        got = torch.load(tmp_path / f"{file}.got.pt", weights_only=True)
        assert torch.equal(got, want), f"{file}: the loaded model computes something else"


def _little(dtype=torch.float32) -> nn.Module:
    """Depthwise + 1x1 (separable), a dense conv, a tied linear pair, in `dtype`."""
    class Little(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU6())
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 16, 1)
            self.fc = nn.Linear(16, 16)
            self.head = nn.Linear(16, 16)
            self.head.weight = self.fc.weight  # tied

        def forward(self, x):
            y = self.pw(self.dw(self.stem(x))) + 0.5
            return self.head(self.fc(y.mean((2, 3)))).softmax(-1)
    return cnnfuse.fuse(randomize_batchnorm(Little()).eval(), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layouts_dtypes_and_tied_tensors_survive(tmp_path, dtype):
    fused = _little(dtype)
    cnnfuse.save(fused, tmp_path / "m.cnnfuse")
    loaded = cnnfuse.load(tmp_path / "m.cnnfuse", map_location="cpu")
    want, got = fused.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].stride() == want[k].stride(), k
        assert torch.equal(got[k], want[k]), k
    assert loaded.head.weight is loaded.fc.weight
    assert not loaded.training
    x = torch.randn(3, 3, 11, 13, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))


def _members(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _repack(path, members: dict, *, fix_digests: bool) -> None:
    if fix_digests:
        import hashlib
        manifest = json.loads(members["manifest.json"])
        for name, data in members.items():
            if name != "manifest.json":
                manifest["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                             "size": len(data)}
        members = {**members, "manifest.json": json.dumps(manifest).encode()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.cnnfuse"
    cnnfuse.save(_little(), path)
    return path


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1], ids=["empty", "10B", "half", "all-but-1B"])
def test_a_truncated_file_is_rejected(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep if isinstance(keep, int) and keep >= 0 else
                           len(data) - 1 if keep == -1 else int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or damaged|not a cnnfuse model"):
        cnnfuse.load(saved)


def test_a_damaged_byte_is_rejected(saved):
    data = bytearray(saved.read_bytes())
    start = data.find(b"tensors.bin") + 200  # inside the stored weights
    data[start] ^= 0x40
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or damaged|SHA-256"):
        cnnfuse.load(saved)


def test_an_edited_member_is_rejected(saved):
    members = _members(saved)
    weights = bytearray(members["tensors.bin"])
    weights[4] ^= 0x01  # one weight changes in its last bit
    _repack(saved, {**members, "tensors.bin": bytes(weights)}, fix_digests=False)
    with pytest.raises(ValueError, match="tensors.bin does not match the SHA-256"):
        cnnfuse.load(saved)


def _edit_graph(members: dict, edit) -> dict:
    model = json.loads(members["model.json"])
    edit(model["root"])
    return {**members, "model.json": json.dumps(model).encode()}


def _first_call(root, op="call_function"):
    return next(n for n in root["graph"] if n["op"] == op)


@pytest.mark.parametrize("edit,message", [
    (lambda r: _first_call(r).update(target={"function": "os:system"}), "may make"),
    (lambda r: _first_call(r).update(target={"function": "torch:load"}), "may make"),
    (lambda r: _first_call(r).update(target={"function": "builtins:eval"}), "may make"),
    (lambda r: _first_call(r).update(target={"function": "operator:attrgetter"}), "may make"),
    (lambda r: _first_call(r).update(target={"function": "operator:call"}), "may make"),
    (lambda r: _first_call(r).update(target={"function": "cnnfuse.tune:save_picks"}),
     "may make"),
    (lambda r: _first_call(r).update(
        target={"function": "torch.nn.functional:handle_torch_function"}), "may make"),
    (lambda r: _first_call(r).update(target={"op": "os::system", "overload": None}), "may make"),
    (lambda r: _first_call(r).update(name="x; __import__('os').system('touch PWNED')"),
     "not an identifier"),
    (lambda r: _first_call(r, "call_module").update(target="stem.__class__"), "attribute path"),
    (lambda r: r["modules"]["stem"].update(type="subprocess.Popen"), "may hold"),
    (lambda r: r["modules"]["stem"].update(type="torch.nn.modules.module._addindent"), "may hold"),
    (lambda r: r["modules"]["fc"]["attributes"].update(__class__="x"), "may not be set"),
    (lambda r: r["modules"]["fc"]["attributes"].update(in_features={"$pickle": "gASV"}),
     "unreadable value"),
], ids=["os.system", "torch.load", "eval", "attrgetter", "operator.call", "cnnfuse-writer",
        "handle_torch_function", "op-namespace", "node-name", "module-path",
        "module-type", "private-type", "dunder-attribute", "unknown-value"])
def test_an_edited_file_with_fixed_digests_runs_nothing_it_names(saved, tmp_path, monkeypatch,
                                                                 edit, message):
    monkeypatch.chdir(tmp_path)
    _repack(saved, _edit_graph(_members(saved), edit), fix_digests=True)
    with pytest.raises(ValueError, match=message):
        cnnfuse.load(saved)
    assert not (tmp_path / "PWNED").exists()


def test_a_model_saved_on_a_gpu_loads_on_the_cpu_with_map_location(saved):
    members = _members(saved)
    model = json.loads(members["model.json"])
    for spec in model["tensors"]:
        spec["device"] = "cuda:0"  # as a GPU-saved file says
    _repack(saved, {**members, "model.json": json.dumps(model).encode()}, fix_digests=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="map_location='cpu'"):
            cnnfuse.load(saved)
    loaded = cnnfuse.load(saved, map_location="cpu")
    assert not any(p.is_cuda for p in loaded.parameters())
    with pytest.raises(ValueError, match="map_location"):
        cnnfuse.load(saved, map_location="a GPU")


def test_other_files_are_rejected(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "state.pt")  # a zip too, not ours
    with pytest.raises(ValueError, match="member is missing"):
        cnnfuse.load(tmp_path / "state.pt")
    (tmp_path / "text").write_text("hello")
    with pytest.raises(ValueError, match="not a cnnfuse model file"):
        cnnfuse.load(tmp_path / "text")
    with pytest.raises(FileNotFoundError, match="no such file"):
        cnnfuse.load(tmp_path / "missing")


def test_what_a_file_cannot_carry_is_refused_at_save(tmp_path):
    class DataDependent(nn.Module):  # FX cannot trace it: fuse keeps it as a module tree
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(ValueError, match="DataDependent.*cnnfuse.export"):
        cnnfuse.save(cnnfuse.fuse(DataDependent().eval()), tmp_path / "m.cnnfuse")
    fused = _little()
    fused.fc.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="module fc has hooks"):
        cnnfuse.save(fused, tmp_path / "m.cnnfuse")
    with pytest.raises(TypeError, match="fused"):
        cnnfuse.save({"not": "a module"}, tmp_path / "m.cnnfuse")
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_picks_travel_with_the_model(tmp_path, monkeypatch):
    from cnnfuse import autotune
    monkeypatch.setattr(autotune, "preset", {"conv2d": {"some key": "triton_x"}})
    cnnfuse.save(_little(), tmp_path / "m.cnnfuse")
    monkeypatch.setattr(autotune, "preset", {})
    cnnfuse.load(tmp_path / "m.cnnfuse")
    assert autotune.preset == {"conv2d": {"some key": "triton_x"}}
    picks = json.loads(_members(tmp_path / "m.cnnfuse")["picks.json"])
    assert picks["environment"]["device"] == "cpu"


@pytest.mark.cuda
def test_save_load_on_the_gpu_is_bit_identical(tmp_path):
    fused = cnnfuse.fuse(zoo.build("mobilenet_v2"), dtype=torch.float16).cuda()
    x = torch.randn(4, 3, 96, 96, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        want = fused(x)
        cnnfuse.save(fused, tmp_path / "m.cnnfuse")
        loaded = cnnfuse.load(tmp_path / "m.cnnfuse")
        assert next(loaded.parameters()).is_cuda
        assert torch.equal(loaded(x), want)
        on_cpu = cnnfuse.load(tmp_path / "m.cnnfuse", map_location="cpu")
        assert not any(p.is_cuda for p in on_cpu.parameters())


def test_a_sequential_model_keeps_its_layout_restore(tmp_path):
    """fuse returns a Sequential with a forward hook that gives NCHW callers NCHW outputs;
    the hook (one of cnnfuse's functions) is saved and restored."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    fused = cnnfuse.fuse(randomize_batchnorm(model).eval())
    cnnfuse.save(fused, tmp_path / "m.cnnfuse")
    loaded = cnnfuse.load(tmp_path / "m.cnnfuse")
    assert isinstance(loaded, nn.Sequential) and len(loaded._forward_hooks) == len(
        fused._forward_hooks)
    for x in (torch.randn(2, 3, 7, 9), _small_input("resnet50")[:, :, :9, :7]):
        with torch.no_grad():
            want, got = fused(x), loaded(x)
        assert torch.equal(got, want) and got.stride() == want.stride()
