#!/usr/bin/env bash
# The GPU check: one command that proves vitlab's CUDA path (benchmarks/gpu_check.py says what it measures).
#
#   bash benchmarks/gpu_check.sh --prepare          here, with the registry and ../shared/data: fills
#                                                   .cache/gpu_check (wheels + images, ~38 MB)
#   bash benchmarks/gpu_check.sh OUT_DIR            on a CUDA machine, offline, from a copy of the repository
#                                                   with .cache/gpu_check: OUT_DIR/gpu_check.json, its log
#                                                   gpu_check.log and cuda_tests.xml, in under 9 minutes
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR  the same code on the CPU, tiny sizes, no .cache needed
#
# PYTHON names the interpreter (default python3: on the GPU image, the one with torch). Exit status: 0 when
# every section ran and no CUDA test failed; 2 with a one-line error otherwise (the JSON says which).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CACHE=.cache/gpu_check
WHEELS=$CACHE/wheels
# What vitlab imports that the GPU image (Python 3.12, torch 2.11) lacks or has too old, at the versions of
# requirements.lock, installed beside the image's packages (never over its torch).
PACKAGES=(pydantic pydantic_core annotated-types typing-inspection typing_extensions)
TARGET_PYTHON=3.12
# gpu_check.py interrupts itself at 480 s (REAL.limit_s) and writes its JSON; this stops a hung interpreter.
KILL_AFTER_S=540

usage() {
  echo "usage: bash benchmarks/gpu_check.sh --prepare | --dry-run OUT_DIR | OUT_DIR" >&2
  exit 2
}

if [ "${1:-}" = --prepare ]; then
  [ $# -eq 1 ] || usage
  pins=()
  for package in "${PACKAGES[@]}"; do
    pin=$(grep -i "^$package==" requirements.lock) || { echo "error: $package: not in requirements.lock" >&2; exit 2; }
    pins+=("$pin")
  done
  rm -rf "$WHEELS"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${pins[@]}"
  PYTHONPATH=$PWD/src "$PYTHON" benchmarks/gpu_check.py --prepare
  du -sh "$CACHE"
  exit
fi

case "${1:-}" in
  --dry-run)
    [ $# -eq 2 ] || usage
    args=(--dry-run "$2")
    out=$2
    # Compiling 8 models on a CPU takes minutes: the dry run's torch.compile is a no-op.
    export TORCH_COMPILE_DISABLE=1
    ;;
  "" | -*) usage ;;
  *)
    [ $# -eq 1 ] || usage
    args=("$1")
    out=$1
    if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
      [ -d "$WHEELS" ] || {
        echo "error: $WHEELS: no wheels; run bash benchmarks/gpu_check.sh --prepare first" >&2
        exit 2
      }
      site=${TMPDIR:-/tmp}/vitlab-gpu-check-site
      "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
      export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    ;;
esac
mkdir -p "$out"
# The GPU machine's CPU side runs natively, not in the bit-identical mode (vitlab/cpu.py).
unset VITLAB_BIT_IDENTICAL
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout --signal=KILL "$KILL_AFTER_S" "$PYTHON" benchmarks/gpu_check.py "${args[@]}" 2>&1 | tee "$out/gpu_check.log"
