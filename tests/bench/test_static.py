"""The static quality report (cnnfuse.bench.static): its parsing rules on snippets whose answer
is known (a spill, an 8-byte load, a per-tap loop nest, ...), and the CI gate: ResNet-50,
GoogLeNet and MobileNetV2 at batch 1 and 128, compiled for sm_90 as the runtime specialises
each conv, with every gate holding at the default picks."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cnnfuse.bench import sass, static
from ..util import needs_cuobjdump

RES_USAGE = """
Resources:
 Function _Z3fooPf:
  REG:168 STACK:24 SHARED:1024 LOCAL:8 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _conv2d_kernel:
  REG:128 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:1000 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
        code for sm_90
                Function : _conv2d_kernel
        /*0010*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64], P0 ;
        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
        /*0030*/                   STG.E.128 desc[UR4][R6.64], R8 ;
                Function : _Z3fooPf
        /*0010*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.U16 R3, desc[UR4][R4.64+0x8] ;
        /*0030*/                   STL [R1+0x4], R2 ;
        /*0040*/                   LDL R5, [R1+0x4] ;
        /*0050*/                   HMMA.16816.F32 R8, R12, R16, R8 ;
        /*0060*/                   STG.E desc[UR4][R6.64], R5 ;
        /*0070*/                   LDG.E.LTC128B R7, desc[UR4][R4.64+0x10] ;
"""


def test_res_usage_and_sass_are_read_per_function():
    res = sass.parse_res_usage(RES_USAGE)
    assert res["_Z3fooPf"] == sass.Resources(168, 24, 8, 1024)
    assert res["_Z3fooPf"].spill_bytes == 32 and res["_conv2d_kernel"].spill_bytes == 0
    code = {name: sass.summarise_sass(text) for name, text in sass.split_sass(SASS).items()}
    assert set(code) == {"_conv2d_kernel", "_Z3fooPf"}
    # LTC128B is a cache hint, not a width: the async copy is 16 bytes, the LDG 4
    assert code["_conv2d_kernel"] == sass.SassSummary("HGMMA", 16, 16, False, 0)
    assert code["_Z3fooPf"] == sass.SassSummary("HMMA", 8, 4, False, 2)
    assert sass.summarise_sass("UTMALDG.2D [UR8], [UR4] ;").tma


def test_warps_per_sm():
    assert sass.warps_per_sm(128, 8, 0) == 16   # 128 registers: two blocks of 256 threads
    assert sass.warps_per_sm(129, 8, 0) == 8    # one more register: one block
    assert sass.warps_per_sm(164, 4, 98304) == 8  # shared memory allows two blocks
    assert sass.warps_per_sm(32, 4, 0) == 64
    assert sass.warps_per_sm(81, 4, 0) == 20  # registers are allocated 8 per thread at a time


PTX = textwrap.dedent("""
    .visible .entry k(
        .param .u64 .ptr .global .align 1 k_param_0,
        .param .u64 .ptr .global .align 1 k_param_1,
        .param .u64 .ptr .global .align 1 k_param_2
    )
    {
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b64 %rd3, [k_param_2];
    .loc 1 20 5
    mad.wide.s32 %rd4, %r1, 2, %rd1;
    @%p1 cp.async.cg.shared.global [ %r2 + 0 ], [ %rd4 + 0 ], 0x10, %r3;
    $L__BB0_1:
    add.s64 %rd5, %rd2, %rd6;
    // begin inline asm
    @%p2 ld.global.b16 { %rs1 }, [ %rd5 + 0 ];
    // end inline asm
    ld.global.v2.b32 { %r7, %r8 }, [ %rd2 + 0 ];
    cvt.u64.u32 %rd7, %r7;
    add.s64 %rd8, %rd3, %rd7;
    st.global.v4.b32 [ %rd8 + 0 ], { %r9, %r10, %r11, %r12 };
    st.global.b16 [ %rd3 + 0 ], %rs1;
    }
""")


def test_param_access_follows_addresses_not_values():
    x, w, y = (sass.param_access(PTX, i) for i in range(3))
    assert x.loads == (16,) and x.stores == ()
    assert sorted(w.loads) == [2, 8]
    # the 16-byte store's address adds a value loaded through param 1 to param 2: it is y's
    # (param 2), and not param 1's, whose loaded values are data
    assert w.stores == ()
    assert sorted(y.stores) == [2, 16] and y.loads == ()


def _ttgir(body: str) -> str:
    return "module {\n  tt.func @k() {\n" + textwrap.indent(textwrap.dedent(body), "    ") \
        + "    tt.return\n  }\n}\n"


PIPELINED = _ttgir("""
    %a = ttg.async_copy_global_to_local %p, %s : tensor<128x64x!tt.ptr<f16>> -> !ttg.memdesc
    %t = ttg.async_commit_group tokens %a
    %r:3 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<128x64xf32>) {
      %w = ttg.async_wait %t {num = 2 : i32}
      %d = ttng.warp_group_dot %x, %y, %acc {isAsync = true} : !ttg.memdesc
      %e = ttng.warp_group_dot_wait %d {pendings = 1 : i32}
      %b = ttg.async_copy_global_to_local %q, %s : tensor<128x64x!tt.ptr<f16>> -> !ttg.memdesc
      scf.yield %e : tensor<128x64xf32>
    } {tt.num_stages = 4 : i32}
    %f = ttng.warp_group_dot_wait %r#0 {pendings = 0 : i32}
