"""`aapa-rl generate`, `build-experts` and `prepare-data`; heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from aapa_rl.data.rows import add_prompt_args

    p = subparsers.add_parser("generate", help="sample K responses per prompt from a model (resumable JSONL)")
    p.add_argument("--model", required=True, help="Hugging Face model directory (or vLLM-loadable name)")
    p.add_argument("--prompts", required=True, help="prompt data: .jsonl, .parquet or a `datasets` directory")
    p.add_argument("--output", required=True, help="JSONL of {id, prompt, response, model, params}; "
                                                   "appended, rerun to resume")
    add_prompt_args(p, labels=False)
    p.add_argument("--recipe", help="YAML with sampling parameters (top level or a 'generate:' section)")
    p.add_argument("-n", "--n", type=int, help="samples per prompt (default 1)")
    p.add_argument("--temperature", type=float, help="default 1.0; 0 is greedy")
    p.add_argument("--top-p", type=float, help="default 1.0")
    p.add_argument("--top-k", type=int, help="default -1 (off)")
    p.add_argument("--max-new-tokens", type=int, help="default 1024")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt as a user turn in the model's chat template (default on)")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3's thinking switch, passed to the chat template (default: the template's)")
    p.add_argument("--batch-size", type=int,
                   help="prompts per engine call; a killed run loses at most one batch (default 32)")
    p.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto",
                   help="auto: vLLM when installed and a GPU is visible, else transformers")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("build-experts", help="keep each prompt's best verified teacher sample")
    p.add_argument("--samples", required=True, nargs="+", help="JSONL files written by `aapa-rl generate`")
    p.add_argument("--prompts", required=True, help="the prompt data the samples came from (for the labels)")
    p.add_argument("--reward", required=True,
                   help="reward_fns module (math, code, ifeval, format) or a .py file defining batch_reward")
    p.add_argument("--min-reward", type=float, default=1.0, help="a sample passes with reward >= this")
    p.add_argument("--output", required=True, help="expert bank JSONL {id, prompt, expert, label}; "
                                                   "a report JSON is written beside it")
    add_prompt_args(p, labels=True)
    p.set_defaults(func=_build_experts)

    p = subparsers.add_parser("prepare-data", help="write OpenRLHF's prompt dataset, a held-out split and "
                                                   "the local trainer's files")
    p.add_argument("--prompts", required=True, help="prompt data: .jsonl, .parquet or a `datasets` directory")
    p.add_argument("--experts", help="expert bank from build-experts (omit for runs without AAPA)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--eval-size", type=float, default=0.05,
                   help="held-out fraction (< 1) or row count (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--missing-expert", choices=("error", "drop", "keep"), default="error",
                   help="training prompts without a verified expert: stop, drop them (counted), or keep them "
                        "with expert null")
    add_prompt_args(p, labels=True)
    p.set_defaults(func=_prepare_data)


def _refuse_overwriting_inputs(flag: str, value: Path, outputs: list[Path],
                               inputs: list[tuple[str, str | Path]]) -> None:
    """Stop before reading anything when an output is one of the inputs (the same file under any name):
    writing it would destroy that input, e.g. hours of teacher samples."""
    from aapa_rl.data.rows import DataError

    for output in outputs:
        for input_flag, source in inputs:
            if output.exists() and Path(source).exists() and output.samefile(source):
                raise DataError(f"{flag} {value}: writes {output.name}, which is the input {input_flag} "
                                f"{source}; choose another {flag}")


def _generate(args: argparse.Namespace) -> int:
    from aapa_rl.data.generate import SAMPLING_DEFAULTS, generate, sampling_params
    from aapa_rl.data.rows import BadRows, field_map, read_prompts

    bad_rows = BadRows(args.skip_bad_rows)
    prompts = read_prompts(args.prompts, field_map(args), bad_rows, args.split)
    flags = {key: getattr(args, key) for key in [*SAMPLING_DEFAULTS, "batch_size"]}
    params = sampling_params(flags, args.recipe)
    counts = generate(prompts, args.model, args.output, params, args.engine, args.tensor_parallel_size)
    print(f"generate: wrote {counts['sampled']} prompts x {params['n']} samples to {args.output} "
          f"({counts['skipped_done']} were already done)\n{bad_rows.report()}")
    return 0


def _build_experts(args: argparse.Namespace) -> int:
    from aapa_rl.data.experts import build_experts, format_report, load_reward, read_samples
    from aapa_rl.data.rows import BadRows, field_map, read_prompts, write_json, write_jsonl

    output = Path(args.output)
    report_path = output.with_name(output.stem + ".report.json")
    _refuse_overwriting_inputs("--output", output, [output, report_path],
                               [("--samples", s) for s in args.samples] + [("--prompts", args.prompts)])
    reward_fn = load_reward(args.reward)
    bad_rows = BadRows(args.skip_bad_rows)
    prompts = read_prompts(args.prompts, field_map(args), bad_rows, args.split)
    responses = read_samples(args.samples, {p.id: p for p in prompts}, bad_rows)
    bank, report = build_experts(prompts, responses, reward_fn, args.min_reward, bad_rows=bad_rows,
                                 prompts_path=args.prompts)
    report |= {"reward_fn": args.reward, "bad_rows_skipped": len(bad_rows.messages),
               "bad_rows": bad_rows.messages}
    write_jsonl(output, bank)
    write_json(report_path, report)
    print(f"{format_report(report)}\n{bad_rows.report()}\nwrote {output} and {report_path}")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from aapa_rl.data.prepare import OUTPUTS, prepare, read_bank, write_outputs
    from aapa_rl.data.rows import BadRows, field_map, read_prompts

    out = Path(args.out_dir)
    inputs = [("--prompts", args.prompts)] + ([("--experts", args.experts)] if args.experts else [])
    _refuse_overwriting_inputs("--out-dir", out, [out / name for name in OUTPUTS], inputs)
    bad_rows = BadRows(args.skip_bad_rows)
    prompts = read_prompts(args.prompts, field_map(args), bad_rows, args.split)
    bank = read_bank(args.experts, bad_rows) if args.experts else None
    files, report = prepare(prompts, bank, eval_size=args.eval_size, seed=args.seed,
                            missing_expert=args.missing_expert, prompts_path=args.prompts,
                            bank_path=args.experts, bad_rows=bad_rows)
    report["bad_rows"] = bad_rows.messages
    write_outputs(out, files, report)
    print("\n".join(f"{k}: {v}" for k, v in report.items() if k != "bad_rows"))
    print(bad_rows.report())
    print(f"wrote {', '.join(f'{name}.jsonl' for name in files)} and report.json to {out}")
    if "eval" in files:
        eval_flag = f" --eval.dataset {out / 'eval.jsonl'}"
    else:
        eval_flag = ""  # OpenRLHF cannot load an empty eval file
        print(f"no held-out rows (--eval-size {args.eval_size:g} of {report['prompts']} prompts): eval.jsonl "
              "not written; pass --eval-size N to hold out N rows")
    print(f"OpenRLHF: --data.prompt_dataset {out / 'train.jsonl'}{eval_flag} "
          "--data.input_key prompt --data.label_key label")
    return 0
