#!/usr/bin/env bash
# tools/gpu_wheels.sh: the wheels tools/gpu_check.sh needs on a GPU machine that reaches no index, in pieces
# that each fit one transfer (issue 14).
#
# Run where pip reaches PyPI; it writes into DIR (default .whl, which it adds to .git/info/exclude):
#   DIR/p0 .. DIR/pN   onnxruntime-gpu 1.31.1 (CUDA 13, manylinux_2_28, the given CPython; ~255 MB) split into
#                      parts of PART_MB (default 52) MB: `cat p? > WHEEL` on the far side restores it
#                      (tools/gpu_check.sh does that when WHEELS holds p?)
#   DIR/small/         the build requirements at the versions pyproject.toml pins (scikit-build-core,
#                      pybind11 and what they import), for images whose own are older or missing
# and prints the transfer plan: one copy per part into ~/w, the last one running the check.
#
# Usage:
#   tools/gpu_wheels.sh                    # cp312 (the lent H100/H200 image's python3), into .whl
#   tools/gpu_wheels.sh --python 3.11 --dir /tmp/w --part-mb 60
set -euo pipefail

PYVER=3.12
DIR=.whl
PART_MB=52
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --part-mb) PART_MB="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_wheels: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$PYVER" in 3.11|3.12) ;; *) echo "gpu_wheels: error: --python 3.11|3.12" >&2; exit 2 ;; esac
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
if [ "$DIR" = .whl ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude
fi
mkdir -p "$DIR/small" "$DIR/dl"
PY=${PY:-python3}
get() {  # get DEST SPEC...: binary wheels for the target python, no dependencies
  local dest="$1"; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "$@"
}
get "$DIR/dl" onnxruntime-gpu==1.31.1
get "$DIR/small" scikit-build-core==1.1.2 pybind11==3.1.0 packaging pathspec
WHEEL=$(ls "$DIR"/dl/onnxruntime_gpu-1.31.1-*.whl)
rm -f "$DIR"/p?
split -b "${PART_MB}000000" -d -a 1 "$WHEEL" "$DIR/p"
n=$(ls "$DIR"/p? | wc -l)
cat "$DIR"/p? | cmp - "$WHEEL" >/dev/null || { echo "gpu_wheels: error: the parts do not rebuild $WHEEL" >&2; exit 1; }
echo "gpu_wheels: $(basename "$WHEEL") ($(du -m "$WHEEL" | cut -f1) MB) in $n parts of <= $PART_MB MB under $DIR;" \
     "build requirements in $DIR/small ($(du -sm "$DIR/small" | cut -f1) MB)" >&2
tree_mb=$(git ls-files -z | du -cm --files0-from=- | tail -n 1 | cut -f1)
echo "gpu_wheels: each transfer carries the working tree (~$tree_mb MB) plus one part: keep it under 64 MiB" >&2
echo "transfer plan (device run calls, back to back while the machine is warm):"
last=$((n - 1))
for i in $(seq 0 "$last"); do
  carry="$DIR/p$i"; cmd="mkdir -p ~/w && cp $DIR/p$i ~/w/"
  [ "$i" = 0 ] && { carry="$carry, $DIR/small"; cmd="$cmd && cp $DIR/small/*.whl ~/w/"; }
  [ "$i" = "$last" ] && cmd="$cmd && WHEELS=~/w tools/gpu_check.sh --out \$OUT   (timeout_s 540)"
  echo "  $((i + 1)). carry [$carry]: $cmd"
done
