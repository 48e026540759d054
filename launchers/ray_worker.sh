#!/usr/bin/env bash
# Join this node to a Ray cluster started by launchers/ray_head.sh.
#
#   launchers/ray_worker.sh HEAD_IP            # 8 GPUs here
#   GPUS_PER_NODE=4 launchers/ray_worker.sh 10.0.0.1
set -euo pipefail
# Ray workers start in the raylet's directory unless a job ships a working_dir: from the checkout, the
# recipes' relative paths (reward_fns/, runs/<disc>, data/) resolve there for a plain `aapa-rl launch`.
cd "$(dirname "$0")/.."

HEAD_IP=${1:-${HEAD_IP:-}}
if [[ -z "$HEAD_IP" ]]; then
    echo "usage: launchers/ray_worker.sh HEAD_IP" >&2
    exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RAY_PORT=${RAY_PORT:-6379}

ray start --address "$HEAD_IP:$RAY_PORT" --num-gpus "$GPUS_PER_NODE"
