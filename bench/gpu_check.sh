#!/usr/bin/env bash
# GPU validation: ring/Ulysses attention vs SDPA (fp32, bf16; world 1 and several processes), ring kernel TFLOP/s vs
# SDPA and causal balance, the tiny and a real-shaped (Qwen2.5-VL-7B widths) model's encode / SP log-probs / SFT step /
# RL step with bf16 autocast + FSDP2 + activation checkpointing, peak memory per phase vs mrsp.estimate_memory, and
# the vision/LLM cost share of bench/bench_mrsp.py. Prints a table; exit code 1 if any check failed.
#
#   bash bench/gpu_check.sh                  # one CUDA GPU (H100/H200): <= 8 minutes; needs only torch + transformers
#   bash bench/gpu_check.sh --device=cpu     # the same checks at small shapes on CPU (CI: tests/test_gpu_check.py)
#   bash bench/gpu_check.sh --json_out=gpu_check.json --real_layers=4 --budget_s=400   # other knobs: --key=value
#
# Python: $PYTHON if set, else the repo's .venv if there is one, else python3. No network, no temp files left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" bench/gpu_check.py "$@"
