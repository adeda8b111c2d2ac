"""--pack (dataset/packing.py): packed SFT and DPO batches compute exactly what the padded ones do.

The model is tiny but its weights are drawn wider than the training init (std 0.1), so attention is sharp
and a token that read another sample would change the result far beyond the tolerance (checked: the same
packed rows with plain causal attention are off by much more)."""
from argparse import Namespace

import pytest
import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT
from dataset.dpo import DPODataset, collate_pairs
from dataset.packing import PAD_SEQ, model_inputs, pack_rows, packed_attention
from dataset.sft import SFTDataset, collate_sft
from model import ModelConfig, Transformer
from model.tokenizer import Tokenizer
from tests.helpers import read_log, run_script
from trainer.checkpoint import atomic_save, model_payload
from trainer.losses import language_model_loss
from train_dpo import completion_logps, make_dpo_step

SEQ = 128
TOL = 1e-5


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def sharp_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ))
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def sft_samples(tok):
    """24 real demo conversations (every source), some longer than SEQ (truncated), most much shorter."""
    data = SFTDataset("dataset/demo/sft_*.jsonl", tok, SEQ, DEFAULT_SYSTEM_PROMPT)
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:24].tolist()
    return [data[i] for i in picks]


@pytest.fixture(scope="module")
def dpo_samples(tok):
    data = DPODataset("dataset/demo/dpo_*.jsonl", tok, SEQ, DEFAULT_SYSTEM_PROMPT)
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(2))[:8].tolist()
    return [data[i] for i in picks]


def test_packed_attention_by_hand():
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, PAD_SEQ], [2, 2, 2, 2, 3, 3]])
    positions, mask = packed_attention(seq_ids)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    expected = torch.zeros(2, 6, 6, dtype=torch.bool)
    for b, spans in enumerate([[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]):
        for start, end in spans:       # one lower triangle per sample (the padding is its own block)
            for q in range(start, end):
                expected[b, q, start:q + 1] = True
    assert torch.equal(mask, expected)


def test_pack_rows_keeps_every_token_once(sft_samples):
    rows = [(s["ids"], s["mask"]) for s in sft_samples]
    input_ids, targets, loss_mask, seq_ids = pack_rows(rows, SEQ)
    assert input_ids.shape[1] <= SEQ
    assert input_ids.shape[0] < 0.7 * len(rows)           # the demo conversations are short: they pack
    for i, (ids, mask) in enumerate(rows):
        where = seq_ids == i
        assert input_ids[where].tolist() == ids[:-1]       # contiguous, in order, nothing lost or added
        assert targets[where].tolist() == ids[1:]
        assert loss_mask[where].tolist() == mask[1:]
    assert (loss_mask[seq_ids == PAD_SEQ] == 0).all()
    again = pack_rows(rows, SEQ)
    assert all(torch.equal(a, b) for a, b in zip((input_ids, targets, loss_mask, seq_ids), again))  # deterministic
    # On the real rows, the mask lets a token read exactly the earlier tokens of its own sample.
    positions, mask = packed_attention(seq_ids)
    q, k = torch.meshgrid(torch.arange(seq_ids.shape[1]), torch.arange(seq_ids.shape[1]), indexing="ij")
    for r in range(seq_ids.shape[0]):
        same = seq_ids[r][:, None] == seq_ids[r][None, :]
        assert torch.equal(mask[r], same & (k <= q))
        for i in seq_ids[r].unique().tolist():
            assert positions[r][seq_ids[r] == i].tolist() == list(range(int((seq_ids[r] == i).sum())))


def loss_and_grads(model, batch):
    model.zero_grad()
    loss_sum, n, _ = language_model_loss(model, batch, no_autocast)
    (loss_sum / n).backward()
    return loss_sum.item() / n, n, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_sft_loss_and_gradients_packed_equal_unpacked(sft_samples):
    model = sharp_model()
    padded, packed = collate_sft(sft_samples), collate_sft(sft_samples, pack_to=SEQ)
    assert packed["input_ids"].numel() < 0.7 * padded["input_ids"].numel()
    loss_a, n_a, grads_a = loss_and_grads(model, padded)
    loss_b, n_b, grads_b = loss_and_grads(model, packed)
    assert n_a == n_b
    assert abs(loss_a - loss_b) < TOL
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max() < TOL, name
    # The control: the same packed rows with plain causal attention (samples reading each other, positions
    # running on) give another loss, so the equality above is not a tolerance that hides everything.
    with torch.no_grad():
        logits = model(packed["input_ids"])
    leaky = torch.nn.functional.cross_entropy(logits.flatten(0, 1), packed["targets"].flatten(), reduction="none")
    leaky = (leaky * packed["loss_mask"].flatten()).sum().item() / n_b
    assert abs(leaky - loss_b) > 100 * TOL


def test_dpo_logps_and_loss_packed_equal_unpacked(dpo_samples):
    policy, reference = sharp_model(0), sharp_model(1).eval().requires_grad_(False)
    padded, packed = collate_pairs(dpo_samples), collate_pairs(dpo_samples, pack_to=SEQ)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    logps_a, len_a = completion_logps(policy, padded, no_autocast)
    logps_b, len_b = completion_logps(policy, packed, no_autocast)
    assert torch.equal(len_a, len_b)
    # Sums of ~50 log-probs of ~-10 each: compared relative to their size (float32 has 7 digits).
    assert ((logps_a - logps_b).abs() / logps_a.abs()).max() < TOL
    args = Namespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_weight=1.0)
    step = make_dpo_step(reference, args)
    results = []
    for batch in (padded, packed):
        policy.zero_grad()
        loss, n_pairs, metrics = step(policy, batch, no_autocast)
        (loss / n_pairs).backward()
        results.append((loss.item() / n_pairs, metrics, {k: p.grad.clone() for k, p in policy.named_parameters()}))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert abs(loss_a - loss_b) < TOL
    for k in metrics_a:
        assert abs(float(metrics_a[k]) - float(metrics_b[k])) / n_pairs < 1e-4, k   # sums of logps, rewards
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max() < TOL, name


