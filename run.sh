#!/usr/bin/env bash
# One entry point for a new user (only Python 3.10+ needed):
#   bash run.sh          # install requirements into a venv, then run the pipeline demo on CPU (2 procs)
#   bash run.sh --model=/ckpt/qwen --data=/data/lvr --nproc=8 --sp=4   # the same pipeline on a real checkpoint/dataset
#   bash run.sh test     # install requirements into a venv, then run the test suite (pytest)
# Extra arguments after `test` go to pytest; after `demo` they go to the demo.
# VENV=/path picks the virtualenv (default .venv); it is (re)installed when requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] installing requirements into $VENV (first time: a few minutes, several GB for torch)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cmd=demo                                  # `bash run.sh --model=... --data=...` is the demo with flags
case "${1:-}" in test|demo) cmd=$1; shift ;; esac
case "$cmd" in
  test) exec python -m pytest -q "$@" ;;
  demo) exec bash demo.sh "$@" ;;
  *) echo "usage: bash run.sh [demo|test] [args...]" >&2; exit 2 ;;
esac
