"""Hardware-only patches that let OpenRLHF 0.11.2 run on a CPU build of torch (e2e tests only).

`ray_env_hook` (named by RAY_RUNTIME_ENV_HOOK in the launched driver) makes every Ray worker of the job
run `apply` first. Each patch replaces a CUDA device call; none touches training logic.
"""

from __future__ import annotations

import os


def ray_env_hook(runtime_env: dict | None) -> dict:
    """Ray calls this with the runtime env OpenRLHF's `ray.init` asks for; every worker then runs apply()."""
    runtime_env = dict(runtime_env or {})
    runtime_env["worker_process_setup_hook"] = "aapa_e2e_cpu.apply"
    # Where this run's engines record their weights (the Ray daemons' environment is per session).
    if "AAPA_E2E_PROBE_DIR" in os.environ:
        env_vars = runtime_env.setdefault("env_vars", {})
        env_vars["AAPA_E2E_PROBE_DIR"] = os.environ["AAPA_E2E_PROBE_DIR"]
    return runtime_env


def apply() -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    from openrlhf.trainer.ppo_utils import replay_buffer
    from openrlhf.utils.deepspeed import deepspeed as openrlhf_deepspeed
    from torch.distributed.device_mesh import init_device_mesh

    # torch.cuda calls that raise on a CPU build; "cpu" as the current device keeps `.to(device)` on CPU.
    torch.cuda.set_device = lambda device: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    # DeepspeedStrategy.setup_distributed builds its device mesh on "cuda" by name.
    openrlhf_deepspeed.init_device_mesh = lambda device_type, *a, **k: init_device_mesh("cpu", *a, **k)

    # NaiveReplayBuffer.__init__ formats torch.device(f"cuda:{current_device()}") as its target device.
    original_init = replay_buffer.NaiveReplayBuffer.__init__

    def buffer_init(self, *args, **kwargs):
        current, torch.cuda.current_device = torch.cuda.current_device, lambda: 0
        try:
            original_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current
        self.target_device = torch.device("cpu")

    replay_buffer.NaiveReplayBuffer.__init__ = buffer_init
