# make example-real (issue 19, docs/real-model.md): SmolLM2-135M-Instruct end to end on CPU, into runs/real.
# The Makefile includes this file after it defines VENV, PY and STAMP. Each step writes its files and make
# skips a step whose files are there, so a rerun resumes; sampling and RL also resume inside their step.
# The sizes keep the run near 20 minutes on 2 cores (docs/real-model.md: its step times); each can be set on
# the command line.
.PHONY: example-real

SHELL := /bin/bash
AAPA := $(VENV)/bin/aapa-rl
REAL := runs/real
# prompts per base request: 32 training and 8 held-out requests
REAL_PER_REQUEST ?= 3
# best-of-n samples per prompt
REAL_N ?= 4
# most new tokens of every sample, rollout and eval
REAL_TOKENS ?= 96
# more `--set key=value` for both RL runs
REAL_TRAIN_ARGS ?=
# GNU time appends each step's wall time to runs/real/times.txt (the summary shows it)
TIME = $(if $(wildcard /usr/bin/time),/usr/bin/time -a -o $(REAL)/times.txt -f "$@: %e s")
# SmolLM2's chat template written out, its default system turn included: the local trainer gives the model
# prompts as they are, so the data carry the markup ($'...': bash's quotes for the newlines).
PROMPT_FLAGS := --prompt-template $$'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
trained by Hugging Face<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n'
LABEL_FLAGS := --instruction-ids-key instruction_id_list --kwargs-key kwargs
DISCS := $(foreach e,minilm hash,$(foreach v,cosine pairwise classifier aligned,$(REAL)/disc/$(e)-$(v)/report.txt))
RL_DISC := $(REAL)/disc/minilm-pairwise

example-real: $(REAL)/summary.md
	@cat $<

$(REAL)/model: | $(STAMP)
	mkdir -p $(REAL)
	ln -sfn "$$($(AAPA) model get smollm2-135m-instruct)" $@

$(REAL)/task/train.jsonl: | $(STAMP)
	$(PY) -m aapa_rl.local.ifeval_task --out $(REAL)/task --per-request $(REAL_PER_REQUEST)

# Best-of-n samples of the model itself, for the training and the held-out prompts (a real run would sample
# a stronger teacher). The file grows batch by batch, so the stamp says when it is complete.
$(REAL)/samples/%.done: $(REAL)/task/train.jsonl $(REAL)/model
	$(TIME) $(AAPA) generate --model $(REAL)/model --prompts $(REAL)/task/$*.jsonl $(PROMPT_FLAGS) \
	  --no-chat-template -n $(REAL_N) --temperature 1.0 --max-new-tokens $(REAL_TOKENS) \
	  --output $(REAL)/samples/$*.jsonl
	touch $@
.SECONDARY: $(REAL)/samples/train.done $(REAL)/samples/eval.done

# Each prompt's best sample that follows every instruction (reward 1).
$(REAL)/experts/%.jsonl: $(REAL)/samples/%.done
	$(TIME) $(AAPA) build-experts --samples $(REAL)/samples/$*.jsonl --prompts $(REAL)/task/$*.jsonl \
	  $(PROMPT_FLAGS) $(LABEL_FLAGS) --reward ifeval --output $@

# The trainer's files: training prompts (all kept, with or without an expert), the expert bank, and the
# held-out prompts with their experts in the labels (--eval-size 0: the task already holds them out).
$(REAL)/data/report.json: $(REAL)/experts/train.jsonl
	$(AAPA) prepare-data --prompts $(REAL)/task/train.jsonl --experts $< --eval-size 0 \
	  --missing-expert keep --out-dir $(@D) $(PROMPT_FLAGS) $(LABEL_FLAGS)
$(REAL)/heldout/report.json: $(REAL)/experts/eval.jsonl
	$(AAPA) prepare-data --prompts $(REAL)/task/eval.jsonl --experts $< --eval-size 0 \
	  --missing-expert keep --out-dir $(@D) $(PROMPT_FLAGS) $(LABEL_FLAGS)

# Every variant on both encoders: experts vs the model's own samples and the generic negatives, with
# held-out AUROC per negative type (samples of prompts without an expert have nothing to compare with:
# --allow-skips skips them, counted apart from malformed rows). make reruns a step only when its inputs
# changed, so --overwrite replaces a discriminator trained on the old data.
$(REAL)/disc/%/report.txt: $(REAL)/data/report.json
	$(TIME) $(AAPA) discriminator train --encoder $(firstword $(subst -, ,$*)) \
	  --variant $(lastword $(subst -, ,$*)) --experts $(REAL)/data/experts.jsonl \
	  --rollouts $(REAL)/samples/train.jsonl --allow-skips --overwrite --out $(@D)

$(REAL)/start/eval.jsonl: $(REAL)/heldout/report.json $(RL_DISC)/report.txt
	$(TIME) $(AAPA) eval --checkpoint $(REAL)/model --data $(REAL)/heldout/train.jsonl --reward ifeval \
	  --discriminator $(RL_DISC) --max-new-tokens $(REAL_TOKENS) --out $(@D)/eval.json

# A run with a checkpoint resumes from it; one without starts over.
$(REAL)/grpo/summary.json $(REAL)/grpo-aapa/summary.json: $(REAL)/%/summary.json: configs/real-%.yaml \
  $(REAL)/data/report.json $(REAL)/heldout/report.json $(RL_DISC)/report.txt
	$(TIME) $(AAPA) train --config $< --set rollout.max_new_tokens=$(REAL_TOKENS) $(REAL_TRAIN_ARGS) \
	  $$(ls -d $(@D)/checkpoints/step_*[0-9] >/dev/null 2>&1 && echo --resume || echo --overwrite)

$(REAL)/summary.md: $(DISCS) $(REAL)/start/eval.jsonl $(REAL)/grpo/summary.json $(REAL)/grpo-aapa/summary.json
	$(PY) -m aapa_rl.local.real_summary --out $(REAL)