""")

PER_TAP = _ttgir("""
    %a = ttg.async_copy_global_to_local %p, %s : tensor<128x64x!tt.ptr<f16>> -> !ttg.memdesc
    %r = scf.for %tap = %c0 to %c9 step %c1 iter_args(%acc0 = %z) -> (tensor<128x64xf32>) {
      %q = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %acc0) -> (tensor<128x64xf32>) {
        %w = ttg.async_wait %t {num = 2 : i32}
        %d = ttng.warp_group_dot %x, %y, %acc {isAsync = true} : !ttg.memdesc
        %b = ttg.async_copy_global_to_local %q, %s : tensor<128x64x!tt.ptr<f16>> -> !ttg.memdesc
        scf.yield %d : tensor<128x64xf32>
      }
      scf.yield %q : tensor<128x64xf32>
    }
""")

UNPIPELINED = _ttgir("""
    %r = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<128x64xf32>) {
      %a = tt.load %p : tensor<128x64x!tt.ptr<f16>>
      %d = tt.dot %a, %b, %acc : tensor<128x64xf16> * tensor<64x64xf16> -> tensor<128x64xf32>
      scf.yield %d : tensor<128x64xf32>
    }
""")

# a loop whose result types carry attributes in braces: its region is the line's last brace
SLICE_TYPED = PIPELINED.replace(
    "-> (tensor<128x64xf32>) {",
    "-> (tensor<128x64xf32>, tensor<64xf32, #ttg.slice<{dim = 0, parent = #mma}>>) {")

TWO_LOOPS = PIPELINED.replace("    %f = ttng", "    %r2 = scf.for %j = %c0 to %n step %c1 {\n"
                              "      %g = ttng.warp_group_dot %x, %y, %f\n    }\n    %f = ttng")


@pytest.mark.parametrize("ttgir, expected", [(PIPELINED, True), (SLICE_TYPED, True),
                                             (PER_TAP, False),
                                             (UNPIPELINED, False), (TWO_LOOPS, False),
                                             (_ttgir("%d = tt.dot %a, %b, %c\n"), False)],
                         ids=["one-pipelined-loop", "slice-typed-loop", "loop-per-tap",
                              "no-async-copies",
                              "mma-in-two-loops", "no-loop"])
def test_whole_reduction_pipelined(ttgir, expected):
    assert sass.whole_reduction_pipelined(ttgir) is expected


def _row(**changes):
    row = dict(kernel="conv2d", shape="s", config="c", default=True, registers=128,
               spill_bytes=0, shared_bytes=0, mma="HGMMA", load_bytes=16, store_bytes=16,
               tma=False, whole_reduction_pipelined=True, warps_per_sm=8)
    meta = dict(block_m=changes.pop("block_m", 128), channels=changes.pop("channels", 64))
    row.update(changes)
    return row, meta


def test_gates_name_the_failing_row():
    assert static.gate_failures([_row()]) == []
    bad = [_row(spill_bytes=28), _row(mma="HMMA"), _row(mma="HMMA", block_m=32),
           _row(load_bytes=2), _row(load_bytes=2, channels=3),
           _row(whole_reduction_pipelined=False), _row(default=False, spill_bytes=8),
           _row(kernel="depthwise_conv2d", mma="none", whole_reduction_pipelined=False,
                block_m=0, load_bytes=4, channels=32)]
    failures = static.gate_failures(bad)
    assert [f.split(":")[0].split(" (")[0] for f in failures] == [
        "row 0", "row 1", "row 3", "row 5", "row 7"]
    assert "spills (28 bytes" in failures[0] and "HMMA" in failures[1]
    assert "2 bytes on 64 channels" in failures[2] and "not one pipelined" in failures[3]


def test_shape_parsing():
    s = static.Shape.parse("128,64,56,56,64,3,3,2,1,1,1")
    assert (s.stride, s.pad, s.dil, s.out_hw) == ((2, 2), (1, 1), (1, 1), (28, 28))
    assert static.Shape.parse(s.text) == s
    t = static.Shape.parse("8,128,17,17,192,1,7,1,0x3,1,1")
    assert t.pad == (0, 3) and t.text == "8,128,17,17,192,1,7,1,0x3,1,1"
    assert t.problem().padding == (3, 3, 0, 0)  # (left, right, top, bottom)
    for bad in ("1,2,3", "1,3,8,8,8,3,3,1,1,1,2", "1,3,8,8,8,3,3,a,1,1,1", "0,3,8,8,8,3,3,1,1,1,1"):
        with pytest.raises(ValueError, match="--shape"):
            static.Shape.parse(bad)


def test_depthwise_variant_follows_the_dispatch():
    big = static.Shape(128, 32, 112, 112, 32, 3, 3, (1, 1), (1, 1), (1, 1), 32)
    assert static.depthwise_variant(big, torch.float16) == (8, 3, 3, 1, 4)
    assert static.depthwise_variant(dataclasses.replace(big, n=1), torch.float16) == \
        (8, 3, 3, 1, 1)  # batch 1: one output per thread, to spread over every SM
    assert static.depthwise_variant(static.Shape(128, 960, 7, 7, 960, 5, 5, (2, 2), (2, 2),
                                                 (1, 1), 960), torch.float32)[:4] == (4, 5, 5, 2)
    odd = static.Shape(8, 12, 9, 9, 12, 3, 3, (1, 1), (1, 1), (1, 1), 12)  # 12 % 8 != 0
    assert static.depthwise_variant(odd, torch.float16) == (1, 0, 0, 0, 1)
    dilated = static.Shape(8, 16, 9, 9, 16, 3, 3, (1, 1), (2, 2), (2, 2), 16)
    assert static.depthwise_variant(dilated, torch.float16) == (8, 0, 0, 0, 1)


@needs_cuobjdump
def test_zoo_gates_hold_at_batch_1_and_128():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "cnnfuse.bench.static", "--json", "--jobs", "2"]
    for model in ("resnet50", "googlenet", "mobilenet_v2"):
        cmd += ["--model", model]
    cmd += ["--batch", "1", "--batch", "128"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert all(tuple(row) == static.KEYS for row in rows)
    expected = [s for model in ("resnet50", "googlenet", "mobilenet_v2")
                for batch in (1, 128) for s in static.model_shapes(model, batch)]
    dw = [row for row in rows if row["kernel"] == "depthwise_conv2d"]
    conv = {row["shape"] for row in rows if row["kernel"] == "conv2d"}
    assert all(row["default"] for row in rows)  # one row per shape: its default pick
    assert conv == {s.text for s in expected if not s.depthwise}
    assert len(conv) > 100  # every distinct conv of the three models, both batches
    if dw:  # a CUDA build of _C: the 16-byte stores and two blocks per SM of issue 10
        assert {row["shape"] for row in dw} == {s.text for s in expected if s.depthwise}
        strips = [row for row in dw if row["config"].endswith("tw4")]
        assert strips and all(row["warps_per_sm"] >= 16 for row in strips)
        assert all(row["store_bytes"] == 16 for row in dw)
    gates = [line for line in done.stderr.splitlines() if line.startswith("GATE")]
    assert done.returncode == 0 and not gates, "\n".join(gates)


PARAMS = """
import json, re, sys, torch
from dataclasses import replace
from cnnfuse.bench import static
from cnnfuse.kernels.conv2d import compile_for_shape, default_config
out = {}
for text in sys.argv[1:-1]:
    p = static.Shape.parse(text).problem()
    pick = default_config(p, dtype=torch.float16)
    for cfg in (pick, replace(pick, tma=False, x_tma=False)):
        ptx = compile_for_shape(p, cfg, torch.float16).asm["ptx"]
        decl = {int(m[2]): m[1] for m in re.finditer(r"\\.param\\s+([^\\n,]*?)\\s*\\w+_param_(\\d+)", ptx)}
        index = static.ptx_parameters(p, cfg, torch.float16)
        out[f"{text} {cfg.name}"] = dict(x=decl[index["x_ptr"]], y=decl[index["y_ptr"]],
                                         n=decl[index["N"]], row=static._analyse_conv(p, cfg, "fp16"))
    twins = (pick, replace(pick, x_tma=False), replace(pick, tma=False, x_tma=False))
    out[f"{text} keys"] = len({static.specialisation_key(p, cfg, torch.float16) for cfg in twins})
