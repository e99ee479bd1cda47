#!/usr/bin/env bash
# GPU passes for a machine with torch, triton, torchvision and timm already installed, each
# sized to fit one 10-minute call:
#   tests    build, then every `cuda`-marked test
#   ops      the per-layer suites
#   models   the end-to-end suite's --quick selection
#   zoo EXPR the end-to-end suite filtered by -k EXPR (e.g. zoo "256 and fp16 and mobilenet")
#   profile MODEL BATCH   the per-op profile of one fused model
#   sanitize compute-sanitizer memcheck and racecheck over the CUDA C++ kernels' GPU tests
# Every phase after `tests` ends with the report of all JSON in $OUT.
#   all      tests, ops and models
# Logs, JSON and the report go to $OUT (default ./results).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
PHASE="${1:-all}"
OUT="${OUT:-results}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -m cnnfuse.info > "$OUT/info.txt"
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
if [[ $PHASE == zoo ]]; then
  python3 -m pytest bench/bench_models.py --benchmark-only -q -k "${2:?zoo needs a -k expression}" \
      --benchmark-json="$OUT/bench_zoo.json" --benchmark-columns=median,rounds 2>&1 \
      | tail -30 | tee "$OUT/bench_zoo.txt"
fi
if [[ $PHASE != tests && $PHASE != sanitize ]]; then
  python3 -m cnnfuse.bench.report "$OUT"/bench_*.json "$OUT"/profile_*.json --out "$OUT/report" \
      | tail -40
fi
