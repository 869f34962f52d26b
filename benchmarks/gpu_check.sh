#!/usr/bin/env bash
# The GPU check in one command, for a lent device machine (one GPU, at most 8 minutes):
#
#   bash benchmarks/gpu_check.sh            # there: benchmarks/gpu.py, results under $OUT
#   bash benchmarks/gpu_check.sh --wheels   # here, beforehand: the wheels the device image lacks
#   GPU_CHECK_DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_check.sh   # the same on CPU, tiny (the test runs this)
#
# The device machine reaches no package registry (.library/device/README.md): its image has python3 with torch,
# numpy, pandas, pyarrow, scipy, scikit-learn, pyyaml, psutil, ninja and nvidia-ml-py, not erc's pydantic nor
# DeepSpeed (and its hjson). `--wheels`, run where pip reaches PyPI, puts them (the lock's versions, for the image's
# CPython 3.12) in benchmarks/results/wheels, which the device call then carries:
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/results/wheels"], timeout_s=540)
# Without them the check says what is missing and runs what it can (no DeepSpeed: the DDP ways only).
# Left under $OUT: gpu.json, gpu.md (the table), log.txt, nvidia-smi.txt (nvidia-smi -q), pip-freeze.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/results/wheels
lock() { grep -i "^$1==" requirements.lock | head -1; }

if [[ "${1:-}" == "--wheels" ]]; then
    mkdir -p "$WHEELS" && rm -f "$WHEELS"/*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "$(lock pydantic)" "$(lock pydantic_core)" "$(lock annotated-types)" \
        "$(lock typing-inspection)" "$(lock hjson)" || exit 1
    # DeepSpeed is published as source only: a pure-Python wheel of it (its ops compile at first use, if ever)
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$WHEELS" "$(lock deepspeed)" || exit 1
    ls -l "$WHEELS"
    exit 0
fi

OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
PY=${GPU_CHECK_PYTHON:-python3}  # the device image's python3 holds torch; the test names its own interpreter
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
missing() {
    $PY -c 'import importlib.util as u; print(*[n for n in ["torch", "numpy", "pandas", "pyarrow", "yaml",
        "pydantic", "sklearn", "scipy", "deepspeed"] if u.find_spec(n) is None])'
}
missing=$(missing)
if [[ -n "$missing" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
        "$WHEELS"/*.whl && export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
    missing=$(missing)
fi
ways=()
if [[ -n "$missing" ]]; then
    echo "missing here: $missing (bash benchmarks/gpu_check.sh --wheels where pip reaches PyPI; carry $WHEELS)"
    if [[ "$missing" != deepspeed ]]; then
        echo "cannot run without them"
        exit 1
    fi
    ways=(--ways ddp_fp32 ddp_bf16_compile)  # DeepSpeed alone missing: the DDP ways still say something
    echo "running without DeepSpeed: ${ways[*]}"
fi
$PY -m pip freeze >"$OUT/pip-freeze.txt" 2>&1
if command -v nvidia-smi >/dev/null; then nvidia-smi -q >"$OUT/nvidia-smi.txt" 2>&1; fi

if [[ -n "${GPU_CHECK_DRY_RUN:-}" ]]; then
    args=(--dry-run)
    limit=300
else
    args=(--budget "${GPU_CHECK_BUDGET:-400}")
    limit=450  # the budget plus start-up and the last case: inside 8 minutes
fi
timeout "$limit" $PY benchmarks/gpu.py "${args[@]}" "${ways[@]}" --out "$OUT/gpu.json"
status=$?
[[ $status -eq 124 ]] && echo "benchmarks/gpu.py ran past ${limit} s and was stopped"
exit $status
