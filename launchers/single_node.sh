#!/usr/bin/env bash
# Run a recipe on this machine alone (one node, e.g. 8 GPUs): no cluster to start, OpenRLHF starts a local
# Ray instance itself. The recipe is checked first; flags after the recipe override it.
#
#   launchers/single_node.sh configs/qwen3-0.6b-grpo-aapa.yaml
#   launchers/single_node.sh configs/qwen3-0.6b-grpo.yaml --actor.num_gpus_per_node 4 \
#       --ref.num_gpus_per_node 4 --vllm.num_engines 4                 # a 4-GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:-}
if [[ -z "$CONFIG" ]]; then
    echo "usage: launchers/single_node.sh configs/RECIPE.yaml [extra OpenRLHF / --aapa.* flags]" >&2
    exit 2
fi
shift
# The project's environment (make install) when there is one, else the python3 on PATH.
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
mkdir -p runs

"$PYTHON" -m aapa_rl.cli launch --config "$CONFIG" --dry-run -- "$@"
"$PYTHON" -m aapa_rl.cli launch --config "$CONFIG" -- "$@" 2>&1 | tee "runs/$(basename "$CONFIG" .yaml).log"
