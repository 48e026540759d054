# Benchmarks (issues 8, 17 and 18). The Makefile includes this file after it defines PY and STAMP:
#   include bench/bench.mk
# Every target prints a summary table. Runs and results go to runs/bench/ (results: runs/bench/results/);
# BENCH_ARGS=--publish writes the results to the committed bench/results/ instead.
.PHONY: bench bench-quick bench-trl bench-selection

# Drift (5 arms x 3 SFT starts x 2 RL seeds, 2 runs side by side) and per-phase step overhead.
bench: $(STAMP)
	$(PY) bench/drift.py $(BENCH_ARGS)
	$(PY) bench/overhead.py $(BENCH_ARGS)

# GRPO and GRPO + AAPA from the 3 SFT starts, one RL seed, the first 60 steps of the full bench's runs
# (the per-phase overhead is `make bench`'s, or `bench/overhead.py --quick` by hand).
bench-quick: $(STAMP)
	$(PY) bench/drift.py --quick $(BENCH_ARGS)

# The drift bench's GRPO and GRPO + AAPA arms through TRL (3 SFT starts x RL seed 1) and their overhead.
bench-trl: $(STAMP)
	$(PY) bench/trl_drift.py $(BENCH_ARGS)

# Selections at equal anchor budget on a prompt-specific flaw (issue 18): GRPO + 4 selections x 5 budgets, x 3
# SFT starts x RL seed 1, 2 runs side by side (63 runs, about 55 min). drop_steps_on_sub only: plain GRPO does
# not drift on repeat_on_mul (120 or 240 steps: bench/results/selection-sweep.md), and repeat_on_sub's sweep
# (round 5 there) is another 63 runs: `$(PY) bench/selection.py --flaws repeat_on_sub`. BENCH_ARGS=--quick: 1 start.
bench-selection: $(STAMP)
	$(PY) bench/selection.py --flaws drop_steps_on_sub $(BENCH_ARGS)
