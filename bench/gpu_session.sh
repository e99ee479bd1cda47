#!/usr/bin/env bash
# One full GPU pass for a machine with torch, triton, torchvision and timm already installed:
# build, GPU tests, benchmarks, main job. Full logs and JSON go to $OUT (default ./results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -m cnnfuse.info | tee "$OUT/info.txt"
python3 -m pytest tests -q -m cuda -x 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 -m pytest bench/ --benchmark-only -q --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,rounds 2>&1 | tail -40 > "$OUT/bench.txt"
for model in resnet50 googlenet; do
  for batch in 1 256; do
    python3 -m cnnfuse.bench --model $model --batch $batch --out "$OUT" 2>/dev/null | tail -5
  done
done
