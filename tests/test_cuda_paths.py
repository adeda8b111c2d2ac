"""Every CUDA-only branch of the trainer, on a machine without a GPU: torch.cuda is faked (monkeypatch) and we
check what WOULD be called; the CPU's own hardware checks (bfloat16 instructions) are faked here too. The fakes
behave like PyTorch where it matters: set_device rejects a device without an index, exactly as
torch.cuda.set_device does ("Expected a torch.device with a specified index")."""
import pytest
import torch

from model import ModelConfig, Transformer
from trainer import distributed, loop
from trainer.cli import UserError
from trainer.distributed import DistInfo, pick_device, setup_distributed
from trainer.precision import setup_precision


class FakeCuda:
    """Records the calls the trainer makes to torch.cuda and torch.distributed."""

    def __init__(self, monkeypatch, n_gpus=2, current=0, bf16=True):
        self.set_device_calls, self.init_calls = [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: self.init_calls.append(kw))

    def set_device(self, device):
        device = torch.device(device)
        if device.index is None:  # what PyTorch itself raises for torch.device("cuda")
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        self.set_device_calls.append(device)


@pytest.fixture
def one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def torchrun_env(monkeypatch, rank, world_size=2):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


def test_one_gpu_one_process_gets_an_indexed_device(monkeypatch, one_process):
    """The crash of `python train_pretrain.py` on a one-GPU machine: set_device(torch.device('cuda'))."""
    fake = FakeCuda(monkeypatch, n_gpus=1)
    info = setup_distributed(None)                      # automatic choice
    assert info.device == torch.device("cuda", 0) and fake.set_device_calls == [torch.device("cuda", 0)]
    assert setup_distributed("cuda").device == torch.device("cuda", 0)    # --device cuda
    assert fake.init_calls == []                        # one process: no process group


def test_device_flag_picks_the_gpu_and_respects_the_current_device(monkeypatch, one_process):
    FakeCuda(monkeypatch, n_gpus=2, current=1)
    assert pick_device("cuda", 0, 1) == torch.device("cuda", 1)   # e.g. after torch.cuda.set_device(1)
    assert pick_device("cuda:0", 0, 1) == torch.device("cuda", 0)
    assert pick_device("cpu", 0, 1) == torch.device("cpu")
    with pytest.raises(UserError, match="cuda:5: only 2 GPU"):
        pick_device("cuda:5", 0, 1)


def test_torchrun_ranks_take_their_local_gpu_and_nccl(monkeypatch):
    fake = FakeCuda(monkeypatch, n_gpus=2)
    torchrun_env(monkeypatch, rank=1)
    info = setup_distributed(None)
    assert info.device == torch.device("cuda", 1) and info.world_size == 2 and info.rank == 1
    assert fake.set_device_calls == [torch.device("cuda", 1)]
    assert fake.init_calls == [{"backend": "nccl", "rank": 1, "world_size": 2, "device_id": torch.device("cuda", 1)}]


def test_torchrun_on_cpu_uses_gloo(monkeypatch):
    fake = FakeCuda(monkeypatch, n_gpus=0)
    torchrun_env(monkeypatch, rank=0)
    info = setup_distributed(None)
    assert info.device == torch.device("cpu")
    assert fake.init_calls == [{"backend": "gloo", "rank": 0, "world_size": 2}] and fake.set_device_calls == []


def test_cuda_requested_without_cuda_is_a_user_error(monkeypatch, one_process):
    FakeCuda(monkeypatch, n_gpus=0)
    with pytest.raises(UserError, match="CUDA is not available"):
        setup_distributed("cuda")
    with pytest.raises(UserError, match="is not a device"):
        setup_distributed("gpu")


