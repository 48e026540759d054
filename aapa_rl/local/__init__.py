"""The single-process local trainer (SFT, GRPO, CHORD, each with or without AAPA), the embedded arithmetic
task, the instruction-following task for real models and the `make demo` driver. See docs/local.md."""
