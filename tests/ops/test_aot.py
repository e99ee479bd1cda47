"""The Triton kernels compiled ahead of time for Hopper (sm_90) on a machine without a GPU:
the conv kernel, specialised as a launch of each shape specialises it (compile_for_shape), read
by the static report's analysis (cnnfuse.bench.static): it must build at the tile shapes the
autotuner offers for every load-stage and epilogue variant, use the warpgroup tensor cores
(HGMMA in the SASS), pipeline the whole reduction as one loop, and copy the activation 16 bytes
at a time where channels allow. Compiling needs TRITON_INTERPRET unset, so it runs in a
subprocess."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..util import needs_cuobjdump

CASES = [  # (config in CONFIGS / GROUPED_CONFIGS or a tile, dtype, kernel, grouped, prologue)
    ("CONFIGS[0]", "float16", (3, 3), False, ""),
    ("CONFIGS[3]", "bfloat16", (1, 1), False, "scale"),
    ("CONFIGS[4]", "float16", (1, 1), False, "affine"),
    ("CONFIGS[4]", "float16", (1, 1), False, "depthwise"),
    ("CONFIGS[0]", "float16", (1, 1), False, "pool"),
    ("CONFIGS[4]", "float16", (1, 1), False, "max_pool_in"),
    ("CONFIGS[4]", "bfloat16", (1, 1), False, "avg_valid_pool_in"),
    ("Conv2dConfig(64, 64, 32, 4, 3)", "float16", (1, 7), False, ""),
    ("CONFIGS[5]", "float32", (7, 7), False, ""),
    ("Conv2dConfig(128, 64, 32, 4, 4)", "float16", (7, 7), False, "stem"),
    ("Conv2dConfig(128, 128, 64, 8, 4, split_k=3)", "float16", (3, 3), False, ""),
    ("GROUPED_CONFIGS[0]", "float16", (3, 3), True, ""),
    ("GROUPED_CONFIGS[2]", "bfloat16", (3, 3), True, ""),
]

# Each case compiled as the runtime specialises it (compile_for_shape) at a shape of its kind.
SCRIPT = """
import json, sys, torch
from cnnfuse.kernels.conv2d import (CONFIGS, GROUPED_CONFIGS, Conv2dConfig, Conv2dProblem,
                                    Window, compile_for_shape)
