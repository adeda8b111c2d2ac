"""Process-group setup from torchrun's environment variables, and the few collective helpers we need.

`python train_x.py` runs as a single process; `torchrun --nproc_per_node N train_x.py` sets RANK, LOCAL_RANK
and WORLD_SIZE, and we join a process group: nccl with one GPU per local rank on CUDA, gloo on CPU (so every
distributed path can be tested on a laptop with two processes)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.cli import ReportedOnMainRank, UserError, user_error_types


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

    def main_first(self, fn):
        """Run fn() on rank 0 while the other ranks wait; return its result on rank 0 (None elsewhere).

        If rank 0 hits a user mistake (a bad data line while tokenising, say), every rank learns it: rank 0
        re-raises it (and prints it), the others raise ReportedOnMainRank (exit 2, silently). Without this
        the other ranks would die on a missing file or a closed connection, burying the real message."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except user_error_types() as e:
                error = e
        if self.enabled:
            box = [str(error) if error is not None else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and not self.is_main:
                raise ReportedOnMainRank(box[0])
        if error is not None:
            raise error
        return result

    def all_gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def pick_device(device_arg, local_rank, world_size):
    """The torch.device this process trains on. `device_arg` is --device ('cpu', 'cuda', 'cuda:1'; None: CUDA
    when available). CUDA devices always get an index: torch.cuda.set_device rejects a bare 'cuda'.
    Under torchrun each process takes the GPU of its local rank (one GPU per process)."""
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise UserError(f"--device {device_arg!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {device_arg}: CUDA is not available (no GPU, or a CPU-only build of torch "
                        f"{torch.__version__}); use --device cpu")
    if world_size > 1:
        index = local_rank
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise UserError(f"--device cuda:{index}: only {torch.cuda.device_count()} GPU(s) are visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", index)


def setup_distributed(device_arg=None):
    """Join the process group if launched by torchrun; pick the device (see pick_device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_arg, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so NCCL, autocast and plain .cuda() calls all use this GPU
    if world_size > 1:
        # nccl for GPUs; gloo on CPU (the same code runs, so every distributed path is testable here).
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}  # binds the group to this GPU eagerly
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, local_rank, world_size, device)


def cleanup_distributed():
    """Leave the process group cleanly, so torchrun exits instead of hanging on a dangling group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
