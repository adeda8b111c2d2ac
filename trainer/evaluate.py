import torch


@torch.no_grad()
def held_out_loss(model, dataset, collate_fn, loss_fn, batch_size, dist, precision):
    """Mean loss per term (token or pair) over a whole held-out dataset, split across ranks, no gradients."""
    was_training = model.training
    model.eval()
    loss_sum, n_terms = 0.0, 0
    mine = list(range(dist.rank, len(dataset), dist.world_size))
    for start in range(0, len(mine), batch_size):
        batch = collate_fn([dataset[i] for i in mine[start:start + batch_size]])
        batch = {k: v.to(dist.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss, n, _ = loss_fn(model, batch, precision.autocast)
        loss_sum += float(loss)
        n_terms += n
    total = dist.all_reduce_sum(torch.tensor([loss_sum, n_terms], dtype=torch.float64, device=dist.device))
    model.train(was_training)
    return {"eval_loss": float(total[0] / max(total[1], 1))}
