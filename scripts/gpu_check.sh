#!/usr/bin/env bash
# The GPU acceptance kit on a bare GPU machine (no network): install the carried wheels into a target folder,
# put it and the repository on PYTHONPATH, run `fast-steer bench gpu`. Results: $OUT/gpu_check.json
# (./gpu-out when OUT is unset). Extra arguments go to the command (e.g. --device cpu --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=$(realpath -m "${CARRY:-gpu-carry}")  # relative paths: from the repository root
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
if ! ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
	echo "no wheels in $CARRY/wheels: run 'make gpu-carry' on a machine with network first" >&2
	exit 2
fi
rm -rf "$CARRY/site"
"$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$CARRY/site" "$CARRY"/wheels/*.whl
export PYTHONPATH="$CARRY/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
exec "$PYTHON" -m apps.bench.gpu --carry "$CARRY" --out "$OUT" "$@"
