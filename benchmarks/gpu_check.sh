#!/usr/bin/env bash
# Every GPU check in one go, in at most 8 minutes on one GPU (docs/gpu-check.md):
#   embedding throughput through the cache vs encoder only  (benchmarks/embed_throughput.py)
#   k-means and kNN at 1M x 256 in torch                       (benchmarks/gpu_check.py cluster)
#   open_clip_train under torchrun on a 64 px SynthWeb pool     (benchmarks/gpu_check.py train)
# One markdown table of all figures goes to OUT/gpu_check.md, the raw figures beside it
# (gpu_check.json, parts/*.json, parts/*.log). Each part runs under its own time limit; a
# part that fails or runs out of time is a FAILED row with its error, and the rest go on.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine; OUT=$OUT or ./gpu-check-out
#   bash benchmarks/gpu_check.sh --device cpu --out DIR   # toy sizes, this venv (the test)
#
# On cuda it first makes a venv (.gpu-check-venv, --system-site-packages: the machine's
# torch) and installs the wheels of benchmarks/gpu-wheels/ (benchmarks/gpu_check_prepare.sh:
# one folder of <= 64 MiB, every part's) with --no-index --no-deps. --install-only stops
# after that. --fail PART (or GPU_CHECK_FAIL=PART) makes PART (embed, cluster or train)
# fail on purpose: the test of the failed-row path.
set -u

DEVICE=cuda
OUT_DIR=${OUT:-}
FAIL=${GPU_CHECK_FAIL:-}
INSTALL_ONLY=0
BASE_PYTHON=${GPU_CHECK_PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --fail) FAIL=$2; shift 2 ;;
        --python) BASE_PYTHON=$2; shift 2 ;;
        --install-only) INSTALL_ONLY=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cpu|cuda|cuda:*) ;; *) echo "--device cpu or cuda, not $DEVICE" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${OUT_DIR:-$REPO/gpu-check-out}
