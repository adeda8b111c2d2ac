"""The tokenizer travels inside every checkpoint: later stages use the one they start from, refuse another one,
and checkpoints written before this still load with the default tokenizer."""
import json

import pytest
import torch

from model import ModelConfig, Transformer
from model.tokenizer import DEFAULT_TOKENIZER, SPECIAL_TOKEN_NAMES, SPECIAL_TOKENS, Tokenizer
from tests.helpers import TINY, run_script
from trainer.checkpoint import atomic_save, checkpoint_tokenizer, load_model, model_payload
from trainer.cli import UserError


def renamed_tokenizer(path):
    """The bundled tokenizer.json with MiniMind2's later special-token names: another file (other content), the
    same vocabulary size. Its names show in rendered text, so it is visible which tokenizer rendered a sample."""
    with open(DEFAULT_TOKENIZER, encoding="utf-8") as f:
        spec = json.load(f)
    for old, new in zip(SPECIAL_TOKENS, SPECIAL_TOKEN_NAMES[1]):
        spec["model"]["vocab"][new] = spec["model"]["vocab"].pop(old)
        next(t for t in spec["added_tokens"] if t["content"] == old)["content"] = new
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained_with_custom_tokenizer(tmp_path_factory):
    """out_dir with pretrain_64.pth trained (2 steps) with the renamed tokenizer; (out_dir, tokenizer path)."""
    out = tmp_path_factory.mktemp("custom_tok")
    tokenizer_path = renamed_tokenizer(out / "custom_tokenizer.json")
    data = out / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}: some words, 一些词语"}) + "\n" for i in range(64)),
                    encoding="utf-8")
    run_script("train_pretrain.py", *TINY, "--max_seq_len", "32", "--batch_size", "4", "--max_steps", "2",
               "--data_path", data, "--tokenizer_path", tokenizer_path, "--out_dir", out, "--no_progress",
               "--device", "cpu")
    return out, tokenizer_path


def test_pretrain_checkpoint_holds_its_tokenizer_text(pretrained_with_custom_tokenizer):
    out, tokenizer_path = pretrained_with_custom_tokenizer
    for name in ("pretrain_64.pth", "pretrain_64_resume.pth"):
        saved = torch.load(out / name, weights_only=False)["tokenizer"]
        assert saved["json"] == tokenizer_path.read_text(encoding="utf-8")   # the text itself, not a path
        assert saved["source"] == str(tokenizer_path)
    # The stage checkpoint also says how many tokens it was trained on (for the export's model card).
    assert torch.load(out / "pretrain_64.pth", weights_only=False)["tokens_seen"] == 2 * 4 * 32   # steps x batch x len


def test_sft_after_pretrain_uses_the_checkpoint_tokenizer(pretrained_with_custom_tokenizer):
    out, tokenizer_path = pretrained_with_custom_tokenizer
    # No --tokenizer_path: the sample is rendered by the pretraining's tokenizer (its names show) ...
    proc = run_script("train_full_sft.py", "--show_sample", "--out_dir", out,
                      "--data_path", "dataset/demo/sft_identity.jsonl")
    assert "<|im_start|>user\n" in proc.stdout and "<s>user" not in proc.stdout
    # ... and the SFT model is trained with it and carries it on.
    run_script("train_full_sft.py", "--out_dir", out, "--data_path", "dataset/demo/sft_identity.jsonl",
               "--max_seq_len", "64", "--batch_size", "4", "--max_steps", "2", "--no_progress", "--device", "cpu")
    sft = torch.load(out / "full_sft_64.pth", weights_only=False)
    assert sft["tokenizer"]["json"] == tokenizer_path.read_text(encoding="utf-8")
    # Naming the same tokenizer again is fine (only a different one is refused).
    proc = run_script("train_full_sft.py", "--show_sample", "--out_dir", out, "--tokenizer_path", tokenizer_path,
                      "--data_path", "dataset/demo/sft_identity.jsonl")
    assert "<|im_start|>user\n" in proc.stdout


