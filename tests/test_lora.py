"""LoRA: adapters that start at zero, train alone, merge exactly, switch off to give back the base model, and a
DPO whose reference is the base model with the adapters off."""
import math
import shutil

import pytest
import torch

from model import ModelConfig, Transformer
from model.lora import BaseModel, LoRALinear, adapters_disabled, add_lora, load_lora, lora_state_dict, merge_lora
from tests.helpers import read_log, run_script


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=16))


def trained_adapters(model, steps=3):
    """Give the adapters non-zero values with a few optimizer steps on random tokens."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 100, (2, 8))
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def test_adapted_model_starts_equal_to_the_base_and_only_adapters_train():
    base = tiny_model()
    model = tiny_model()
    n = add_lora(model, rank=4, alpha=8)
    ids = torch.randint(0, 100, (2, 10))
    assert torch.equal(model(ids), base(ids))                      # B = 0: exactly the base function
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 7                                    # wq wk wv wo w1 w2 w3 in each of 2 blocks
    assert n == sum(4 * (m.in_features + m.out_features) for m in layers)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == \
        {name for name, _ in model.named_parameters() if ".lora_" in name}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    trained_adapters(model)
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)   # the base weights never move
    assert not torch.equal(model(ids), base(ids))


def test_merge_equals_the_unmerged_forward_and_disabled_equals_the_base():
    base, model = tiny_model(), tiny_model()
    add_lora(model, rank=4, alpha=8, targets=("wq", "wv", "w2"))
    trained_adapters(model)
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        adapted = model(ids)
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
        torch.testing.assert_close(BaseModel(model)(ids), base(ids), rtol=0, atol=0)
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=0)           # switched back on
        for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
            layer.merge()
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=1e-5)
        for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
            layer.unmerge()
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=1e-5)
        adapters = lora_state_dict(model)
        plain = merge_lora(model)
        assert not any(".lora_" in k for k in plain.state_dict()) and set(plain.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(plain(ids), adapted, rtol=0, atol=1e-5)
        reloaded = tiny_model()
        add_lora(reloaded, rank=4, alpha=8, targets=("wq", "wv", "w2"))
        load_lora(reloaded, adapters)
        torch.testing.assert_close(reloaded(ids), adapted, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        load_lora(tiny_model(), adapters)


def test_train_lora_saves_adapters_and_leaves_the_base_file_untouched(tmp_path, tiny_sft):
    out = tmp_path / "out"
    shutil.copytree(tiny_sft, out)
    base_bytes = (out / "full_sft_64.pth").read_bytes()
    run_script("train_lora.py", "--out_dir", out, "--max_steps", "20", "--max_seq_len", "128", "--learning_rate", "1e-2",
               "--lora_rank", "8", "--log_interval", "1", "--no_progress", "--device", "cpu")
    assert (out / "full_sft_64.pth").read_bytes() == base_bytes
    saved = torch.load(out / "lora" / "lora_identity_64.pth", weights_only=False)
    assert set(saved["model"]) and all(".lora_" in k for k in saved["model"])
    assert saved["lora"]["rank"] == 8 and saved["lora"]["base"] == str(out / "full_sft_64.pth")
    log = [r["loss"] for r in read_log(out / "lora" / "lora_identity_64_log.jsonl")]
    assert log[-1] < log[0] - 0.3, log
    # eval_model applies the adapters; a missing adapter file is one line.
    proc = run_script("eval_model.py", "--out_dir", out, "--lora_name", "lora_identity", "--auto", "--max_new_tokens",
                      "4", "--temperature", "0")
    assert "+ LoRA adapters" in proc.stderr
    proc = run_script("eval_model.py", "--out_dir", out, "--lora_name", "nope", "--auto", check=False)
    assert proc.returncode == 2 and "nope_64.pth" in proc.stderr and "Traceback" not in proc.stderr


def test_lora_dpo_starts_at_ln2_keeps_the_reference_and_merges(tmp_path, tiny_sft):
    out = tmp_path / "out"
    shutil.copytree(tiny_sft, out)
    base = torch.load(out / "full_sft_64.pth", weights_only=False)["model"]
    run_script("train_dpo.py", "--out_dir", out, "--lora_rank", "4", "--merge_lora", "--max_steps", "6",
               "--learning_rate", "1e-2", "--batch_size", "4", "--max_seq_len", "128", "--log_interval", "1",
               "--data_path", "dataset/demo/dpo_identity.jsonl", "--no_progress", "--device", "cpu")
    log = read_log(out / "lora" / "rlhf_64_log.jsonl")
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6 and log[0]["rewards/accuracies"] == 0
    assert log[-1]["rewards/margins"] > 0
    # The reference (= the base weights) never moved: the merged model is exactly base + (alpha/r) B A on the
    # adapted layers, and bit-identical to the base everywhere else (embeddings, norms).
    adapters = torch.load(out / "lora" / "rlhf_64.pth", weights_only=False)
    merged = torch.load(out / "rlhf_64.pth", weights_only=False)
    assert merged["model"].keys() == base.keys() and merged["merged_lora"]["rank"] == 4
    scale = adapters["lora"]["alpha"] / adapters["lora"]["rank"]
    for k in base:
        layer = k[:-len(".weight")]
        if f"{layer}.lora_A" in adapters["model"]:
            delta = adapters["model"][f"{layer}.lora_B"] @ adapters["model"][f"{layer}.lora_A"] * scale
            assert delta.abs().max() > 0, k
            torch.testing.assert_close(merged["model"][k], base[k] + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged["model"][k], base[k]), k


def test_merge_lora_needs_lora(tmp_path):
    proc = run_script("train_dpo.py", "--out_dir", tmp_path, "--merge_lora", check=False)
    assert proc.returncode == 2 and "--merge_lora needs --lora_rank" in proc.stderr
