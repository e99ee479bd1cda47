"""The first install: which archs the build compiles and why (setup.arch_list), and the
Makefile's filter that turns pip's verbose build output into one line per compile step."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("cnnfuse_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines only: setup() runs under __main__
    return module


def _torch(caps):
    names = {(9, 0): "NVIDIA H100", (8, 6): "NVIDIA RTX A6000"}
    cuda = SimpleNamespace(is_available=lambda: bool(caps), device_count=lambda: len(caps),
                           get_device_capability=lambda i: caps[i],
                           get_device_name=lambda i: names[caps[i]])
    return SimpleNamespace(cuda=cuda)


def test_no_gpu_builds_sm90_with_ptx_only(setup_py):
    archs, why = setup_py.arch_list(_torch([]), environ={})
    assert archs == "9.0+PTX"
    assert "no GPU visible" in why and "TORCH_CUDA_ARCH_LIST" in why


def test_visible_gpus_build_their_archs(setup_py):
    archs, why = setup_py.arch_list(_torch([(9, 0), (8, 6), (9, 0)]), environ={})
    assert archs == "8.6;9.0+PTX"
    assert "NVIDIA RTX A6000 (sm_86)" in why and "NVIDIA H100 (sm_90)" in why


def test_arch_list_given_wins(setup_py):
    archs, why = setup_py.arch_list(_torch([(9, 0)]), environ={"TORCH_CUDA_ARCH_LIST": "8.0"})
    assert (archs, why) == ("8.0", "from TORCH_CUDA_ARCH_LIST")


def test_extension_says_its_archs_when_built_not_when_read(setup_py, monkeypatch, capsys):
    import torch
    from torch.utils import cpp_extension
    for name in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CNNFUSE_SKIP_CUDA_BUILD"):
        monkeypatch.delenv(name, raising=False)  # restored afterwards: _extension sets them
    monkeypatch.setattr(setup_py, "_NOTES", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    setup_py._extension()
    assert capsys.readouterr().out == ""  # pip reads setup.py twice: say it in build_ext
    notes = setup_py._NOTES
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        assert "for archs 9.0+PTX: no GPU visible" in notes[0]
        assert __import__("os").environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"
    else:
        assert "building _C without CUDA" in notes[0]


def _filter_source() -> str:
    make = (ROOT / "Makefile").read_text()
    return re.search(r"^define BUILD_FILTER\n(.*?)^endef", make, re.S | re.M)[1]


PIP_LOG = """\
  Running command Building editable for cnnfuse (pyproject.toml)
  running build_ext
  cnnfuse: building _C with CUDA 13.0 for archs 9.0+PTX: no GPU visible
  [1/3] c++ -MMD -MF /tmp/b/csrc/bias_act/bias_act_cpu.o.d -O3 -c /w/csrc/bias_act/bias_act_cpu.cpp -o /tmp/b/csrc/bias_act/bias_act_cpu.o -fPIC
  [2/3] /usr/local/cuda/bin/nvcc -MD -c -c /w/csrc/depthwise_conv2d/depthwise_conv2d.cu -o /tmp/b/d.o -gencode=arch=compute_90,code=sm_90
  some nvcc chatter
  [3/3] c++ -c /w/csrc/module.cpp -o /tmp/b/module.o
  g++ -O3 -Wall -shared /tmp/b/bias_act_cpu.o -o build/cnnfuse/_C.so
  Created wheel for cnnfuse: filename=cnnfuse-0.4.0-0.editable.whl
  /w/csrc/x.cu(3): error: identifier "foo" is undefined
"""


def test_build_filter_shows_each_step():
    out = subprocess.run([sys.executable, "-c", _filter_source()], input=PIP_LOG,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "cnnfuse: building _C with CUDA 13.0 for archs 9.0+PTX: no GPU visible"
    steps = [re.sub(r"^\s*\[\s*\d+ s\] ", "", line) for line in out[1:5]]
    assert steps == ["compiled 1/3: bias_act/bias_act_cpu.cpp",
                     "compiled 2/3: depthwise_conv2d/depthwise_conv2d.cu",
                     "compiled 3/3: module.cpp", "link cnnfuse._C"]
    assert out[5].endswith('error: identifier "foo" is undefined') and len(out) == 6
