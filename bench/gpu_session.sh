#!/usr/bin/env bash
# GPU passes for a machine with torch, triton, torchvision and timm already installed, each
# sized to fit one 10-minute call:
#   quick    the whole GPU check in one call of at most 9 minutes (H200, 16 cores): see below
#   tests    build, then every `cuda`-marked test
#   ops      the per-layer suites
#   models   the end-to-end suite's --quick selection
#   zoo EXPR the end-to-end suite filtered by -k EXPR (e.g. zoo "256 and fp16 and mobilenet")
#   profile MODEL BATCH   the per-op profile of one fused model
#   sanitize compute-sanitizer memcheck and racecheck over the CUDA C++ kernels' GPU tests
#   tma      the per-layer suite at batch 128, the Triton default pick with and without TMA
#   ship     the GPU tests of tune, save/load and AOTInductor packages with Triton kernels
# Every phase after `tests` ends with the report of all JSON in $OUT.
#   all      tests, ops and models
# Logs, JSON and the report go to $OUT (default ./results).
#
# quick, part by part, each under `timeout` (SIGINT first, so pytest still writes its JSON):
#   build   100 s  sm_90 only, MAX_JOBS=16. 6 translation units; on the 2-core CPU machine the
#                  whole build takes 275 s, its longest unit (the cuDNN frontend one) ~150 s,
#                  so 16 cores finish in about that one unit's time on a faster core: ~60-90 s
#   static  40 s   python -m cnnfuse.bench.static on ResNet-50 and GoogLeNet at batch 128 with
#                  the tuned candidates (--candidates $TUNE), 16 compile processes: the table
#                  for NOTES; the kernels are specialised as the per-layer suite launches
#                  them, so Triton's on-disk cache should spare the suite those compiles (not
#                  yet checked on a GPU: if its keys differ, the suite compiles them within
#                  its own time box). CPU machine, 2 cores shared by 5: 146 distinct kernels
#                  for the three CI models in 5.5-9 min, ~2 s of CPU a kernel -> ~25 s here
#   tests   110 s  the ops' GPU tests (-m cuda) of every backend, fp16/bf16/fp32, poisoned
#                  outputs, in 4 parallel pytest processes (one GPU, small shapes); the `auto`
#                  cases are left out (autotuning is timed in the per-layer suite) and
#                  CNNFUSE_AUTOTUNE=0 keeps the rest on one config each. Collecting all 715
#                  cuda tests takes 18-26 s here
#   layers  120 s  bench/ops/bench_conv2d.py at batch 128: the 72 distinct dense convs of
#                  ResNet-50 and GoogLeNet x {cnnfuse_triton, cnnfuse (autotuned),
#                  cudnn_conv_only, cudnn conv+BN+ReLU} = 288 cases of 30 graph replays
#                  (collected in 12 s here)
#   models  130 s  bench/bench_models.py: ResNet-50, GoogLeNet, MobileNetV2 at batch 1 and
#                  256, fp16, cudnn / inductor / cnnfuse: 18 cases, 6 torch.compile builds
#   report   20 s  python -m cnnfuse.bench.report (markdown + PNG) and the summary
# Limits sum to 520 s; with start-up, cnnfuse.info and the summary, 9 minutes at most.
# Autotuning is bounded: the autotuned provider times the default pick and TUNE - 1 other
# Triton configs per shape (CNNFUSE_BENCH_CANDIDATES, default 3) plus the cuDNN candidates,
# all already compiled by the static step; end to end, CNNFUSE_AUTOTUNE=0 (default picks).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
PHASE="${1:-all}"
OUT="${OUT:-results}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
if [[ $PHASE == quick ]]; then
  export MAX_JOBS="${MAX_JOBS:-16}"
  START=$SECONDS
  part() {  # part NAME SECONDS CMD...: time-boxed, logged to $OUT/quick_NAME.txt
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout -s INT -k 15 "$limit" "$@" > "$OUT/quick_$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/quick_times.txt"
  }
  : > "$OUT/quick_times.txt"
fi
if [[ $PHASE == quick ]]; then
  part build 100 python3 -m pip install -q --no-build-isolation --no-deps -e .