def test_precision_defaults_and_checks_on_cuda(monkeypatch):
    FakeCuda(monkeypatch, bf16=True)
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    cuda = torch.device("cuda", 0)
    p = setup_precision(None, cuda)
    assert p.dtype == torch.bfloat16 and p.device_type == "cuda" and calls == ["high"]   # TF32 on
    assert not p.grad_scaler().is_enabled()             # bf16 has float32's range: no loss scaling
    ctx = p.autocast()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    fp16 = setup_precision("float16", cuda)
    assert fp16.grad_scaler().is_enabled()              # float16 needs loss scaling
    assert setup_precision(None, torch.device("cpu")).dtype == torch.float32

    FakeCuda(monkeypatch, bf16=False)                   # e.g. a V100 or T4
    assert setup_precision(None, cuda).dtype == torch.float32
    with pytest.raises(UserError, match="no bfloat16 support"):
        setup_precision("bfloat16", cuda)
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        setup_precision("float16", torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bfloat16_without_the_instructions_is_flagged(monkeypatch, native):
    """float32 stays the CPU default either way (the same numbers on every CPU); --dtype bfloat16 on a CPU
    without bfloat16 instructions says, on the start line, that it will be slow."""
    from trainer import precision
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert precision.cpu_has_bfloat16() is native
    assert setup_precision(None, cpu).describe() == "float32"
    bf16 = setup_precision("bfloat16", cpu).describe()
    assert bf16.startswith("autocast bfloat16 on cpu") and ("no bfloat16 instructions" in bf16) is not native
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)   # Intel's AMX alone is enough
    assert precision.cpu_has_bfloat16() and "instructions" not in setup_precision("bfloat16", cpu).describe()
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")   # not checked there: no claim
    assert precision.cpu_has_bfloat16() is None
    assert "instructions" not in setup_precision("bfloat16", cpu).describe()


def test_fused_adamw_on_cuda_and_cpu():
    model = torch.nn.Linear(4, 4)
    assert loop.make_optimizer(model, 1e-3, 0.1, torch.device("cuda", 0)).defaults["fused"] is True
    assert loop.make_optimizer(model, 1e-3, 0.1, torch.device("cpu")).defaults["fused"] is True
    assert not loop.make_optimizer(model, 1e-3, 0.1, torch.device("mps")).defaults["fused"]


def test_fused_adamw_on_cpu_takes_the_steps_of_the_plain_one():
    """The fused CPU kernel is a faster way to the same update (to float32 rounding)."""
    torch.manual_seed(0)
    weights = [torch.randn(16, 8), torch.randn(8)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(5)]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused, foreach=False)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pin_memory_only_on_cuda():
    data, plan = list(range(8)), [[0, 1], [2, 3]]
    assert loop.make_loader(data, plan, None, 0, torch.device("cuda", 0)).pin_memory is True
    assert loop.make_loader(data, plan, None, 0, torch.device("cpu")).pin_memory is False


def test_ddp_gets_the_gpu_index_on_cuda_and_none_on_cpu(monkeypatch):
    wrapped = []
    monkeypatch.setattr(loop, "DDP", lambda module, device_ids: wrapped.append(device_ids) or module)

    class Args:
        compile = fsdp = grad_checkpointing = False
    model = Transformer(ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32))
    precision = None   # only FSDP reads it
    assert loop.wrap_model(model, Args, DistInfo(1, 1, 2, torch.device("cuda", 1)), precision) is model
    loop.wrap_model(model, Args, DistInfo(0, 0, 2, torch.device("cpu")), precision)
    loop.wrap_model(model, Args, DistInfo(0, 0, 1, torch.device("cuda", 0)), precision)   # one process: no DDP
    assert wrapped == [[1], None]


def test_rng_state_of_every_gpu_is_saved_and_restored(monkeypatch):
    FakeCuda(monkeypatch)
    saved = [torch.ByteTensor([1, 2]), torch.ByteTensor([3, 4])]
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = loop.capture_rng()
    assert state["cuda"] is saved
    loop.restore_rng(state)
    assert restored == [saved]


