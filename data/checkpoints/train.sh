#!/usr/bin/env bash
# The commands that trained the shipped checkpoints on one NVIDIA H100 (README.md here).
#   bash data/checkpoints/train.sh vit hybrid t2t vit_hires
# Each job writes runs/NAME/ (checkpoints each epoch, metrics.json; run it again to resume
# after an interruption) and, when $OUT is set, copies the final model, the metrics and
# the log there. Then `python data/checkpoints/manifest.py` re-measures the accuracies.
# vit_hires fine-tunes data/checkpoints/vit.safetensors: copy runs/vit/model.safetensors
# there first if you retrained vit.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-runs}
mkdir -p "$OUT" runs

job() {  # job NAME ARGS...: train, log, and copy the results to $OUT
  local name=$1; shift
  python3 -m vit_tutorial.train --out "runs/$name" --no-progress --compile --seed 0 \
    --save-dtype float16 "$@" 2>&1 | tee "$OUT/$name.log"
  cp "runs/$name/model.safetensors" "$OUT/$name.safetensors"
  cp "runs/$name/metrics.json" "$OUT/$name.metrics.json"
}

# From scratch: batch 1024, mixup 0.8 / CutMix 1.0 on top of crop, flip and erasing.
RECIPE=(--batch-size 1024 --lr 1.5e-3 --warmup 10 --weight-decay 0.05 --drop-path 0.1
        --crop-padding 2 --erasing 0.25 --mixup 0.8 --cutmix 1.0)

for what in "$@"; do
  case $what in
    vit) job vit --model vit_mini_patch4_28 --epochs 226 "${RECIPE[@]}" ;;
    hybrid) job hybrid --model vit_mini_r26_w48_s4_28 --epochs 190 --eval-every 10 "${RECIPE[@]}" ;;
    t2t) job t2t --model t2t_vit_mini_28 --epochs 230 "${RECIPE[@]}" ;;
    vit_hires) job vit_hires --model vit_mini_patch4_28 --init data/checkpoints/vit.safetensors \
           --img-size 56 --epochs 15 --batch-size 512 --lr 1e-4 --min-lr 1e-6 --warmup 1 \
           --weight-decay 0.05 --drop-path 0.1 --crop-padding 2 --erasing 0.25 ;;
    *) echo "unknown job $what (vit, hybrid, t2t, vit_hires)" >&2; exit 2 ;;
  esac
done