def test_model_inputs_unpacked_is_plain_causal(sft_samples):
    """A batch without seq_ids calls the model exactly as before: no mask, no positions."""
    assert model_inputs(collate_sft(sft_samples[:2])) == {}


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory, tok):
    """A random tiny model saved as a pretrain checkpoint: what SFT starts from (no pretraining run needed)."""
    out = tmp_path_factory.mktemp("packed")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ))
    atomic_save(model_payload(model, "pretrain", 0, tokenizer=tok), out / "pretrain_64.pth")
    return out


def test_sft_and_dpo_runs_packed_log_the_same_losses(start_checkpoint, tmp_path):
    """The whole loop: 4 SFT steps then 3 DPO steps with and without --pack log the same loss at every step
    (6 decimals), and the packed runs computed fewer tokens (the 'tokens' count is what the forward saw)."""
    logs = {}
    for pack in ((), ("--pack",)):
        out = tmp_path / ("packed" if pack else "padded")
        out.mkdir()
        (out / "pretrain_64.pth").symlink_to(start_checkpoint / "pretrain_64.pth")
        common = ["--dim", "64", "--max_seq_len", SEQ, "--out_dir", out, "--no_progress", "--device", "cpu",
                  "--log_interval", "1", "--save_interval", "0", *pack]
        run_script("train_full_sft.py", *common, "--batch_size", "8", "--max_steps", "4", "--learning_rate", "1e-3")
        run_script("train_dpo.py", *common, "--batch_size", "4", "--max_steps", "3", "--learning_rate", "1e-4",
                   "--data_path", "dataset/demo/dpo_identity.jsonl", "--sft_weight", "1")
        logs[bool(pack)] = [read_log(out / f"{name}_64_log.jsonl") for name in ("full_sft", "rlhf")]
    for padded, packed in zip(logs[False], logs[True]):
        assert len(padded) == len(packed) > 2
        for a, b in zip(padded, packed):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert packed[-1]["tokens"] < padded[-1]["tokens"]
