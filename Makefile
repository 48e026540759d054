# Two commands: `make demo` (the main job) and `make test` (+ `make test-e2e`). All create .venv on first use.
# `make example-real` (configs/real.mk) runs the same loop on a real pretrained model, SmolLM2-135M-Instruct.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-e2e lint demo

install: $(STAMP)

# torch first, pinned, so pip takes the CPU build already on these machines instead of a CUDA one.
# OpenRLHF goes in with --no-deps: its own requirements pull flash-attn and vllm (GPU-only); the
# subset it really needs is listed in pyproject.toml. Re-runs are a no-op until pyproject.toml changes.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# tomllib is Python 3.11+; on 3.10 pip's own copy of tomli reads the file.
	$(PY) -c "import sys; toml = __import__('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli', \
	  fromlist=['load']); p = toml.load(open('pyproject.toml', 'rb'))['project']; \
	  reqs = p['dependencies'] + p['optional-dependencies']['dev'] + p['optional-dependencies']['trl']; \
	  print('\n'.join(r for r in reqs if not r.startswith('openrlhf')))" > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two workers (pytest-xdist), one test file each at a time: the suite is mostly single-threaded.
test: lint
	$(VENV)/bin/pytest -n 2 --dist loadfile

# OpenRLHF's real training loop with AAPA on CPU, every layout (tests/e2e/; ~9 min on 2 cores, plus a
# one-off 5-7 min build of DeepSpeed's CPU ops into $(VENV)/torch_extensions). Not part of `make test`.
test-e2e: $(STAMP)
	$(VENV)/bin/pytest tests/e2e -s

# The main job: SFT-warm a tiny model, train the discriminator, run GRPO and GRPO+AAPA, compare.
# A finished run only reprints its summary; pass DEMO_ARGS=--overwrite to run it again. Output goes to
# runs/demo only; the summary says "not evidence" when plain GRPO did not drift in this run.
demo: $(STAMP)
	$(PY) -m aapa_rl.local.demo --out runs/demo $(DEMO_ARGS)

include bench/bench.mk
include configs/real.mk
