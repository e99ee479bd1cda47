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
