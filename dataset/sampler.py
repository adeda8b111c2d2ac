"""Which samples each process reads at each step: a deterministic plan, so a run can resume mid-epoch.

Every epoch is a permutation of the dataset drawn from (seed, epoch). The permutation is cut into global
micro-batches of batch_size * world_size samples; process `rank` takes its own slice of each. An optimizer step
consumes `accumulation_steps` micro-batches. Because the plan depends only on (seed, epoch, step), resuming
needs nothing but the step number, and N processes with batch B read exactly the samples that one process with
batch N*B would.
"""
import numpy as np


class BatchPlan:
    def __init__(self, n_samples, batch_size, accumulation_steps, world_size, rank, seed, shuffle=True):
        self.n, self.batch_size, self.accum = n_samples, batch_size, accumulation_steps
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        per_step = batch_size * world_size * accumulation_steps
        self.steps_per_epoch = n_samples // per_step  # the last partial step of an epoch is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data has {n_samples} samples, fewer than one optimizer step needs "
                             f"(batch_size {batch_size} x {world_size} processes x {accumulation_steps} "
                             f"accumulation steps = {per_step}); lower the batch size or add data")

    def epoch_order(self, epoch):
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def micro_batches(self, epoch, first_step=0):
        """This rank's micro-batches (lists of sample indices) for `epoch`, from optimizer step `first_step`."""
        order = self.epoch_order(epoch)
        global_micro = self.batch_size * self.world_size
        out = []
        for m in range(first_step * self.accum, self.steps_per_epoch * self.accum):
            chunk = order[m * global_micro:(m + 1) * global_micro]
            out.append(chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist())
        return out
