"""vLLM's StatelessProcessGroup: a TCPStore rendezvous that stays out of torch's default group."""

from datetime import timedelta

import torch.distributed as dist


class StatelessProcessGroup:
    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size

    @classmethod
    def create(cls, host: str, port: int, rank: int, world_size: int, store_timeout: int = 300):
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0,
                              timeout=timedelta(seconds=store_timeout), wait_for_workers=False)
        return cls(store, rank, world_size)
