"""Process-group setup from torchrun's environment variables, and the few collective helpers we need.

`python train_x.py` runs as a single process; `torchrun --nproc_per_node N train_x.py` sets RANK, LOCAL_RANK
and WORLD_SIZE, and we join a process group: nccl with one GPU per local rank on CUDA, gloo on CPU (so every
distributed path can be tested on a laptop with two processes)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1

    def print(self, *args, **kwargs):
        """print on rank 0 only, so N processes don't print N copies."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor):
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup_distributed(device_arg=None):
    """Join the process group if launched by torchrun; pick the device. `device_arg` ('cpu', 'cuda',
    'cuda:1', ...) overrides the automatic choice (CUDA when available)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if world_size > 1:
            device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, local_rank, world_size, device)


def cleanup_distributed():
    """Leave the process group cleanly, so torchrun exits instead of hanging on a dangling group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
