#!/usr/bin/env bash
# TXL-PBC on one GPU without network: the 4-minute run beside YOLO11m's reference and the sparse
# study at a time budget, in one command. docs/results.md records what it gave.
#
# Expects, in the checkout: wheels in .whl/ (docs/benchmarks.md, "GPU run"; plus docstring_parser
# and typeshed_client, which LightningCLI's jsonargparse[signatures] needs) and TXL-PBC in
# .txl/txl_pbc (a copy of ../shared/data/txl_pbc; the device machine sees only the checkout).
# Writes logs and results to $OUT (default runs/gpu_txl).
#
#   scripts/gpu_txl.sh            # parts profile (~1 min), txl (~5.5 min), study (~3.5 min)
#   PARTS=txl scripts/gpu_txl.sh  # only the 4-minute runs; PARTS=study only the study
#   WORKERS=3 RECIPES="base16|--data.batch_size 16 --model.loss.cls_loss focal;b64|--data.batch_size 64" PARTS=txl ...
#                                 # several recipes at once on the one GPU ("name|lld args;...")
#   LAYOUT=auto PARTS=txl ...     # first time a step in both memory layouts, keep the faster
#   TUNE=1 PARTS=txl ...          # after each test: post-processing chosen on val
#                                 # (python -m lld_lightning.tools.tune $TUNE_ARGS), and the test again with it
#   WHEELS=0 MINUTES=0.3 STUDY_MINUTES=0.3 WORKERS=2 scripts/gpu_txl.sh   # dry run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_txl}
mkdir -p "$OUT"
ROOT=${TXL_ROOT:-.txl/txl_pbc}
MINUTES=${MINUTES:-4}
STUDY_MINUTES=${STUDY_MINUTES:-2.5}
PARTS=${PARTS:-profile txl study}
WORKERS=${WORKERS:-12}
IMAGE_SIZE=${IMAGE_SIZE:-640}

