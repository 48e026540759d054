#!/usr/bin/env bash
# Start the Ray head on this node. Run it on the node that will also run the trainer (the `aapa-rl launch`
# process); then start every other node with launchers/ray_worker.sh HEAD_IP.
#
#   launchers/ray_head.sh                      # 8 GPUs here, GCS on port 6379, job API on port 8265
#   GPUS_PER_NODE=4 launchers/ray_head.sh
#
# Needs: the environment where aapa-rl is installed (`ray` on PATH), the same on every node.
set -euo pipefail
# Ray workers start in the raylet's directory unless a job ships a working_dir: from the checkout, the
# recipes' relative paths (reward_fns/, runs/<disc>, data/) resolve there for a plain `aapa-rl launch`.
cd "$(dirname "$0")/.."

HEAD_IP=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}

ray start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" --num-gpus "$GPUS_PER_NODE" \
    --dashboard-host 0.0.0.0 --dashboard-port "$DASHBOARD_PORT"
echo "Ray head at $HEAD_IP:$RAY_PORT; on each worker node run: launchers/ray_worker.sh $HEAD_IP"
echo "submit with: RAY_ADDRESS=http://$HEAD_IP:$DASHBOARD_PORT launchers/submit.sh configs/RECIPE.yaml"