PARTS=$OUT_DIR/parts
mkdir -p "$PARTS"
rm -f "$PARTS"/*.json "$PARTS"/*.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export SELBENCH_HOME=$WORK/home   # hermetic: pool indexes and caches go with WORK
export TQDM_DISABLE=1
STARTED=$(date +%s)

if [ "$DEVICE" = cpu ]; then   # toy sizes, the current environment
    DEADLINE=$((STARTED + 300))
    POOL_ARGS=(--n-samples 300 --set n_retrieval=20 --set n_classification=20
               --set n_target=20 --set n_reasoning_train=0 --set n_reasoning_test=0)
    EMBED_ARGS=(--repeats 1 --model selbench-tiny)
    CLUSTER_ARGS=(--n 2000 --dim 32 --components 20 --k 16 --niter 5 --knn-budget-s 10)
    TRAIN_ARGS=(--size toy --batch 32 --steps 4 --workers 1)
    T_POOL=60 T_EMBED=90 T_CLUSTER=60 T_TRAIN=120
    USE_VENV=${GPU_CHECK_USE_VENV:-0}   # 1: the wheel install path on the CPU (docs/gpu-check.md)
    PYTHON=python
else
    DEADLINE=$((STARTED + 470))    # 8 minutes, less the table and some slack
    POOL_ARGS=(--n-samples 8000 --set n_retrieval=100 --set n_classification=100
               --set n_target=100 --set n_reasoning_train=0 --set n_reasoning_test=0)
    EMBED_ARGS=(--repeats 3 --model "${GPU_CHECK_EMBED_MODEL:-selbench-tiny}")
    CLUSTER_ARGS=(--n 1000000 --dim 256 --k 1024 --niter 20 --knn-budget-s 40)
    TRAIN_ARGS=(--size gpu --batch 512 --steps 200 --workers 8)
    T_POOL=50 T_EMBED=110 T_CLUSTER=100 T_TRAIN=150
    USE_VENV=1
fi

if [ "$USE_VENV" = 1 ]; then
    # -- the environment: the machine's Python and torch, our wheels beside them ----------
    VENV=${GPU_CHECK_VENV:-$REPO/.gpu-check-venv}
    INSTALL_LOG=$PARTS/install.log
    (
        set -e
        [ -x "$VENV/bin/python" ] || "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
        dir=${GPU_WHEELS:-$REPO/benchmarks/gpu-wheels}
        [ -d "$dir" ] || { echo "no wheel folder $dir: make it with benchmarks/gpu_check_prepare.sh"; exit 1; }
        wheels=()
        for wheel in "$dir"/*.whl; do
            [ -e "$wheel" ] || continue
            dist=$(basename "$wheel" | cut -d- -f1)
            # The machine's own numpy 2 / torchvision / pillow stay (they match its torch).
            case "$dist" in
                numpy) "$VENV/bin/python" -c 'import numpy, sys; sys.exit(int(numpy.__version__.split(".")[0]) < 2)' 2>/dev/null && continue ;;
                torchvision|pillow) "$VENV/bin/python" -c "import ${dist/pillow/PIL}" 2>/dev/null && continue ;;
            esac
            wheels+=("$wheel")
        done
        echo "$dir: installing ${#wheels[@]} wheel(s)"
        [ ${#wheels[@]} -eq 0 ] || "$VENV/bin/python" -m pip install -q --no-index --no-deps \
            --disable-pip-version-check --find-links "$dir" "${wheels[@]}"
        cd / && "$VENV/bin/python" -c 'import selbench, torch; print("selbench", selbench.__file__, "torch", torch.__version__)'
    ) > "$INSTALL_LOG" 2>&1
    install_rc=$?
    tail -n 3 "$INSTALL_LOG"
    if [ $install_rc -ne 0 ]; then
        echo "wheel installation failed (log: $INSTALL_LOG); the parts will run and fail" >&2
    fi
    [ $INSTALL_ONLY = 1 ] && exit $install_rc
    PYTHON=$VENV/bin/python
    export PATH="$VENV/bin:$PATH"
fi
INSTALL_S=$(($(date +%s) - STARTED))

# run_part NAME LIMIT_S COMMAND...: COMMAND must write $PARTS/NAME.json; otherwise (an error,
# the time limit, or --fail NAME) the part's JSON is {"error": ...} from its exit and log.
run_part() {
    local name=$1 limit=$2 rc msg left started
    shift 2
    started=$(date +%s)
    left=$((DEADLINE - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    [ "$FAIL" = "$name" ] && set -- "$PYTHON" -c "raise SystemExit('failed on purpose (--fail $name)')"
    echo "== $name (limit ${limit}s)"
    if [ "$limit" -lt 5 ]; then
        rc=124 ; echo "no time left" > "$PARTS/$name.log"
    else
        timeout -k 10 "$limit" "$@" > "$PARTS/$name.log" 2>&1
        rc=$?
    fi
    if [ $rc -ne 0 ] || [ ! -s "$PARTS/$name.json" ]; then
        msg=$(grep -v '^[[:space:]]*$' "$PARTS/$name.log" | tail -n 3 | tr '\n\t' '  ' \
              | tr -d '"\\\000-\037' | cut -c1-400)
        [ $rc -eq 124 ] || [ $rc -eq 137 ] && msg="timed out after ${limit}s; $msg"
        printf '{"error": "exit %s: %s"}\n' "$rc" "$msg" > "$PARTS/$name.json"
        echo "   FAILED: exit $rc (log: $PARTS/$name.log)"
    fi
    SECONDS_PER_PART="$SECONDS_PER_PART $name $(($(date +%s) - started)) s,"
}
SECONDS_PER_PART=""

POOL=$WORK/synthweb-64
pool_started=$(date +%s)
echo "== pool (SynthWeb at 64 px)"
timeout -k 10 "$T_POOL" "$PYTHON" "$REPO/benchmarks/gpu_check.py" pool --image-size 64 \
    "${POOL_ARGS[@]}" --out "$POOL" --json "$PARTS/pool.json" > "$PARTS/pool.log" 2>&1
pool_rc=$?
pool_s=$(($(date +%s) - pool_started))
SECONDS_PER_PART="install $INSTALL_S s, pool $pool_s s,"

# --reader tar: the pool's shards read without selbench.pools, whose index needs pyarrow;
# PNGs decode with PIL where OpenCV is absent. Neither is among the wheels (docs/gpu-check.md).
run_part embed "$T_EMBED" "$PYTHON" "$REPO/benchmarks/embed_throughput.py" --pool "$POOL" \
    --reader tar --device "$DEVICE" "${EMBED_ARGS[@]}" --json "$PARTS/embed.json"
run_part cluster "$T_CLUSTER" "$PYTHON" "$REPO/benchmarks/gpu_check.py" cluster \
    --device "$DEVICE" "${CLUSTER_ARGS[@]}" --json "$PARTS/cluster.json"
run_part train "$T_TRAIN" "$PYTHON" "$REPO/benchmarks/gpu_check.py" train --pool "$POOL" \
    --work "$WORK" --device "$DEVICE" "${TRAIN_ARGS[@]}" --json "$PARTS/train.json"

# -- the table ----------------------------------------------------------------------------
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n1)
versions=$("$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)' 2>/dev/null)
pool_state="SynthWeb ${POOL_ARGS[1]} samples at 64 px, generated in ${pool_s} s"
[ $pool_rc -eq 0 ] || pool_state="FAILED (exit $pool_rc): $(tail -n 2 "$PARTS/pool.log" | tr '\n' ' ' | tr -d '"\\')"
"$PYTHON" - "$PARTS/meta.json" <<EOF
import json, sys
meta = {
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "device": "$DEVICE",
    "gpu": "${gpu:-none}",
    "python / torch": "${versions:-unknown}",
    "k-means and kNN": "torch on the device (faiss-gpu's wheel is too large to carry; selbench's own are faiss)",
    "pool": """$pool_state""",
    "seconds": "${SECONDS_PER_PART} total $(($(date +%s) - STARTED)) s",
}
open(sys.argv[1], "w").write(json.dumps(meta, indent=1))
EOF
"$PYTHON" "$REPO/benchmarks/gpu_check.py" table --parts "$PARTS" --out "$OUT_DIR/gpu_check.md"
