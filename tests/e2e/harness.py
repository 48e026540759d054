"""The e2e harness: tiny assets, a Ray cluster with logical GPUs, `aapa-rl launch` runs and what they leave.

Everything here is setup or reading results; the training itself is the user's entry point, unchanged:
`aapa-rl launch --config configs/e2e-tiny-staged-aapa.yaml -- <paths of this session's assets>`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "site"  # the vllm / flash_attn stand-ins and the CPU patches
RECIPE = REPO / "configs" / "e2e-tiny-staged-aapa.yaml"
AAPA_RL = Path(sys.executable).with_name("aapa-rl")
RUN_TIMEOUT_S = 1500  # a launch takes ~2 min on 2 idle cores; this only catches a hang
# Eight training prompts: 4 steps of 2 prompts x 4 samples.
TRAIN_PROBLEMS = [(37, "+", 45), (52, "-", 18), (23, "*", 4), (61, "+", 29), (90, "-", 44), (15, "*", 6),
                  (48, "+", 17), (73, "-", 26)]
# Prompts the bank has no expert for (its operands stop below 95).
NO_EXPERT_PROBLEMS = [(96, "+", 97), (98, "-", 95), (99, "*", 7), (97, "+", 96)]
# The bank has more, so that the discriminator's held-out split is not a handful of prompts.
BANK_PROBLEMS = TRAIN_PROBLEMS + [(a, op, b) for a, b in zip(range(11, 95, 3), range(12, 99, 7), strict=False)
                                  for op in "+-*"]

# The flags each layout adds to the recipe (1 policy rank, ZeRO-2, separate reference model and engine).
# Every extra process costs ~20 s of start-up on 2 cores, so the reference model keeps 1 rank throughout.
LAYOUTS = {
    "zero2-1rank": [],
    "zero3-2ranks": ["--actor.num_gpus_per_node", "2", "--ds.zero_stage", "3"],
    "colocate-sleep": ["--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep"],
}


@dataclass
class Assets:
    root: Path
    model: Path
    train: Path
    no_experts: Path
    bank: Path
    disc: Path

    def flags(self) -> list[str]:
        """Overrides pointing the tiny recipe at this session's copies."""
        return ["--actor.model_name_or_path", str(self.model), "--data.prompt_dataset", str(self.train),
                "--aapa.discriminator", str(self.disc), "--aapa.expert_bank", str(self.bank)]


def build_assets(root: Path) -> Assets:
    """Tiny Qwen3 + char tokenizer, prompt files with and without experts, a trained discriminator."""
    from aapa_rl.local.task import char_tokenizer, expert_for, prompt_for, tiny_qwen3

    a = Assets(root, root / "model", root / "train.jsonl", root / "no_experts.jsonl", root / "experts.jsonl",
               root / "disc")
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(a.model)
    model = tiny_qwen3(len(tokenizer), seed=0)
    warm_start(model, tokenizer, [prompt_for(*p) + expert_for(*p) for p in TRAIN_PROBLEMS])
    model.save_pretrained(a.model)

    def row(i, problem, with_expert=True):
        label = {"answer": answer_for(*problem)}
        if with_expert:
            label["expert"] = expert_for(*problem)
        return {"id": f"p{i}", "prompt": prompt_for(*problem), "label": label}

    write_jsonl(a.train, [row(i, p) for i, p in enumerate(TRAIN_PROBLEMS)])
    write_jsonl(a.no_experts, [row(100 + i, p, False) for i, p in enumerate(NO_EXPERT_PROBLEMS)])
    write_jsonl(a.bank, [{"id": f"p{i}", "prompt": prompt_for(*p), "expert": expert_for(*p)}
                         for i, p in enumerate(BANK_PROBLEMS)])
    # The user's command; generic hard negatives made from the experts are its negatives.
    subprocess.run([str(AAPA_RL), "discriminator", "train", "--experts", str(a.bank), "--variant", "pairwise",
                    "--encoder", "hash", "--steps", "150", "--device", "cpu", "--out", str(a.disc)],
                   check=True, capture_output=True, text=True, timeout=600)
    return a


def answer_for(a: int, op: str, b: int) -> str:
    return str({"+": a + b, "-": a - b, "*": a * b}[op])


