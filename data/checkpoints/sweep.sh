#!/usr/bin/env bash
# The six 80-epoch runs side by side on one H100 that README.md ("What was tried") compares
# at equal epochs. Each was stopped by a 545-second limit (none finished): the GPU was
# saturated, so each ran at a fifth to a third of its speed alone.
#   OUT=/some/dir bash data/checkpoints/sweep.sh
# `w48` is the hybrid with hybrid_width=48 (4,764,058 parameters): the preset
# vit_mini_r26_w48_s4_28, which the shipped `hybrid` uses since.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=. OMP_NUM_THREADS=2
OUT=${OUT:-runs}
mkdir -p "$OUT" runs
RECIPE="--batch-size 1024 --lr 1.5e-3 --warmup 10 --weight-decay 0.05 --drop-path 0.1
        --crop-padding 2 --erasing 0.25 --mixup 0.8 --cutmix 1.0"
COMMON="--no-progress --compile --seed 0 --save-dtype float16 --epochs 80"
TRAIN="python3 -m vit_tutorial.train"

run() {  # run NAME COMMAND: in the background, stopped after 545 s, log in $OUT/NAME.log
  local name=$1; shift
  (timeout 545 bash -c "$*" >"$OUT/$name.log" 2>&1; echo "exit $?" >>"$OUT/$name.log") &
}
run h_base  "$TRAIN --out runs/h_base --model vit_mini_r26_s4_28 $COMMON $RECIPE"
run h_nomix "$TRAIN --out runs/h_nomix --model vit_mini_r26_s4_28 $COMMON $RECIPE --mixup 0 --cutmix 0"
run h_b512  "$TRAIN --out runs/h_b512 --model vit_mini_r26_s4_28 $COMMON $RECIPE --batch-size 512 --lr 1e-3"
run h_w48   "$TRAIN --out runs/h_w48 --model vit_mini_r26_w48_s4_28 $COMMON $RECIPE"
run t_base  "$TRAIN --out runs/t_base --model t2t_vit_mini_28 $COMMON $RECIPE"
run t_nomix "$TRAIN --out runs/t_nomix --model t2t_vit_mini_28 $COMMON $RECIPE --mixup 0 --cutmix 0"
wait