open(sys.argv[-1], "w").write(json.dumps(out))
"""


@needs_cuobjdump
def test_parameters_found_past_descriptors_and_tma_read_from_the_sass(tmp_path):
    """x and the weight come last in the kernel's parameters (a descriptor expands to
    several): x's, y's and a scalar's PTX parameters are found by the binder's specialisation
    with and without descriptors; the tma column follows the SASS (UTMALDG), not the config."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "params.json"
    shapes = ["8,256,14,14,64,1,1,1,0,1,1", "8,64,14,14,64,3,3,1,1,1,1"]
    subprocess.run([sys.executable, "-c", PARAMS, *shapes, str(out)], env=env, check=True,
                   capture_output=True, text=True)
    got = json.loads(out.read_text())
    # the report compiles (and caches) each of a config's TMA twins apart
    assert [got.pop(f"{shape} keys") for shape in shapes] == [3, 2]
    assert len(got) == 4
    for key, found in got.items():
        tma = key.endswith("tma") or key.endswith("tmax")
        assert ".ptr" in found["y"] and found["n"].strip() == ".u32", key
        if key.endswith("tmax"):  # the 1x1's activation: a 128-byte CUtensorMap by value
            assert ".b8" in found["x"], key
        else:
            assert ".ptr" in found["x"], key
        row = found["row"]
        assert row["tma"] is tma, key
        assert row["load_bytes"] == 16 and row["store_bytes"] == 16, key
    assert any(k.endswith("tmax") for k in got) and any(k.endswith("tma") for k in got)
