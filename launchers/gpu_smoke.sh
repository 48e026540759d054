#!/usr/bin/env bash
# GPU smoke run: the shipped Qwen3-0.6B staged recipe's layout on ONE GPU for 4 steps, with real vLLM.
# It covers what the CPU end-to-end test (make test-e2e) cannot: CUDA IPC weight sync (colocate_all +
# nccl), packed samples with flash-attn, real vLLM (sampling, logprobs, weight names, sleep/wake),
# gradient checkpointing. Not run in CI. Needs `make install && .venv/bin/pip install -e '.[gpu]'`.
#
#   launchers/gpu_smoke.sh [OUT_DIR]        # default runs/gpu-smoke; MODEL=/local/Qwen3-0.6B to skip the hub
#
# Data: 64 arithmetic prompts with expert responses from the embedded task, a pairwise MiniLM
# discriminator trained on them. Steps: 1-2 SFT + AAPA, 3-4 GRPO + AAPA (checkpoint at step 2).
# The run's rollout log-probs come from vLLM, so `vllm_kl` (vLLM's log-probs against the policy's, logged
# every step) stays small only if every weight sync reached the engine; the check at the end reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-smoke}
MODEL=${MODEL:-Qwen/Qwen3-0.6B}
PY=${PYTHON:-.venv/bin/python}
# The recipe resumes from checkpoints it finds (ckpt.load_enable): a smoke run starts clean or not at all.
if [ -e "$OUT/ckpt" ]; then echo "$OUT/ckpt exists: remove $OUT or pass another OUT_DIR" >&2; exit 2; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

"$PY" - "$OUT" <<'EOF'
import json, random, sys
from aapa_rl.local.task import all_problems, expert_for, prompt_for
out = sys.argv[1]
problems = random.Random(0).sample(all_problems(), 64)
rows = [{"id": f"p{i}", "prompt": prompt_for(*p), "label": {"answer": str(eval("".join(map(str, p)))),
         "expert": expert_for(*p), "prompt": prompt_for(*p)}} for i, p in enumerate(problems)]
for name, part in (("train", rows), ("eval", rows[:8])):
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in part)
with open(f"{out}/experts.jsonl", "w") as f:
    f.writelines(json.dumps({"id": r["id"], "prompt": r["prompt"], "expert": r["label"]["expert"]}) + "\n" for r in rows)
EOF
"$PY" -m aapa_rl.cli discriminator train --experts "$OUT/experts.jsonl" --variant pairwise --encoder minilm --overwrite \
    --out "$OUT/disc"

STAGES='[{"end_step": 2, "objective": "sft", "lam": 1.0, "alpha": 0.1, "rho": 0.25},
         {"end_step": 100, "objective": "grpo", "lam": 1.0, "alpha": 0.1, "rho": 0.25}]'
"$PY" -m aapa_rl.cli launch --config configs/qwen3-0.6b-staged-aapa.yaml -- \
    --actor.model_name_or_path "$MODEL" \
    --actor.num_gpus_per_node 1 --ref.num_gpus_per_node 1 --vllm.num_engines 1 \
    --data.prompt_dataset "$OUT/train.jsonl" --aapa.expert_bank "$OUT/experts.jsonl" --eval.dataset "$OUT/eval.jsonl" \
    --aapa.discriminator "$OUT/disc" --aapa.stages "$STAGES" \
    --data.max_len 512 --rollout.max_new_tokens 128 \
    --rollout.batch_size 16 --rollout.micro_batch_size 16 --train.batch_size 64 --train.micro_batch_size 4 \
    --rollout.n_samples_per_prompt 4 --train.num_episodes 1 --actor.lr_warmup_ratio 0 \
    --algo.advantage.is_correction_level token --algo.advantage.is_correction_mode clip \
    --ckpt.path "$OUT/ckpt" --ckpt.save_steps 2 --ckpt.output_dir "$OUT/final" \
    --logger.tensorboard_dir "$OUT/tensorboard" 2>&1 | tee "$OUT/launch.log"

# What to check, printed per step; exits 1 on the first thing that is wrong.
"$PY" - "$OUT" <<'EOF'
import glob, sys
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = sys.argv[1]
steps = {}
for f in glob.glob(f"{out}/tensorboard/**/events.out.tfevents.*", recursive=True):
    acc = EventAccumulator(f, size_guidance={"scalars": 0}); acc.Reload()
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            steps.setdefault(e.step, {})[tag.removeprefix("train/")] = e.value
keys = ["aapa/stage", "aapa/lambda", "aapa/hard_set_size", "aapa/anchor_loss", "aapa/sft_loss", "vllm_kl",
        "aapa/reward_raw_mean", "aapa/reward_shaped_mean"]
print("step  " + "  ".join(k.removeprefix("aapa/") for k in keys))
for s in sorted(steps):
    print(f"{s:4d}  " + "  ".join(f"{steps[s].get(k, float('nan')):.4g}" for k in keys))
problems = []
if sorted(steps) != [1, 2, 3, 4]:
    problems.append(f"expected 4 logged steps, got {sorted(steps)}")
for s, m in steps.items():
    if not m.get("aapa/anchor_loss", 0) > 0 or m.get("aapa/hard_set_size") != 4:
        problems.append(f"step {s}: anchor loss {m.get('aapa/anchor_loss')} (want > 0), |H| {m.get('aapa/hard_set_size')} (want 4)")
    if s <= 2 and not m.get("aapa/sft_loss", 0) > 0:
        problems.append(f"step {s}: SFT stage without aapa/sft_loss")
    if abs(m.get("vllm_kl", 1.0)) > 0.05:
        problems.append(f"step {s}: vllm_kl {m.get('vllm_kl')}: vLLM's log-probs disagree with the policy's (weight sync?)")
state = torch.load(glob.glob(f"{out}/ckpt/_actor/global_step2/*model_states.pt")[0], weights_only=False)
if state.get("aapa", {}).get("counters", {}).get("anchors") != 8:
    problems.append(f"checkpoint at step 2: AAPA state {state.get('aapa')} (want 8 anchors)")
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(f"{out}/final")
print("\n".join(problems) or "smoke run ok: 4 steps, AAPA terms in every step, vLLM in sync, checkpoint and final model fine")
sys.exit(1 if problems else 0)
EOF
