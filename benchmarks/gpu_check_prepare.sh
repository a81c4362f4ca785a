#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the GPU machine (docs/gpu-check.md), which
# has Python 3.12 and torch 2.11 but no network and none of selbench's other packages.
#
#   bash benchmarks/gpu_check_prepare.sh               # benchmarks/gpu-wheels/ (<= 64 MiB)
#   bash benchmarks/gpu_check_prepare.sh --embedding   # also gpu-wheels-extra-{1,2,3}/
#
# Only what the check's code paths import, each wheel with --no-deps, at the versions
# constraints.txt pins (CI's tested set), as cp312 manylinux x86_64 or pure-Python wheels:
# selbench itself (pip wheel --no-deps .), open_clip_torch (open_clip_train is inside it)
# and what open_clip, open_clip_train.data (pandas), selbench.configs/cache/progress and
# huggingface_hub import, plus numpy, pillow and torchvision 0.26 (torch 2.11's), which the
# install skips where the machine has its own: 56 MiB, for the k-means/kNN and training
# parts. selbench's other dependencies (MLflow, scikit-learn, ...) are not imported by the
# check and stay out. The embedding part also needs pyarrow (48 MiB), opencv (61 MiB) and
# faiss-cpu (18 MiB); --embedding packs them into gpu-wheels-extra-N/ folders of <= 64 MiB,
# each staged on the warm machine by a call of its own (docs/gpu-check.md).
# Fails when a folder is over 64 MiB (what one device call may carry). Env: PYTHON_VERSION
# (3.12), TORCHVISION (0.26.0), PLATFORM (manylinux_2_28_x86_64).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
TORCHVISION=${TORCHVISION:-0.26.0}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
DEST=${GPU_WHEELS:-$REPO/benchmarks/gpu-wheels}
LIMIT=$((64 * 1024 * 1024))
EMBEDDING=0
[ "${1:-}" = --embedding ] && EMBEDDING=1

CORE=(
    open_clip_torch timm huggingface_hub httpx2 httpcore2 h11 anyio idna certifi truststore
    safetensors ftfy wcwidth regex tqdm webdataset braceexpand fsspec PyYAML pydantic
    pydantic_core annotated-types typing-inspection typing_extensions rich markdown-it-py
    mdurl Pygments click pluggy filelock packaging pandas python-dateutil six cloudpickle
    numpy pillow
)

# The embedding cache's pool index (pyarrow), decoder (opencv) and the open_clip embedder's
# plugin, which imports selbench.toolbox and so selbench.neighbours (faiss, threadpoolctl).
EMBEDDING_EXTRA=(pyarrow opencv-python-headless faiss-cpu threadpoolctl)

pinned() {  # NAME -> NAME==VERSION from constraints.txt (NAME alone when unpinned)
    local line
    line=$(grep -i "^$1==" "$REPO/constraints.txt" | head -n 1 || true)
    echo "${line:-$1}"
}

py_tag=${PYTHON_VERSION/./}
download() {  # DEST REQUIREMENT...
    local dest=$1
    shift
    python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PYTHON_VERSION" --implementation cp \
        --abi "cp$py_tag" --abi abi3 --abi none \
        --platform "$PLATFORM" --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$dest" "$@"
}

check_size() {  # DIR: list its wheels, fail when over the limit
    local dir=$1 total
    total=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f1)
    ls -1 "$dir" | sed 's/^/  /'
    printf '%s: %d wheels, %.1f MiB (limit 64 MiB)\n' "$dir" "$(ls -1 "$dir"/*.whl | wc -l)" \
        "$(python -c "print($total / 1048576)")"
    if [ "$total" -gt "$LIMIT" ]; then
        echo "$dir is over 64 MiB" >&2
        return 1
    fi
}

rm -rf "$DEST"
mkdir -p "$DEST"
requirements=("torchvision==$TORCHVISION")
for name in "${CORE[@]}"; do requirements+=("$(pinned "$name")"); done
download "$DEST" "${requirements[@]}"
isolation=()
python -c 'import hatchling' 2>/dev/null && isolation=(--no-build-isolation)
python -m pip wheel -q --disable-pip-version-check --no-deps "${isolation[@]}" -w "$DEST" "$REPO"
check_size "$DEST"

if [ $EMBEDDING = 1 ]; then
    # First fit, largest first, into gpu-wheels-extra-1/, -2/, ... of <= 64 MiB each.
    rm -rf "$REPO"/benchmarks/gpu-wheels-extra-*
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    requirements=()
    for name in "${EMBEDDING_EXTRA[@]}"; do requirements+=("$(pinned "$name")"); done
    download "$staging" "${requirements[@]}"
    python - "$staging" "$REPO/benchmarks/gpu-wheels-extra" "$LIMIT" <<'EOF_PY'
import shutil, sys
from pathlib import Path
staging, prefix, limit = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
bins: list[list] = []
for wheel in sorted(staging.glob("*.whl"), key=lambda w: -w.stat().st_size):
    size = wheel.stat().st_size
    fit = next((b for b in bins if b[0] + size <= limit), None)
    if fit is None:
        fit = [0, Path(f"{prefix}-{len(bins) + 1}")]
        fit[1].mkdir(parents=True)
        bins.append(fit)
    fit[0] += size
    shutil.move(str(wheel), fit[1] / wheel.name)
EOF_PY
    for extra in "$REPO"/benchmarks/gpu-wheels-extra-*/; do check_size "${extra%/}"; done
fi
