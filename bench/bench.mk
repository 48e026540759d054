# Benchmarks (issue 8). The Makefile includes this file after it defines PY and STAMP:
#   include bench/bench.mk
# Both targets print a summary table; results (JSON + PNG) go to bench/results/, runs to runs/bench/.
.PHONY: bench bench-quick

# Drift (10 arms x 3 seeds from one SFT start, 2 runs side by side) and per-phase step overhead.
bench: $(STAMP)
	$(PY) bench/drift.py
	$(PY) bench/overhead.py

# One seed of GRPO, GRPO + AAPA, anchor only and random anchor; a short overhead run.
bench-quick: $(STAMP)
	$(PY) bench/drift.py --quick
	$(PY) bench/overhead.py --quick
