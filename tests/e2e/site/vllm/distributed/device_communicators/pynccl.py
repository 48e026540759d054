"""vLLM's PyNcclCommunicator API (broadcast(tensor, src, stream)) over a private gloo group, for CPU."""

from datetime import timedelta

import torch.distributed as dist


class PyNcclCommunicator:
    def __init__(self, group, device=None):
        store = dist.PrefixStore("weight_sync", group.store)
        self.group = dist.ProcessGroupGloo(store, group.rank, group.world_size, timedelta(seconds=600))

    def broadcast(self, tensor, src: int, stream=None):
        options = dist.BroadcastOptions()
        options.rootRank = src
        self.group.broadcast([tensor], options).wait()