else
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
fi
python3 -m cnnfuse.info > "$OUT/info.txt"
if [[ $PHASE == quick ]]; then
  TUNE="${TUNE:-3}"
  part static 40 python3 -m cnnfuse.bench.static --model resnet50 --model googlenet \
      --batch 128 --candidates "$TUNE" --jobs 16
  # four pytest processes side by side on the one GPU; each file set compiles its own kernels
  tests_part() {
    # CNNFUSE_CHECK_LAUNCH=1: every cached launch is also made through Triton's own launcher
    # and compared bit for bit, so the direct launch is proven on the card before it is timed
    CNNFUSE_CHECK_LAUNCH=1 CNNFUSE_AUTOTUNE=0 timeout -s INT -k 15 110 python3 -m pytest -q -m cuda \
        -p no:cacheprovider "$@" 2>&1 | tail -6
  }
  T0=$SECONDS
  tests_part tests/ops/test_conv2d.py -k "test_cuda_against_cudnn and not auto" \
      > "$OUT/quick_tests_1.txt" &
  tests_part tests/ops/test_conv2d.py -k "not test_cuda_against_cudnn and not auto" \
      > "$OUT/quick_tests_2.txt" &
  tests_part tests/ops/test_depthwise_conv2d.py tests/ops/test_bias_act.py \
      tests/ops/test_se_gate.py tests/ops/test_launch.py tests/ops/test_resolved_plans.py \
      > "$OUT/quick_tests_3.txt" &
  tests_part tests/ops/test_pool_conv2d.py tests/ops/test_separable_conv2d.py -k "not auto" \
      > "$OUT/quick_tests_4.txt" &
  wait
  cat "$OUT"/quick_tests_[1-4].txt > "$OUT/quick_tests.txt"
  echo "tests: 4 processes in $((SECONDS - T0)) s (limit 110 s each)" | tee -a "$OUT/quick_times.txt"
  CNNFUSE_BENCH_CANDIDATES="$TUNE" part layers 120 python3 -m pytest bench/ops/bench_conv2d.py \
      --benchmark-only -q -k "b128 and not pointer" --benchmark-json="$OUT/bench_ops.json" \
      --benchmark-columns=median,rounds
  CASES=()
  for model in resnet50 googlenet mobilenet_v2; do
    for batch in 256 1; do
      for provider in cudnn inductor cnnfuse; do
        CASES+=("bench/bench_models.py::test_model[$model-$batch-fp16-$provider]")
      done
    done
  done
  CNNFUSE_AUTOTUNE=0 part models 130 python3 -m pytest "${CASES[@]}" --benchmark-only -q \
      --benchmark-json="$OUT/bench_models.json" --benchmark-columns=median,rounds
  part report 20 python3 -m cnnfuse.bench.report "$OUT"/bench_*.json --out "$OUT/report"
  python3 bench/quick_summary.py "$OUT" "$((SECONDS - START))"
  exit 0
fi
if [[ $PHASE == tests || $PHASE == all ]]; then
  python3 -m pytest tests -q -m cuda 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
fi
if [[ $PHASE == ops || $PHASE == all ]]; then
  python3 -m pytest bench/ops --benchmark-only -q --benchmark-json="$OUT/bench_ops.json" \
      --benchmark-columns=median,rounds 2>&1 | tail -80 > "$OUT/bench_ops.txt"
  python3 - "$OUT/bench_ops.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["benchmarks"]
for b in rows:
    x = b["extra_info"]
    print(f'{b["name"][:90]:90s} {b["stats"]["median"] * 1e3:8.3f} ms  floor {x["floor_ms"]:.3f}'
          f'  {x["fraction_of_floor"]:.2f}')
PY
fi
if [[ $PHASE == models || $PHASE == all ]]; then
  python3 -m pytest bench/bench_models.py --benchmark-only -q --quick \
      --benchmark-json="$OUT/bench_models.json" --benchmark-columns=median,rounds 2>&1 \
      | tail -30 | tee "$OUT/bench_models.txt"
fi
if [[ $PHASE == profile ]]; then
  python3 -m cnnfuse.bench.profile --model "${2:-mobilenet_v2}" --batch "${3:-256}" --out "$OUT" \
      --top 30 | tee "$OUT/profile.txt"
fi
if [[ $PHASE == sanitize ]]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -m cuda -x \
        tests/ops/test_depthwise_conv2d.py tests/ops/test_bias_act.py -k "fp16 or bf16" 2>&1 \
        | tail -15 | tee "$OUT/sanitize_$tool.txt"
    echo "compute-sanitizer $tool: exit ${PIPESTATUS[0]}" | tee -a "$OUT/sanitize_$tool.txt"
  done
fi
if [[ $PHASE == tma ]]; then
  python3 -m pytest bench/ops/bench_conv2d.py --benchmark-only -q -k "b128 and cnnfuse_triton" \
      --benchmark-json="$OUT/bench_tma.json" --benchmark-columns=median,rounds 2>&1 \
      | tail -60 | tee "$OUT/bench_tma.txt"
fi
if [[ $PHASE == ship ]]; then
  CNNFUSE_CHECK_LAUNCH=1 python3 -m pytest -q -m cuda tests/test_triton_export.py \
      tests/test_tune.py tests/test_serialize.py tests/test_export.py 2>&1 | tail -25 \
      | tee "$OUT/gpu_ship.txt"
fi
if [[ $PHASE == zoo ]]; then
  python3 -m pytest bench/bench_models.py --benchmark-only -q -k "${2:?zoo needs a -k expression}" \
      --benchmark-json="$OUT/bench_zoo.json" --benchmark-columns=median,rounds 2>&1 \
      | tail -30 | tee "$OUT/bench_zoo.txt"
fi
if [[ $PHASE != tests && $PHASE != sanitize && $PHASE != ship ]]; then
  python3 -m cnnfuse.bench.report "$OUT"/bench_*.json "$OUT"/profile_*.json --out "$OUT/report" \
      | tail -40
fi
