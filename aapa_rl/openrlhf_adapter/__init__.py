"""The OpenRLHF adapter: the only package of aapa-rl that imports openrlhf. Its modules are named after the
OpenRLHF modules they extend (ppo_trainer, ppo_actor); importing any module that uses OpenRLHF checks its
version first (pinned.py)."""