@pytest.mark.parametrize("script", ["train_full_sft.py", "train_dpo.py", "train_lora.py", "eval_model.py"])
def test_a_conflicting_tokenizer_is_one_line_naming_both(pretrained_with_custom_tokenizer, script):
    out, tokenizer_path = pretrained_with_custom_tokenizer
    checkpoint = out / "pretrain_64.pth"
    flag = "--checkpoint" if script == "eval_model.py" else "--init_from"
    proc = run_script(script, flag, checkpoint, "--tokenizer_path", DEFAULT_TOKENIZER, "--device", "cpu",
                      "--out_dir", out, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert DEFAULT_TOKENIZER in lines[0] and str(checkpoint) in lines[0] and str(tokenizer_path) in lines[0]


def test_old_checkpoint_without_tokenizer_loads_with_the_default(tmp_path):
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=6400))
    path = tmp_path / "full_sft_32.pth"
    atomic_save(model_payload(model, "full_sft", 0), str(path))   # no tokenizer: as before this change
    loaded, _, ckpt = load_model(str(path))
    assert "tokenizer" not in ckpt
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)
    tokenizer = checkpoint_tokenizer(ckpt, str(path))
    assert tokenizer.path == DEFAULT_TOKENIZER and tokenizer.same_as(Tokenizer())
    # With --tokenizer_path, an old checkpoint takes that one (nothing to compare it with).
    other = renamed_tokenizer(tmp_path / "other.json")
    assert checkpoint_tokenizer(ckpt, str(path), str(other)).id_to_token(1) == "<|im_start|>"


def test_tokenizer_from_checkpoint_text_encodes_like_the_file(tmp_path):
    file_tokenizer = Tokenizer()
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=6400))
    ckpt = model_payload(model, "pretrain", 0, tokenizer=file_tokenizer)
    copy = checkpoint_tokenizer(ckpt, "x.pth")
    text = "床前明月光 </s><s>assistant water (noun)"
    assert copy.encode(text) == file_tokenizer.encode(text) and copy.vocab_size == file_tokenizer.vocab_size
    # Content, not formatting, decides "the same": a re-indented copy of the file is the same tokenizer.
    reformatted = tmp_path / "reformatted.json"
    reformatted.write_text(json.dumps(json.loads(file_tokenizer.json_text), indent=4), encoding="utf-8")
    assert checkpoint_tokenizer(ckpt, "x.pth", str(reformatted)).same_as(file_tokenizer)
    with pytest.raises(UserError, match="differs from the tokenizer the checkpoint x.pth was trained with"):
        checkpoint_tokenizer(ckpt, "x.pth", str(renamed_tokenizer(tmp_path / "renamed.json")))


def test_export_uses_the_checkpoint_tokenizer(pretrained_with_custom_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from tests.test_convert import convert
    out, tokenizer_path = pretrained_with_custom_tokenizer
    code, _, err = convert("export", out / "pretrain_64.pth", tmp_path / "hf")
    assert code == 0, err
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf.bos_token, hf.eos_token, hf.bos_token_id, hf.eos_token_id) == ("<|im_start|>", "<|im_end|>", 1, 2)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "tokens seen in this stage: 256" in card and str(tokenizer_path) in card and "text.jsonl" in card


def test_old_checkpoint_with_a_smaller_vocabulary_refuses_the_default(tmp_path):
    """A pre-change checkpoint trained with another (smaller) tokenizer: its ids could not index the default's
    vocabulary; the error says to pass the tokenizer it was trained with."""
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=512))
    ckpt = model_payload(model, "pretrain", 0)
    with pytest.raises(UserError, match=r"has 6400 tokens, the model in old.pth only 512: pass the --tokenizer_path"):
        checkpoint_tokenizer(ckpt, "old.pth")
