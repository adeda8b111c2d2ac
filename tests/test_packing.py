"""--pack (dataset/packing.py): packed SFT and DPO batches compute exactly what the padded ones do.

The model is tiny but its weights are drawn wider than the training init (std 0.1), so attention is sharp
and a token that read another sample would change the result far beyond the tolerance (checked: the same
packed rows with plain causal attention are off by much more)."""
from argparse import Namespace

import pytest
import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT
from dataset.dpo import DPODataset, collate_pairs
from dataset.packing import model_inputs, pack_rows, per_sequence_sum
from dataset.sft import SFTDataset, collate_sft
from model import ModelConfig, Transformer
from model.model import packed_causal_attention
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


def test_pack_rows_by_hand():
    rows = [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10], [0, 1]), ([11, 12, 13], [1, 1, 0])]
    input_ids, targets, loss_mask, seq_lens = pack_rows(rows)
    assert input_ids.tolist() == [[5, 6, 7, 9, 11, 12]]
    assert targets.tolist() == [[6, 7, 8, 10, 12, 13]]
    assert loss_mask.tolist() == [[0, 1, 1, 1, 1, 0]]
    assert seq_lens == [3, 1, 2]
    assert per_sequence_sum(loss_mask.float(), seq_lens).tolist() == [2, 1, 1]


def test_pack_rows_keeps_every_token_once(sft_samples):
    rows = [(s["ids"], s["mask"]) for s in sft_samples]
    input_ids, targets, loss_mask, seq_lens = pack_rows(rows)
    assert input_ids.shape == (1, sum(len(ids) - 1 for ids, _ in rows))    # no padding at all
    assert seq_lens == [len(ids) - 1 for ids, _ in rows]
    for (ids, mask), a, b, m in zip(rows, *(x[0].split(seq_lens) for x in (input_ids, targets, loss_mask))):
        assert a.tolist() == ids[:-1]                      # contiguous, in order, nothing lost or added
        assert b.tolist() == ids[1:]
        assert m.tolist() == mask[1:]


def test_packed_attention_equals_attention_per_sample():
    """packed_causal_attention on a row of 3 samples == causal attention on each sample alone, and a
    sample's output does not change when another sample of the row changes."""
    torch.manual_seed(0)
    seq_lens = [5, 1, 9]
    q, k, v = (torch.randn(1, 2, sum(seq_lens), 8) for _ in range(3))
    out = packed_causal_attention(q, k, v, seq_lens)
    start = 0
    for n in seq_lens:
        sl = slice(start, start + n)
        # the reference by hand: softmax(q k^T / sqrt(d) + causal -inf) v
        scores = q[:, :, sl] @ k[:, :, sl].transpose(-1, -2) / 8 ** 0.5
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        assert torch.allclose(out[:, :, sl], scores.softmax(-1) @ v[:, :, sl], atol=1e-6)
        start += n
    k2 = k.clone()
    k2[:, :, :5] = torch.randn(1, 2, 5, 8)                 # new keys for the first sample only
    out2 = packed_causal_attention(q, k2, v, seq_lens)
    assert torch.equal(out2[:, :, 5:], out[:, :, 5:]) and not torch.allclose(out2[:, :, :5], out[:, :, :5])


def test_packed_positions_restart_per_sample():
    """The model run on a packed row gives each sample the logits it gets alone (positions restart at 0)."""
    model = sharp_model().eval()
    a, b = torch.randint(3, 200, (1, 7)), torch.randint(3, 200, (1, 4))
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), seq_lens=[7, 4])
        assert torch.allclose(packed[:, :7], model(a), atol=1e-5)
        assert torch.allclose(packed[:, 7:], model(b), atol=1e-5)
    with pytest.raises(ValueError, match="one packed row"):
        model(torch.cat([a, b], dim=1), seq_lens=[7, 5])


def loss_and_grads(model, batch):
    model.zero_grad()
    loss_sum, n, _ = language_model_loss(model, batch, no_autocast)
    (loss_sum / n).backward()
    return loss_sum.item() / n, n, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_sft_loss_and_gradients_packed_equal_unpacked(sft_samples):
    model = sharp_model()
    padded, packed = collate_sft(sft_samples), collate_sft(sft_samples, pack=True)
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
    padded, packed = collate_pairs(dpo_samples), collate_pairs(dpo_samples, pack=True)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
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
    """A batch without seq_lens calls the model exactly as before: no mask, no positions."""
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
