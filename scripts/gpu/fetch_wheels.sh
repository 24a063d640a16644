#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, what a GPU device call carries (scripts/gpu/README.md):
#   .whl/  the wheels the device image lacks, for its CPython 3.12 on x86-64 Linux: grain and what it needs
#          that the image does not have (array_record, dill, portpicker), tensorboardX, and pydantic (the
#          shard manifest's schema) with pydantic_core, annotated_types, typing_inspection and a recent
#          typing_extensions (pydantic 2.14 imports typing_extensions.Sentinel). That list is
#          an import trace (python -X importtime) of `python -m fgpt_jax.data text`, `python -m
#          fgpt_jax.train`, scripts/bench_train.py and probe.py after-run, less the image's packages
#          (/work/.library/device/KINDS.md); `datasets` is imported only for Hub/local-file tokenisation,
#          which the check does not use.
#          .whl/optional/ holds flax 0.12.8, installed by check.py only if the image's flax is not 0.12.x.
#   .gpu/  the Gutenberg books (gutenberg/*.txt) and the full HellaSwag file, from REFERENCE_DIR: the folder
#          holding data/gutenberg_classics/*.txt and data/hellaswag/hellaswag_val_full.txt.bz2 (a developer
#          machine has it beside the checkout). The PyTorch peer is in the repository (torch_peer.py).
# Both folders are git-ignored (.gitignore, and .git/info/exclude so untracked files never travel twice).
# Then checks that the working tree plus both folders stay under the device's 64 MiB transfer limit.
#
#   bash scripts/gpu/fetch_wheels.sh REFERENCE_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 1 ] || { echo "error: REFERENCE_DIR: expected one argument, the folder with data/" >&2; exit 2; }
SHARED=$1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LIMIT=$((64 * 1024 * 1024))
# Versions: those the CPU test suite runs with (pyproject's ranges admit them).
WHEELS=(grain==0.2.18 array_record==0.8.6 dill==0.4.1 portpicker==1.6.0 tensorboardX==2.6.5
        pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
        typing_extensions==4.16.0)  # pydantic 2.14 needs a newer one than an image may have
OPTIONAL=(flax==0.12.8)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

f="$SHARED/data/hellaswag/hellaswag_val_full.txt.bz2"
[ -f "$f" ] || { echo "error: $f: not found (REFERENCE_DIR must hold data/)" >&2; exit 2; }
ls "$SHARED"/data/gutenberg_classics/*.txt >/dev/null 2>&1 ||
  { echo "error: $SHARED/data/gutenberg_classics: no .txt books" >&2; exit 2; }

# Build both folders beside the real ones, then swap them in: an interrupted fetch leaves the old ones.
rm -rf .whl.tmp .gpu.tmp
mkdir -p .whl.tmp/optional .gpu.tmp/gutenberg
download() {  # download DEST NAME==VERSION...
  local dest=$1; shift
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dest" "$@"
}
download .whl.tmp "${WHEELS[@]}"
download .whl.tmp/optional "${OPTIONAL[@]}"
cp "$SHARED"/data/gutenberg_classics/*.txt .gpu.tmp/gutenberg/
cp "$SHARED/data/hellaswag/hellaswag_val_full.txt.bz2" .gpu.tmp/
rm -rf .whl .gpu
mv .whl.tmp .whl
mv .gpu.tmp .gpu
exclude=$(git rev-parse --git-path info/exclude)  # a checkout whose .gitignore predates the two folders
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.gpu/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done

# What a device call sends: tracked files, untracked files git does not ignore, and the carried folders.
tree=$( { git ls-files -z --cached; git ls-files -z --others --exclude-standard; } | sort -zu |
        xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=$(find .whl .gpu -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((tree + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels:"; ls -1 .whl/*.whl .whl/optional/*.whl | sed 's/^/  /'
echo "assets: $(ls .gpu/gutenberg | wc -l) books in .gpu/gutenberg, .gpu/hellaswag_val_full.txt.bz2"
echo "transfer: working tree $(mib "$tree") + .whl/.gpu $(mib "$carried") = $(mib "$total") of 64 MiB"
if [ "$total" -gt "$LIMIT" ]; then
  echo "error: the device call would send $(mib "$total"), over its 64 MiB limit" >&2
  exit 1
fi
