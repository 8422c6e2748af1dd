#!/usr/bin/env bash
# TXL-PBC on one GPU without network: the 4-minute comparison with YOLO11m (issue #3) and the
# sparse study at a time budget (issue #4), in one command. docs/results/txl.md and
# docs/results/sparse_txl_gpu.md record what it gave.
#
# Expects, in the checkout: wheels in .whl/ (docs/benchmarks.md, "GPU run"; plus docstring_parser
# and typeshed_client, which LightningCLI's jsonargparse[signatures] needs) and TXL-PBC in
# .txl/txl_pbc (a copy of ../shared/data/txl_pbc; the device machine sees only the checkout).
# Writes logs and results to $OUT (default runs/gpu_txl).
#
#   scripts/gpu_txl.sh            # both parts: ~5 min + ~3.5 min (4 study rows at once)
#   PARTS=txl scripts/gpu_txl.sh  # only the 4-minute run; PARTS=study only the study
#   WHEELS=0 MINUTES=0.3 STUDY_MINUTES=0.3 WORKERS=2 scripts/gpu_txl.sh   # dry run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_txl}
mkdir -p "$OUT"
ROOT=${TXL_ROOT:-.txl/txl_pbc}
MINUTES=${MINUTES:-4}
STUDY_MINUTES=${STUDY_MINUTES:-2.5}
PARTS=${PARTS:-txl study}
WORKERS=${WORKERS:-12}

if [[ "${WHEELS:-1}" == 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lld-site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/lld-site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
nproc

if [[ " $PARTS " == *" txl "* ]]; then
  # configs/txl.yaml as shipped, plus the baseline's input size and batch (YOLO: imgsz 640,
  # batch 16), GPU data workers, and the time budget instead of epochs. Validation every
  # minute and once at the end; test on the best checkpoint by val mAP@.5.
  RUN=runs/txl_gpu
  rm -rf "$RUN"
  start=$SECONDS
  python3 -m lld_lightning.cli fit --config configs/txl.yaml --data.root "$ROOT" \
    --data.image_size 640 --data.batch_size 16 --data.num_workers "$WORKERS" \
    --trainer.default_root_dir "$RUN" --trainer.callbacks.dirpath "$RUN/checkpoints" \
    --trainer.check_val_every_n_epoch null --trainer.val_check_interval '{"seconds": 60}' \
    --trainer.callbacks+=lld_lightning.time_budget.TimeBudget --trainer.callbacks.minutes "$MINUTES" \
    --trainer.enable_progress_bar false 2>&1 | tee "$OUT/txl_fit.log"
  echo "[gpu_txl] fit wall ${SECONDS}s since start of part (includes start-up)" | tee -a "$OUT/txl_fit.log"
  python3 -m lld_lightning.cli test --config configs/txl.yaml --data.root "$ROOT" \
    --data.image_size 640 --data.batch_size 16 --data.num_workers "$WORKERS" \
    --trainer.default_root_dir "$RUN" --trainer.callbacks.dirpath "$RUN/checkpoints" \
    --ckpt_path "$RUN/checkpoints/best.ckpt" 2>&1 | tee "$OUT/txl_test.log"
  cp "$(ls -t "$RUN"/csv/version_*/metrics.csv | head -1)" "$OUT/txl_test_metrics.csv" 2>/dev/null
  echo "[gpu_txl] txl part ${SECONDS}s"
fi

if [[ " $PARTS " == *" study "* ]]; then
  # One process per row at the same time, each with the same time budget; then one table.
  rows=(full masked masked+teacher masked+teacher+norm)
  pids=()
  mkdir -p runs/study_gpu
  for i in "${!rows[@]}"; do
    python3 -m lld_lightning.study --datasets txl --fractions 0.2 --rows "${rows[$i]}" \
      --txl-root "$ROOT" --budget-minutes "$STUDY_MINUTES" --validations 2 --num-workers 3 \
      --pseudo-class-only --runs-dir runs/study_gpu --out "runs/study_gpu/row$i.md" \
      > "runs/study_gpu_row$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  tail -n 3 runs/study_gpu_row*.log
  python3 -m lld_lightning.study --render-from runs/study_gpu/row{0,1,2,3}.json \
    --out "$OUT/sparse_txl_gpu.md"
  cat runs/study_gpu_row*.log > "$OUT/study.log"
fi
ls -la "$OUT"
