#!/usr/bin/env bash
# The one device command for "READ at H200 speed" (run from the repository root on the H200, after
# bench/device_prep.sh here; carry .whl and .devbin):
#   run(command="bash bench/device_run.sh", carry=[".whl", ".devbin"], timeout_s=600)
# Installs the carried wheels, puts the carried redis-server on PATH, and runs bench/gpu_throughput.py, which
# writes $OUT/gpu_throughput.json after every row (rows that finish survive a timeout). Whatever it prints also
# goes to $OUT/gpu_throughput.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # absent when trying this script on the development machine, whose venv has them
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "device_run: the carried wheels did not install" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
if [ -x .devbin/redis-server ]; then
    export LD_LIBRARY_PATH=$PWD/.devbin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    redis=(--redis-server "$PWD/.devbin/redis-server")
else
    redis=()
fi
# Rows (b) and (d) measure the levers as a worker would run them: every non-compile lever on, unless the
# caller's environment says otherwise (no lever is a CUDA default before these figures exist).
for lever in READAR_DEVICE_FRAMES READAR_PINNED READAR_OVERLAP READAR_CUDA_EVENTS READAR_PREFIX_CACHE \
             READAR_STATIC_CACHE READAR_SAM_ATTENTION READAR_SAM_STREAM; do
    export "$lever=${!lever:-on}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 560 python3 bench/gpu_throughput.py --out "${OUT:-.}/gpu_throughput.json" "${redis[@]}" "$@" 2>&1 \
    | tee "${OUT:-.}/gpu_throughput.log"