if [[ "${WHEELS:-1}" == 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lld-site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/lld-site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
nproc

if [[ " $PARTS " == *" profile "* ]]; then
  # Host or device bound? Wall vs kernel time of one training step (scripts/gpu_step_profile.py).
  python3 scripts/gpu_step_profile.py --config configs/txl.yaml --data.root "$ROOT" \
    --image-size "$IMAGE_SIZE" --batch-sizes ${PROFILE_BATCHES:-16 64} --model "${PROFILE_MODEL:-{}}" 2>&1 \
    | grep '^{' | tee "$OUT/step_profile.jsonl"
  echo "[gpu_txl] profile part ${SECONDS}s"
fi

# LAYOUT=auto: time one training step of the default recipe's model at batch 64 in both memory
# layouts first, and give every recipe --model.channels_last true if that is at least 5% faster
# (whether it is depends on the GroupNorm kernels of the device image's torch, which may convert
# NHWC back to NCHW). LAYOUT=channels_last forces it.
LAYOUT_ARGS=()
if [[ "${LAYOUT:-}" == auto ]]; then
  model='{"detector": {"backbone": "resnet34", "fpn_channels": 128, "head_convs": 2}'
  python3 scripts/gpu_step_profile.py --config configs/txl.yaml --data.root "$ROOT" \
    --image-size "$IMAGE_SIZE" --batch-sizes "${LAYOUT_BATCH:-64}" --steps 5 --top 8 --cudnn-benchmark \
    --model "$model}" --model "$model, \"channels_last\": true}" 2>&1 \
    | grep '^{' | tee "$OUT/layout_profile.jsonl"
  if python3 -c 'import json, sys; r = [json.loads(l) for l in open(sys.argv[1])]; sys.exit(r[1]["wall_ms_per_step"] >= 0.95 * r[0]["wall_ms_per_step"])' "$OUT/layout_profile.jsonl"; then
    LAYOUT_ARGS=(--model.channels_last true)
  fi
  echo "[gpu_txl] layout part ${SECONDS}s: ${LAYOUT_ARGS[*]:-channels first}"
elif [[ "${LAYOUT:-}" == channels_last ]]; then
  LAYOUT_ARGS=(--model.channels_last true)
fi

if [[ " $PARTS " == *" txl "* ]]; then
  # configs/txl.yaml with the baseline's input size (YOLO: imgsz 640) and the time budget
  # instead of epochs, one process per recipe, all at once (each its own MINUTES of wall clock
  # on the shared GPU; give WORKERS=3 for four at once); validation every VAL_INTERVAL (DD:HH:MM:SS,
  # default a minute; longer than the run: only the final one) and once at the end, with
  # FINAL_VAL_S seconds (default 20) kept for the final one until
  # a validation has been timed; test
  # on the best checkpoint by val mAP@[.5:.95]. A recipe is a name and extra `lld` arguments.
  # Default: the recipe of configs/gpu/txl_4min.yaml (spelled out, since this script adds its own
  # TimeBudget); "base16" is the first 4-minute recipe.
  RECIPES=${RECIPES:-"txl_4min|--data.batch_size 64 --model.lr 0.004 --model.detector.fpn_channels 128 --model.detector.head_convs 2 --model.detector.backbone resnet34 --model.loss.cls_loss quality_focal --trainer.benchmark true --model.metrics_backend faster_coco_eval --data.pixel_size.working null --data.augmentation.optics.vignetting 0 --data.augmentation.optics.defocus 0 --data.augmentation.optics.motion_blur 0 --data.augmentation.optics.exposure 0 --data.augmentation.optics.low_light 0 --data.augmentation.optics.white_balance 0 --data.augmentation.optics.gamma 0 --data.augmentation.optics.jpeg 0"}
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 5 > "$OUT/gpu_util.csv" 2>/dev/null &
  smi=$!
  pids=()
  IFS=';' read -ra recipes <<< "$RECIPES"
  for recipe in "${recipes[@]}"; do
    name=${recipe%%|*}
    read -ra extra <<< "${recipe#*|}"
    RUN=runs/txl_gpu/$name
    rm -rf "$RUN"
    (
      python3 -m lld_lightning.cli fit --config configs/txl.yaml --data.root "$ROOT" \
        --data.image_size "$IMAGE_SIZE" --data.num_workers "$WORKERS" "${extra[@]}" "${LAYOUT_ARGS[@]}" \
        --trainer.default_root_dir "$RUN" \
        --trainer.check_val_every_n_epoch null --trainer.val_check_interval "${VAL_INTERVAL:-00:00:01:00}" \
        --trainer.callbacks+=lld_lightning.callbacks.time_budget.TimeBudget --trainer.callbacks.minutes "$MINUTES" \
        --trainer.callbacks.final_validation_s "${FINAL_VAL_S:-20}" \
        --trainer.enable_progress_bar false > "$OUT/${name}_fit.log" 2>&1
      python3 -m lld_lightning.cli test --config configs/txl.yaml --data.root "$ROOT" \
        --data.image_size "$IMAGE_SIZE" --data.num_workers "$WORKERS" "${extra[@]}" "${LAYOUT_ARGS[@]}" \
        --trainer.default_root_dir "$RUN" --ckpt_path "$RUN/latest/checkpoints/best.ckpt" > "$OUT/${name}_test.log" 2>&1
      cp "$(ls -t "$RUN"/csv/version_*/metrics.csv | head -1)" "$OUT/${name}_test_metrics.csv" 2>/dev/null
      cp "$(ls "$RUN"/csv/version_*/metrics.csv | head -1)" "$OUT/${name}_fit_metrics.csv" 2>/dev/null
      if [[ "${TUNE:-0}" == 1 ]]; then
        # Post-processing chosen on the val split (lld_lightning.tools.tune), then the test with it.
        python3 -m lld_lightning.tools.tune --ckpt_path "$RUN/latest/checkpoints/best.ckpt" --backend faster_coco_eval \
          --out "$OUT/${name}_tune.json" ${TUNE_ARGS:-} --config configs/txl.yaml --data.root "$ROOT" \
          --data.image_size "$IMAGE_SIZE" --data.num_workers "$WORKERS" "${extra[@]}" > "$OUT/${name}_tune.log" 2>&1
        read -ra tuned < <(python3 -c 'import json, sys; f = json.load(open(sys.argv[1]))["rows"][0]["flags"]; print("" if f.startswith("(") else f)' "$OUT/${name}_tune.json")
        python3 -m lld_lightning.cli test --config configs/txl.yaml --data.root "$ROOT" \
          --data.image_size "$IMAGE_SIZE" --data.num_workers "$WORKERS" "${extra[@]}" "${LAYOUT_ARGS[@]}" \
          --trainer.default_root_dir "$RUN/tuned" --ckpt_path "$RUN/latest/checkpoints/best.ckpt" "${tuned[@]}" \
          > "$OUT/${name}_test_tuned.log" 2>&1
      fi
    ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  kill "$smi" 2>/dev/null
  for recipe in "${recipes[@]}"; do
    name=${recipe%%|*}
    echo "== $name: ${recipe#*|}"
    grep -h "time budget\]" "$OUT/${name}_fit.log"
    grep -A12 "per-domain results" "$OUT/${name}_test.log" | grep -E "all|BCCD|BCDD|PBC|Raabin"
    if [[ -f "$OUT/${name}_test_tuned.log" ]]; then
      grep -h "^best" "$OUT/${name}_tune.log"
      grep -A12 "per-domain results" "$OUT/${name}_test_tuned.log" | grep -E "all|BCCD|BCDD|PBC|Raabin"
    fi
  done
  echo "[gpu_txl] txl part ${SECONDS}s"
fi

if [[ " $PARTS " == *" study "* ]]; then
  # One process per row at the same time, each with the same time budget; then one table.
  rows=(full masked masked+teacher)
  pids=()
  mkdir -p runs/study_gpu
  for i in "${!rows[@]}"; do
    python3 -m research.study --datasets txl --fractions 0.2 --rows "${rows[$i]}" \
      --txl-root "$ROOT" --budget-minutes "$STUDY_MINUTES" --validations 2 --num-workers 3 \
      --runs-dir runs/study_gpu --out "runs/study_gpu/row$i.md" \
      > "runs/study_gpu_row$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  tail -n 3 runs/study_gpu_row*.log
  python3 -m research.study --render-from runs/study_gpu/row{0,1,2,3}.json \
    --out "$OUT/sparse_txl_gpu.md"
  cat runs/study_gpu_row*.log > "$OUT/study.log"
fi
ls -la "$OUT"
