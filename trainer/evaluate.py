import math

import torch


@torch.no_grad()
def held_out_loss(model, dataset, collate_fn, loss_fn, batch_size, dist, precision):
    """Mean loss per term (token or pair) over a whole held-out dataset, split across ranks, no gradients;
    and the mean of each metric the loss function reports (e.g. a reward model's accuracy), as eval_<name>.

    Every rank runs the same number of forward passes (a rank whose share ran out repeats a batch and
    ignores it): under FSDP each forward is a collective that all ranks must join."""
    was_training = model.training
    model.eval()
    loss_sum, n_terms, metric_sums = 0.0, 0, {}
    mine = list(range(dist.rank, len(dataset), dist.world_size))
    n_batches = math.ceil(math.ceil(len(dataset) / dist.world_size) / batch_size)
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        batch = collate_fn([dataset[i] for i in (chunk or mine[:1] or [0])])
        batch = {k: v.to(dist.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss, n, metrics = loss_fn(model, batch, precision.autocast)
        if chunk:
            loss_sum += float(loss)
            n_terms += n
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    # A rank may have seen no real batch (fewer samples than ranks), so agree on the metric names first.
    keys = sorted(set().union(*dist.all_gather_object(sorted(metric_sums))))
    total = dist.all_reduce_sum(torch.tensor([loss_sum, n_terms] + [metric_sums.get(k, 0.0) for k in keys],
                                             dtype=torch.float64, device=dist.device))
    model.train(was_training)
    n_total = max(float(total[1]), 1)
    return {"eval_loss": float(total[0]) / n_total,
            **{f"eval_{k}": float(v) / n_total for k, v in zip(keys, total[2:].tolist())}}
