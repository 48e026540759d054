#!/usr/bin/env bash
# Submit an AAPA (or baseline) recipe to a running Ray cluster with `ray job submit`.
# The runtime environment (launchers/runtime_env.yaml) ships the plugin, the reward functions, the recipes
# and the data files to every node; the job then runs `aapa-rl launch` on the head node, which starts
# OpenRLHF's train_ppo_ray with the AAPA classes injected.
#
#   RAY_ADDRESS=http://HEAD_IP:8265 launchers/submit.sh configs/qwen3-0.6b-grpo-aapa.yaml [extra flags]
#   launchers/submit.sh configs/qwen3-0.6b-staged-aapa.yaml --actor.num_nodes 2 --ref.num_nodes 2 \
#       --vllm.num_engines 16                                          # the two-node layout
#
# Extra flags (OpenRLHF's or --aapa.*) are appended to the recipe's and override it. The recipe is checked
# here first (files, GPU layout, batch sizes, discriminator AUROC) and nothing is submitted if it fails.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:-}
if [[ -z "$CONFIG" ]]; then
    echo "usage: launchers/submit.sh configs/RECIPE.yaml [extra OpenRLHF / --aapa.* flags]" >&2
    exit 2
fi
shift
# Ray joins the job's command for a shell with Windows quoting rules (subprocess.list2cmdline), so a value
# with quotes, braces, `$`, `|` or newlines (JSON stages, a chat template) would reach the job changed.
SAFE='^[A-Za-z0-9_./:=@%+, -]*$'
for arg in "$@"; do
    if [[ ! $arg =~ $SAFE ]]; then
        echo "launchers/submit.sh: $(printf %q "$arg") would not reach the job intact (ray job submit re-quotes" \
            "the command for a shell); set it in a copy of the recipe, which travels as a file" >&2
        exit 2
    fi
done
# The project's environment (make install) when there is one, else the python3 on PATH.
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}

# The job runs in Ray's temporary copy of this checkout: --output-root keeps checkpoints, the final model and
# TensorBoard logs here (on shared storage when the run spans several nodes).
"$PYTHON" -m aapa_rl.cli launch --config "$CONFIG" --output-root "$PWD" --dry-run -- "$@"
# .gitignore names runs/, where the recipes' discriminator lives: without this variable Ray's client
# leaves it out of the working_dir. launchers/runtime_env.yaml's excludes keep run outputs out instead.
RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
    --runtime-env launchers/runtime_env.yaml \
    -- python3 -m aapa_rl.cli launch --config "$CONFIG" --output-root "$PWD" -- "$@"
