#!/usr/bin/env bash
# GPU passes for a machine with torch, triton, torchvision and timm already installed, each
# sized to fit one 10-minute call: `tests` (build + GPU tests), `ops` (per-layer suites),
# `models` (end-to-end suite + main job), or `all`. Logs and JSON go to $OUT (default ./results).
set -uo pipefail
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
  python3 -m pytest bench/bench_models.py --benchmark-only -q \
      --benchmark-json="$OUT/bench_models.json" --benchmark-columns=median,rounds 2>&1 \
      | tail -50 | tee "$OUT/bench_models.txt"
fi