def warm_start(model, tokenizer, texts: list[str], steps: int = 40) -> None:
    """A little SFT on the expert texts, so that rollouts are sometimes right and look expert-like: rewards,
    discriminator scores and so advantages then vary within a group, and every term of the loss is live."""
    batch = tokenizer([t + tokenizer.eos_token for t in texts], padding=True, padding_side="right",
                      return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(steps):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def worker_env(marker: str, extensions: Path) -> dict[str, str]:
    """Environment of the Ray daemons and so of every worker they start (set before ray.init)."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")])),
        "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "AAPA_E2E_MARKER": marker,
        # Ray starts workers at nice 15, where any other busy process on a shared CI machine starves them.
        "RAY_worker_niceness": "0",
    }


def marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries this session's marker (never matched by name)."""
    needle = f"AAPA_E2E_MARKER={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def kill_pids(pids: list[int], grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)


def alive(pid: int) -> bool:
    """Running (a zombie has exited and only waits for its parent to read its status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Run:
    """One `aapa-rl launch`: its directory, exit code and output, and readers for what it left behind."""

    out: Path
    returncode: int
    output: str
    seconds: float
    flags: list[str] = field(default_factory=list)

    @property
    def ckpt(self) -> Path:
        return self.out / "ckpt"

    def scalars(self) -> dict[int, dict[str, float]]:
        """TensorBoard scalars by step, names without OpenRLHF's `train/` prefix."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        steps: dict[int, dict[str, float]] = {}
        for events in (self.out / "tb").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                for e in acc.Scalars(tag):
                    steps.setdefault(e.step, {})[tag.removeprefix("train/")] = e.value
        return steps

    def logged_steps(self) -> dict[int, str]:
        """OpenRLHF's per-step log line ("Global step N: {...}") by step, as printed by the trainer actor."""
        return {int(m[1]): m[2] for m in re.finditer(r"Global step (\d+): (\{.*\})", self.output)}

    def samples(self) -> list[tuple[str, float]]:
        """OpenRLHF's logged sample of each step: (decoded prompt + response, its reward)."""
        found = re.finditer(r"Sample: (\[.*\])\s*$", self.output, re.M)
        return [tuple(ast.literal_eval(m[1])) for m in found]

    def engine_syncs(self) -> list[dict[str, torch.Tensor]]:
        """The rollout engine's weights after each of its syncs, in order (each layout has one engine)."""
        files = sorted(self.out.glob("probe/engine*-sync*.pt"))
        assert len({p.name.split("-")[0] for p in files}) <= 1, f"more than one engine recorded: {files}"
        number = {p: int(re.fullmatch(r"engine\d+-sync(\d+)\.pt", p.name)[1]) for p in files}
        return [torch.load(p) for p in sorted(files, key=number.get)]

    def client_state(self, step: int) -> dict:
        """The DeepSpeed checkpoint's client state at `step` (rank 0's model-states file)."""
        path = self.ckpt / "_actor" / f"global_step{step}"
        states = sorted(path.glob("*model_states.pt"))
        return torch.load(states[0], weights_only=False, map_location="cpu")


def dry_run(flags: list[str]) -> str:
    """`aapa-rl launch --config <tiny recipe> --dry-run -- <flags>`: its output (it starts nothing)."""
    cmd = [str(AAPA_RL), "launch", "--config", str(RECIPE), "--dry-run", "--", *flags]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return result.stdout + result.stderr


def launch(out: Path, ray_address: str, flags: list[str], *, timeout_s: float = RUN_TIMEOUT_S) -> Run:
    """`aapa-rl launch --config <tiny recipe> -- <flags>` against the fixture's Ray cluster."""
    (out / "probe").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ADDRESS": ray_address, "RAY_RUNTIME_ENV_HOOK": "aapa_e2e_cpu.ray_env_hook",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")])),
           "AAPA_E2E_PROBE_DIR": str(out / "probe"), "RAY_DEDUP_LOGS": "0", "DS_ACCELERATOR": "cpu"}
    outputs = ["--ckpt.path", str(out / "ckpt"), "--ckpt.output_dir", str(out / "final"),
               "--logger.tensorboard_dir", str(out / "tb")]
    cmd = [str(AAPA_RL), "launch", "--config", str(RECIPE), "--", *outputs, *flags]
    start = time.monotonic()
    with open(out / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
    return Run(out, returncode, (out / "launch.log").read_text(), time.monotonic() - start, flags)
