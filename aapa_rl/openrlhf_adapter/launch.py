"""`python -m aapa_rl.openrlhf_adapter.launch <OpenRLHF train_ppo_ray flags> --aapa.* ...`

Runs OpenRLHF's own `openrlhf.cli.train_ppo_ray` with the AAPA classes injected: the `--aapa.*` flags are
taken out of argv, checked (schedule, discriminator report, files) before Ray starts, and attached to
OpenRLHF's parsed arguments as `args.aapa` (an aapa_rl.settings.AapaSettings), which reaches every Ray
actor inside `strategy.args`.
"""

from __future__ import annotations

from . import pinned  # noqa: F401  (refuses another OpenRLHF version before using its internals)

# isort: split

import runpy
import sys

from aapa_rl.settings import AapaSettings

from .settings import AapaConfigError, check_files, parser, refuse_unsupported, split_argv


def install(aapa: AapaSettings, score_on: str = "actors") -> None:
    """Attach the settings to OpenRLHF's parsed args as `args.aapa` and `args.aapa_score_on` (refusing
    unsupported flags there); inject the AAPA classes."""
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor
    from openrlhf.utils import config

    from .ppo_actor import AapaPolicyModelActor
    from .ppo_trainer import AapaPPOTrainer

    hierarchize = getattr(config.hierarchize, "__wrapped__", config.hierarchize)

    def hierarchize_with_aapa(flat):
        args = hierarchize(flat)
        args.aapa, args.aapa_score_on = aapa, score_on
        refuse_unsupported(args)
        return args

    hierarchize_with_aapa.__wrapped__ = hierarchize
    # train_ppo_ray imports hierarchize and PPOTrainer when used, and PolicyModelActor when runpy runs it.
    config.hierarchize = hierarchize_with_aapa
    ppo_actor.PolicyModelActor = AapaPolicyModelActor
    ppo_trainer.PPOTrainer = AapaPPOTrainer


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        parser().print_help()
        print("\nEvery other flag goes to OpenRLHF: python -m openrlhf.cli.train_ppo_ray --help")
        return
    try:
        aapa, score_on, rest = split_argv(argv)
        problems = check_files(aapa)
    except AapaConfigError as e:
        raise SystemExit(f"aapa-rl: {e}") from e
    if problems:
        raise SystemExit("aapa-rl: " + "\n".join(problems))
    install(aapa, score_on)
    sys.argv = [sys.argv[0], *rest]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
