"""The batched generation engine (model/engine.py) against `generate` (model/generate.py), one sequence at a
time: rows of different lengths, joining and leaving a running batch, stop strings, seeds."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.engine import Engine, Request, generate_batch
from model.generate import generate
from model.tokenizer import DEFAULT_TOKENIZER, Tokenizer

LENGTHS = (1, 5, 17, 3, 40, 9, 2, 23)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(DEFAULT_TOKENIZER)


def prompts(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 6400, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, **kw):
    return list(generate(model, prompt, **kw))


@pytest.mark.parametrize("max_batch_size", [8, 3])  # 3: rows wait, then join the running batch as others leave
def test_greedy_batched_equals_one_at_a_time(model, max_batch_size):
    ps = prompts()
    expected = [alone(model, p, max_new_tokens=30, temperature=0, eos_id=-1) for p in ps]
    got = generate_batch(model, ps, max_batch_size=max_batch_size, max_len=100, max_new_tokens=30,
                         temperature=0, eos_id=-1)
    assert got == expected
    assert len({tuple(t) for t in got}) == len(ps)  # different prompts, different answers: the test can fail


def test_rows_of_different_lengths_leave_and_join_mid_run(model):
    """3 rows at a time, answers of 7..28 tokens: every few steps a row leaves and a waiting one is prefilled
    next to rows that are decoding, at other positions."""
    ps = prompts()
    lengths = [7 + 3 * i for i in range(len(ps))][::-1]
    expected = [alone(model, p, max_new_tokens=n, temperature=0, eos_id=-1) for p, n in zip(ps, lengths)]
    engine = Engine(model, max_batch_size=3, max_len=100)
    requests = [Request(p, max_new_tokens=n, temperature=0, eos_id=-1) for p, n in zip(ps, lengths)]
    for r in requests:
        engine.add(r)
    mixed_steps = 0  # steps where a prefill and a decode ran together
    while engine.has_work():
        before = [len(r.tokens) for r in requests]
        engine.step()
        grew = [len(r.tokens) - b for r, b in zip(requests, before)]
        mixed_steps += any(g and b == 0 for g, b in zip(grew, before)) and any(g and b > 0 for g, b in zip(grew, before))
    assert [r.tokens for r in requests] == expected
    assert mixed_steps >= 3


def test_rows_leave_at_eos_or_max_tokens_without_disturbing_the_others(model):
    ps = prompts()
    full = [alone(model, p, max_new_tokens=30, temperature=0, eos_id=-1) for p in ps]
    engine = Engine(model, max_batch_size=8, max_len=100)
    # Row 0 "ends" at the 6th token it would write (its own </s> id), row 1 after 4 tokens, the rest run on.
    requests = [Request(p, max_new_tokens=30, temperature=0, eos_id=-1) for p in ps]
    requests[0].eos_id = full[0][5]
    requests[1].max_new_tokens = 4
    for r in requests:
        engine.add(r)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    first_eos = full[0].index(full[0][5]) + 1
    assert requests[0].tokens == full[0][:first_eos] and requests[0].finish_reason == "stop"
    assert requests[1].tokens == full[1][:4] and requests[1].finish_reason == "length"
    assert [r.tokens for r in requests[2:]] == full[2:]
    assert all(r.finish_reason == "length" for r in requests[2:]) and steps == 30


def test_a_request_joins_a_running_batch_at_the_next_step(model):
    ps = prompts((7, 30, 4))
    expected = [alone(model, p, max_new_tokens=20, temperature=0, eos_id=-1) for p in ps]
    engine = Engine(model, max_batch_size=4, max_len=100)
    requests = [Request(p, max_new_tokens=20, temperature=0, eos_id=-1) for p in ps]
    engine.add(requests[0])
    for _ in range(5):
        engine.step()
    engine.add(requests[1])
    served = engine.step()                         # the newcomer gets its first token in this very step
    assert served == [requests[0], requests[1]] and len(requests[0].tokens) == 6 and len(requests[1].tokens) == 1
    engine.step()
    engine.add(requests[2])
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in requests] == expected


def test_cancelled_row_leaves_and_frees_its_slot(model):
    ps = prompts((6, 12, 3))
    expected = [alone(model, p, max_new_tokens=15, temperature=0, eos_id=-1) for p in ps]
    engine = Engine(model, max_batch_size=2, max_len=100)
    requests = [Request(p, max_new_tokens=15, temperature=0, eos_id=-1) for p in ps]
    for r in requests:
        engine.add(r)
    for _ in range(3):
        engine.step()
    assert requests[2].tokens == []                # no free slot yet: it waits
    requests[0].cancelled = True                   # as a server thread does when a client leaves
    engine.step()
    assert requests[0].finish_reason == "cancelled" and len(requests[0].tokens) == 3
    assert len(requests[2].tokens) == 1            # took the freed slot at once
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in requests[1:]] == expected[1:]


def test_sampling_with_a_seed_matches_generate_and_seeds_differ(model):
    ps = prompts((4, 11, 2))
    settings = dict(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3)
    expected = [alone(model, p, max_new_tokens=25, eos_id=-1, generator=torch.Generator().manual_seed(seed),
                      **settings) for seed, p in enumerate(ps)]
    engine = Engine(model, max_batch_size=3, max_len=100)
    requests = [Request(p, max_new_tokens=25, eos_id=-1, seed=seed, **settings) for seed, p in enumerate(ps)]
    for r in requests:
        engine.add(r)
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in requests] == expected
    other = generate_batch(model, [ps[0]], max_len=100, max_new_tokens=25, eos_id=-1, seed=99, **settings)
    assert other[0] != expected[0]
    unseeded = Request(ps[0], max_new_tokens=1, eos_id=-1)
    Engine(model, max_len=100).add(unseeded)
    assert isinstance(unseeded.seed, int)          # the seed actually used is kept, to repeat the run


def test_stop_string_ends_the_answer_and_is_never_released(model, tokenizer):
    prompt = prompts((8,))[0]
    full = alone(model, prompt, max_new_tokens=40, temperature=0, eos_id=-1)
    text = tokenizer.decode(full)
    # A stop string from the middle of the answer (3 characters from the 10th on): the answer ends before it.
    stop = text[10:13]
    cut = text.find(stop)
    engine = Engine(model, tokenizer, max_batch_size=2, max_len=100)
    request = Request(prompt, max_new_tokens=40, temperature=0, eos_id=-1, stop=("never appears \u2603", stop))
    other = Request(prompts((5,))[0], max_new_tokens=40, temperature=0, eos_id=-1)
    engine.add(request)
    engine.add(other)
    released = []
    while not request.finished:
        engine.step()
        released.append(request.text)
    assert request.finish_reason == "stop" and request.text == text[:cut]
    assert all(stop not in r and text.startswith(r) for r in released)  # streamed text only grows, never the stop
    assert len(request.tokens) < 40 and tokenizer.decode(request.tokens).find(stop) == cut
    while engine.has_work():
        engine.step()
    assert other.tokens == alone(model, other.prompt_ids, max_new_tokens=40, temperature=0, eos_id=-1)


def test_context_limits(model):
    engine = Engine(model, max_batch_size=1, max_len=20)
    with pytest.raises(ValueError, match="no room"):
        engine.add(Request(list(range(3, 23))))
    request = Request(list(range(3, 18)), max_new_tokens=100, temperature=0, eos_id=-1)
    tokens = list(engine.stream(request))
    assert len(tokens) == 5 and request.finish_reason == "length"  # the answer ends where the context does


def test_per_row_positions_forward_equals_one_row_forward(model):
    """The model part on its own: a right-padded batch with per-row positions and the mask gives each row
    the logits it gets alone."""
    from model.engine import SlotKVCache
    ps = prompts((3, 9, 6))
    longest = max(map(len, ps))
    cache = SlotKVCache(model.cfg, 3, 16, "cpu", torch.float32)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in ps])
    positions = torch.arange(longest).expand(3, longest)
    cache.rows, cache.positions, cache.key_len = torch.arange(3), positions, longest
    mask = torch.arange(longest)[None, None, :] <= positions[:, :, None]
    with torch.no_grad():
        batched = model(ids, cache=cache, positions=positions, attn_mask=mask)
        for row, p in enumerate(ps):
            torch.testing.assert_close(batched[row, :len(p)], model(torch.tensor([p]))[0])
    with pytest.raises(ValueError, match="go together"):
        model(ids, positions=positions)


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    """CTRL (arXiv:1909.05858): a seen token's positive logit is divided, a negative one multiplied, so both
    become less likely (dividing a negative logit, as MiniMind2 does, would make it MORE likely). The engine
    samples with model/generate.py's sample_next, checked here on both signs."""
    from model.generate import sample_next
    assert sample_next(torch.tensor([-1.0, -1.5]), [0], temperature=0, repetition_penalty=2.0) == 1  # -2 < -1.5
    assert sample_next(torch.tensor([-1.0, -1.5]), [0], temperature=0, repetition_penalty=1.0) == 0
    assert sample_next(torch.tensor([3.0, 2.0]), [0], temperature=0, repetition_penalty=2.0) == 1    # 1.5 < 2
