#!/usr/bin/env bash
# The pipeline on the embedded default: synthetic long videos + tiny Qwen2.5-VL, CPU, torchrun x2.
# Run it through `bash run.sh` (installs requirements first) or directly inside the venv.
# Stages so far: synthetic data -> tiny checkpoint -> one video forward per sample on 2 ranks.
# (CoT-SFT -> GRPO with MR-SP -> eval join this script as their issues land.)
#   NPROC=2 DATA=data/synth TINY=out/tiny FRAMES=64 bash demo.sh
set -euo pipefail
cd "$(dirname "$0")"
NPROC=${NPROC:-2}
DATA=${DATA:-data/synth}
TINY=${TINY:-out/tiny}
FRAMES=${FRAMES:-64}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1/3 synthetic long-video QA -> $DATA"
python data.py --out="$DATA"
echo "== 2/3 tiny Qwen2.5-VL checkpoint -> $TINY"
[ -f "$TINY/config.json" ] || python mrsp.py --init_tiny="$TINY" --data="$DATA"
echo "== 3/3 video forward on $NPROC processes ($FRAMES frames per video)"
torchrun --standalone --nproc_per_node="$NPROC" mrsp.py --model="$TINY" --data="$DATA/val.jsonl" \
  --frames="$FRAMES" --max_samples=8
echo "demo: done"