def fake_varlen_attn(calls):
    """torch.nn.attention.varlen.varlen_attn as documented (CUDA only), written out on CPU: query/key/value
    (T, heads, hd) with the samples end to end, cu_seq (N+1,) int32 their boundaries, window (-1, 0) causal.
    Checks what the real kernel requires and computes softmax(q k^T / sqrt(hd) + causal mask) v per sample."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1)):
        bounds = cu_seq_q.tolist()
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        calls.append(lengths)
        assert cu_seq_q.dtype == torch.int32 and cu_seq_q is cu_seq_k and bounds[0] == 0
        assert bounds[-1] == query.shape[0] == key.shape[0] and max_q == max_k == max(lengths)
        assert window_size == (-1, 0) and query.dim() == 3 and all(t.stride(-1) == 1 for t in (query, key, value))
        assert query.shape[1] == key.shape[1] == value.shape[1]     # varlen_attn's check without enable_gqa
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))      # (heads, L, hd)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            scores = scores.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
            outs.append((scores.softmax(-1) @ v).transpose(0, 1))
        return torch.cat(outs)
    return varlen_attn


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_packed_attention_on_a_gpu_is_one_varlen_call_per_layer(monkeypatch, n_kv_heads):
    """Where the varlen kernel runs (CUDA, bf16/fp16), a packed row's attention is ONE varlen_attn call per
    layer, given the row's layout and boundaries as the kernel documents them: the model's outputs and
    gradients are then those of the per-sample path (the kernel faked on CPU, its semantics written out).
    With GQA (2 kv heads) k and v reach it as copies; without (4), v is a strided view of the q/k/v matmul."""
    import torch.nn.attention.varlen
    from model import model as model_module
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=64,
                                    max_seq_len=16))
    ids, seq_lens = torch.randint(0, 64, (1, 12)), [5, 1, 6]

    def run():
        model.zero_grad()
        logits = model(ids, seq_lens=seq_lens)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    assert not model_module.varlen_kernel_applies(torch.zeros(1, 2, 3, 8), 0.0)     # CPU: the per-sample loop
    reference = run()
    calls = []
    monkeypatch.setattr(model_module, "varlen_kernel_applies", lambda q, dropout_p: dropout_p == 0.0)
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", fake_varlen_attn(calls))
    logits, grads = run()
    assert calls == [seq_lens] * 2
    torch.testing.assert_close(logits, reference[0], rtol=0, atol=1e-5)
    for g, g_ref in zip(grads, reference[1]):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5)


def test_varlen_kernel_only_where_flash_attention_runs(monkeypatch):
    """The gate of the one-call path: an NVIDIA GPU of compute capability 8.0+ with FlashAttention built in,
    fp16/bf16, head size a multiple of 8 up to 256, no dropout; anything else (a T4, ROCm, float32, dropout)
    takes the per-sample loop."""
    from model.model import varlen_kernel_applies

    class FakeCudaTensor:       # what the gate reads of q
        is_cuda, device = True, torch.device("cuda", 0)

        def __init__(self, dtype=torch.bfloat16, head_dim=64):
            self.dtype, self.shape = dtype, (1, 4, 10, head_dim)

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[0])
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)   # a CUDA build's
    assert varlen_kernel_applies(FakeCudaTensor(), 0.0) and varlen_kernel_applies(FakeCudaTensor(torch.float16), 0.0)
    assert not varlen_kernel_applies(FakeCudaTensor(), 0.1)
    assert not varlen_kernel_applies(FakeCudaTensor(torch.float32), 0.0)
    assert not varlen_kernel_applies(FakeCudaTensor(head_dim=20), 0.0)
    assert not varlen_kernel_applies(FakeCudaTensor(head_dim=512), 0.0)
    monkeypatch.setattr(torch.version, "hip", "6.2")              # ROCm: its varlen kernel is not for every AMD GPU
    assert not varlen_kernel_applies(FakeCudaTensor(), 0.0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    assert not varlen_kernel_applies(FakeCudaTensor(), 0.0)      # a build without FlashAttention
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    capability[0] = (7, 5)
    assert not varlen_kernel_applies(FakeCudaTensor(), 0.0)


def test_cumulative_lengths_are_usable_after_inference_mode():
    """The cached boundaries may be built first under torch.inference_mode (a chat or an evaluation) and
    reused by a training forward: they must not be an inference tensor, which backward could not save."""
    from model.model import cumulative_lengths
    cumulative_lengths.cache_clear()
    with torch.inference_mode():
        cu = cumulative_lengths((3, 1, 2), torch.device("cpu"))
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == torch.int32 and not cu.is_inference()
    assert cumulative_lengths((3, 1, 2), torch.device("cpu")) is cu