config, dtype, kernel, out = eval(sys.argv[1]), getattr(torch, sys.argv[2]), eval(sys.argv[3]), sys.argv[4]
grouped, prologue = sys.argv[5] == "True", sys.argv[6]
pad = (kernel[1] // 2, kernel[1] // 2, kernel[0] // 2, kernel[0] // 2)
window = None
if prologue == "depthwise":
    window = Window("dw", (3, 3), (1, 1), (1, 1, 1, 1), bias=True, activation=2,
                    weight_strides=(9, 3, 1))
elif prologue.endswith("_pool_in"):
    window = Window(prologue[:-8], (3, 3), (1, 1), (1, 1, 1, 1))
problem = Conv2dProblem(
    8, 3 if prologue == "stem" else 128, 28, 28, 64 if grouped else 256, *kernel,
    stride=(2, 2) if prologue == "stem" else (1, 1), padding=pad, groups=32 if grouped else 1,
    residual=True, activation=3, input_scale=dtype if prologue == "scale" else None,
    input_affine=torch.float32 if prologue == "affine" else None,
    input_activation=1 if prologue == "affine" else 0, pooled=prologue == "pool",
    window=window)
compiled = compile_for_shape(problem, config, dtype)
open(out + ".ptx", "w").write(compiled.asm["ptx"])
from cnnfuse.bench import static
name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
open(out + ".json", "w").write(json.dumps(static._analyse_conv(problem, config, name)))
"""


@needs_cuobjdump
@pytest.mark.parametrize("config, dtype, kernel, grouped, prologue", CASES,
                         ids=[f"{c}-{d}-{k[0]}x{k[1]}{'-grouped' * g}{'-' * bool(p)}{p}"
                              for c, d, k, g, p in CASES])
def test_conv2d_compiles_for_sm90_with_tensor_cores(config, dtype, kernel, grouped, prologue,
                                                    tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "conv2d"
    subprocess.run([sys.executable, "-c", SCRIPT, config, dtype, repr(kernel), str(out),
                    str(grouped), prologue],
                   env=env, check=True, capture_output=True, text=True)
    ptx = Path(f"{out}.ptx").read_text()
    row = json.loads(Path(f"{out}.json").read_text())
    assert ".target sm_90a" in ptx
    assert row["mma"] == "HGMMA", "no Hopper warpgroup MMA (HGMMA) in the SASS"
    assert row["whole_reduction_pipelined"], "the reduction is not one pipelined loop"
    if prologue == "pool":
        assert re.search(r"(red|atom)\.global\.gpu\.relaxed\.add\.f32", ptx), "no pool atomics"
    if not grouped:  # channels (or the stem's padded ones) a multiple of 8: 16-byte copies of x
        assert row["load_bytes"] == 16, f"activation loaded {row['load_bytes']} bytes at a time"
    assert row["store_bytes"] >= 8


TMA_CASES = [  # (config, dtype, kernel, groups, variant, the SASS has a TMA load)
    ("replace(CONFIGS[0], tma=True)", "float16", (3, 3), 1, "", True),
    ("replace(CONFIGS[0], tma=True)", "float32", (3, 3), 1, "", True),  # 256-byte box rows
    ("replace(CONFIGS[3], tma=True)", "bfloat16", (1, 1), 1, "scale", True),
    ("replace(CONFIGS[4], tma=True)", "float16", (1, 1), 1, "depthwise", True),
    ("Conv2dConfig(128, 64, 32, 4, 4, tma=True)", "float16", (7, 7), 1, "stem", True),
    ("Conv2dConfig(128, 128, 64, 8, 4, split_k=3, tma=True)", "float16", (3, 3), 1, "", True),
    ("Conv2dConfig(128, 32, 32, 4, 3, tma=True)", "float16", (3, 3), 8, "", True),  # KG 32
    ("Conv2dConfig(128, 32, 32, 4, 3, tma=True)", "float16", (3, 3), 32, "", False),  # KG 8
    ("Conv2dConfig(128, 64, 64, 4, 4, tma=True, x_tma=True)", "float16", (1, 1), 1, "", True),
    ("Conv2dConfig(128, 128, 64, 8, 4, tma=True, x_tma=True)", "bfloat16", (1, 1), 1, "", True),
    ("default", "float16", (1, 1), 1, "", True),  # with a residual: no 128x256 tile (it spills)
    ("default", "bfloat16", (3, 3), 1, "", True),
    ("replace(CONFIGS[0], tma=True, x_tma=True)", "float16", (3, 3), 1, "no_descriptors",
     False),
    ("CONFIGS[0]", "float16", (3, 3), 1, "", False),
]

TMA_SCRIPT = """
import json, sys, torch
from dataclasses import replace
from cnnfuse.kernels import conv2d_args
from cnnfuse.kernels import conv2d
from cnnfuse.kernels.conv2d import CONFIGS, Conv2dConfig, Conv2dProblem, Window
dtype, kernel = getattr(torch, sys.argv[2]), eval(sys.argv[3])
groups, variant, out = int(sys.argv[4]), sys.argv[5], sys.argv[6]
if variant == "no_descriptors":  # a Triton without tensor descriptors
    conv2d.descriptors_supported = lambda: False
pad = (kernel[1] // 2, kernel[1] // 2, kernel[0] // 2, kernel[0] // 2)
window = Window("dw", (3, 3), (2, 2), (1, 1, 1, 1), weight_strides=(9, 3, 1)) \
    if variant == "depthwise" else None
problem = Conv2dProblem(  # the default picks at batch 128, where 128x256 tiles are candidates
    128 if sys.argv[1] == "default" else 8, 3 if variant == "stem" else 256, 28, 28, 256, *kernel,
    stride=(2, 2) if variant == "stem" else (1, 1), padding=pad, groups=groups, residual=True,
    input_scale=dtype if variant == "scale" else None, window=window)
config = conv2d.default_config(problem, dtype=dtype) if sys.argv[1] == "default" \
    else eval(sys.argv[1])
from cnnfuse.bench import static
name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
open(out, "w").write(json.dumps(static._analyse_conv(problem, config, name)))
"""


@needs_cuobjdump
@pytest.mark.parametrize("config, dtype, kernel, groups, variant, expected", TMA_CASES,
                         ids=[f"{c}-{d}-{k[0]}x{k[1]}-g{g}{'-' * bool(v)}{v}"
                              for c, d, k, g, v, _ in TMA_CASES])
def test_weight_descriptor_in_sass(config, dtype, kernel, groups, variant, expected, tmp_path):
    """The weight through a descriptor shows as UTMALDG in the SASS (the report's tma column)
    exactly where the config asks for it and the geometry and the Triton build allow it, with
    every other gate still holding; the pointer path elsewhere."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "row.json"
    subprocess.run([sys.executable, "-c", TMA_SCRIPT, config, dtype, repr(kernel), str(groups),
                    variant, str(out)], env=env, check=True, capture_output=True, text=True)
    row = json.loads(out.read_text())
    assert row["tma"] is expected
    assert row["mma"] == "HGMMA" and row["whole_reduction_pipelined"]
    if variant != "depthwise":  # a 9-tap window at a 64x128 tile spills on either path
        assert row["spill_bytes"] == 0
    if groups == 1:
        assert row["load_bytes"] == 16


SE_GATE = """
import sys, torch
from cnnfuse.kernels.se_gate import compile_ahead
open(sys.argv[3], "w").write(compile_ahead(getattr(torch, sys.argv[1]), int(sys.argv[2])).asm["ptx"])
"""


@pytest.mark.parametrize("dtype, reduced", [("float16", 48), ("bfloat16", 128), ("float32", 6)])
def test_se_gate_compiles_for_sm90(dtype, reduced, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "se_gate.ptx"
    subprocess.run([sys.executable, "-c", SE_GATE, dtype, str(reduced), str(out)], env=env,
                   check=True, capture_output=True, text=True)
    assert ".target sm_90a" in out.read_text()
