#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the GPU machine (docs/gpu-check.md), which
# has Python 3.12 and torch 2.11 but no network and none of selbench's other packages.
#
#   bash benchmarks/gpu_check_prepare.sh               # benchmarks/gpu-wheels/ (<= 64 MiB)
#
# One folder for every part, carried in one device call. Only what the check's code paths
# import, each wheel with --no-deps, at the versions constraints.txt pins (CI's tested set),
# as cp312 manylinux x86_64 or pure-Python wheels: selbench itself (pip wheel --no-deps .),
# open_clip_torch (open_clip_train is inside it) and what open_clip, open_clip_train.data
# (pandas), selbench.configs/cache/progress and huggingface_hub import, plus numpy, pillow
# and torchvision 0.26 (torch 2.11's), which the install skips where the machine has its
# own. selbench's other dependencies (MLflow, scikit-learn, ...) are not imported by the
# check and stay out, and so are pyarrow, opencv and faiss (48, 61 and 18 MiB): the
# embedding part reads the pool's shards without selbench.pools (embed_throughput.py
# --reader tar), decodes PNGs with PIL where OpenCV is absent, and faiss is imported only
# where selbench clusters or searches (selbench/neighbours.py), which the check does in
# torch. --embedding, which once packed those three into extra folders, is accepted and
# does nothing. Fails when the folder is over 64 MiB (what one device call may carry).
# Env: PYTHON_VERSION (3.12), TORCHVISION (0.26.0), PLATFORM (manylinux_2_28_x86_64),
# GPU_WHEELS (the folder).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
TORCHVISION=${TORCHVISION:-0.26.0}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
DEST=${GPU_WHEELS:-$REPO/benchmarks/gpu-wheels}
LIMIT=$((64 * 1024 * 1024))
case "${1:-}" in
    "") ;;
    --embedding) echo "--embedding is no longer needed: $DEST holds every part's wheels" >&2 ;;
    *) echo "unknown argument: $1 (no arguments: docs/gpu-check.md)" >&2; exit 2 ;;
esac

CORE=(
    open_clip_torch timm huggingface_hub httpx2 httpcore2 h11 anyio idna certifi truststore
    safetensors ftfy wcwidth regex tqdm webdataset braceexpand fsspec PyYAML pydantic
    pydantic_core annotated-types typing-inspection typing_extensions rich markdown-it-py
    mdurl Pygments click pluggy filelock packaging pandas python-dateutil six cloudpickle
    numpy pillow
)

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

