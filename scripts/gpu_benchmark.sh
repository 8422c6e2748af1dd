#!/usr/bin/env bash
# The GPU benchmark protocol on one H100/H200 machine without network (docs/benchmarks.md).
#
# Needs a python3 with torch, torchvision, timm, lightning and torchmetrics. kornia, kornia_rs,
# pycocotools and jsonargparse (and rich, in case it is missing) come from wheels in .whl/,
# installed into a private folder on PYTHONPATH; nothing is downloaded. The package runs from
# this checkout. Budget: under 10 minutes (synthetic data ~1-2 min on first use, the run itself
# a few minutes). Extra arguments go to the benchmark, e.g. `--compile` or `--repeats 30`.
#
#   scripts/gpu_benchmark.sh                 # --preset gpu: resnet50 640 px batch 32 bf16 + light row
#   COMPILE=1 scripts/gpu_benchmark.sh       # then the same with torch.compile, if time is left
set -euo pipefail
cd "$(dirname "$0")/.."

SITE=${SITE:-/tmp/lld-site}
OUT=${OUT:-runs/benchmark/gpu.jsonl}
LIMIT_S=${LIMIT_S:-540}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
else
  echo "no wheels in .whl/ (see docs/benchmarks.md, 'GPU run'); using what python3 has" >&2
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import importlib
for name in ("torch", "torchvision", "timm", "lightning", "torchmetrics", "kornia", "pycocotools", "rich"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')}")
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
PY

start=$SECONDS
timeout "$LIMIT_S" python3 -m lld_lightning.tools.benchmark --preset gpu --out "$OUT" "$@"
left=$((LIMIT_S - (SECONDS - start)))
if [[ "${COMPILE:-0}" == "1" && $left -gt 180 ]]; then
  timeout "$left" python3 -m lld_lightning.tools.benchmark --preset gpu --compile --no-metrics --out "$OUT" "$@"
fi
echo "results appended to $OUT"
