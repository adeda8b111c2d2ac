"""scripts/serve_openai_api.py end to end: a real server process on 127.0.0.1, the official `openai` client,
concurrent clients, a client that leaves mid-answer, a full queue, and every kind of bad request."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from model.generate import generate
from model.tokenizer import DEFAULT_TOKENIZER, EOS_ID, Tokenizer
from tests.conftest import ROOT
from model import ModelConfig, Transformer
from scripts.chat_screenshot import CHROMEDRIVER, CHROMIUM, ask, open_browser, set_field
from trainer.checkpoint import atomic_save, load_model, model_payload

CONTEXT = 4096       # --max_seq_len: room for long answers (greedy from the tiny model runs to max_tokens)
MAX_BATCH, MAX_QUEUE = 4, 4
PROMPTS = ["你好", "What is your name?", "「学习」是什么意思？", 'What does "water" mean?', "请背诵李白的《静夜思》。",
           "「床前明月光」的下一句是什么？", 'How do you say "book" in Chinese?', "Define the word \"happy\"."]


def random_model(seed):
    """A tiny model with random weights drawn wider than the training init (std 0.1, not 0.02). Its greedy
    answers are nonsense, but a different one for every prompt and a different token at almost every step,
    so any mix-up between rows of the batch shows (a trained tiny model answers every prompt with the same
    repeated character). It rarely samples </s>: answers run to max_tokens."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """The model served by default (full_sft_64.pth) and a second one (rlhf_64.pth, --extra_checkpoints)."""
    out = tmp_path_factory.mktemp("serve")
    atomic_save(model_payload(random_model(0), "full_sft", 0), str(out / "full_sft_64.pth"))
    atomic_save(model_payload(random_model(1), "rlhf", 0), str(out / "rlhf_64.pth"))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The server as a user starts it, on a free port; `stop` ends it (and fails the test if it died)."""

    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(f"/tmp/serve-test-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "scripts/serve_openai_api.py", "--port", str(self.port),
                                      "--device", "cpu", *map(str, args)], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.output()}")
            time.sleep(0.2)

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def health(self):
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self):
        alive = self.proc.poll() is None
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()
        return alive


@pytest.fixture(scope="module")
def server(out_dir):
    srv = Server("--out_dir", out_dir, "--max_batch_size", MAX_BATCH, "--max_queue", MAX_QUEUE,
                 "--max_seq_len", CONTEXT, "--extra_checkpoints", out_dir / "rlhf_64.pth")
    yield srv
    output = srv.output()
    assert srv.stop(), f"the server died:\n{output}"
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(out_dir):
    """Answers computed here, one at a time, with model/generate.py and the chat template: what the server
    must give (an independent path: no engine, no HTTP)."""
    models = {name: load_model(str(out_dir / f"{name}.pth"))[0].eval() for name in ("full_sft_64", "rlhf_64")}
    tokenizer = Tokenizer(DEFAULT_TOKENIZER)

    def answer(prompt, max_tokens, seed=None, model="full_sft_64", **sampling):
        """prompt: the user's message, or a whole conversation (a list of messages)."""
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True, system_prompt=DEFAULT_SYSTEM_PROMPT)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        tokens = list(generate(models[model], ids, max_tokens, generator=generator, **sampling))
        finish = "stop" if tokens[-1] == EOS_ID else "length"
        return tokenizer.decode([t for t in tokens if t != EOS_ID]), finish, len(ids), len(tokens)
    return answer


def test_models_health_and_page(server, client, reference):
    assert [m.id for m in client.models.list().data] == ["full_sft_64", "rlhf_64"]
    assert client.models.retrieve("rlhf_64").id == "rlhf_64"
    health = server.health()
    assert health["status"] == "ok" and health["running"] == 0
    assert health["models"]["rlhf_64"]["max_batch_size"] == MAX_BATCH
    page = httpx.get(server.url + "/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "textContent" in page.text


def test_openai_client_answer_equals_eval_model(out_dir, client, reference):
    prompt = PROMPTS[2]
    completion = client.chat.completions.create(model="full_sft_64", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=40, temperature=0)
    text, finish, prompt_tokens, completion_tokens = reference(prompt, 40, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text and len(text) > 5
    assert choice.finish_reason == finish
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert completion.usage.total_tokens == prompt_tokens + completion_tokens
    # eval_model.py in a pipe, greedy: stdout is the answer and a newline.
    proc = subprocess.run([sys.executable, "eval_model.py", "--out_dir", str(out_dir), "--temperature", "0",
                           "--max_new_tokens", "40", "--max_seq_len", str(CONTEXT)], input=prompt + "\n",
                          capture_output=True, text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == choice.message.content + "\n"


def test_a_request_picks_its_model(client, reference):
    prompt = PROMPTS[6]
    answers = {model: client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=30, temperature=0).choices[0].message.content
               for model in ("rlhf_64", "full_sft_64")}
    assert answers == {model: reference(prompt, 30, temperature=0, model=model)[0] for model in answers}
    assert answers["rlhf_64"] != answers["full_sft_64"]


def test_streaming_chunks_usage_and_stop_string(client, reference):
    prompt = PROMPTS[1]
    text, finish, prompt_tokens, completion_tokens = reference(prompt, 30, temperature=0)
    stream = client.chat.completions.create(model="full_sft_64", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text and sum(bool(d) for d in deltas) > 3  # streamed in pieces, not at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    # A stop string from inside the answer: the answer ends just before it, finish_reason "stop".
    stop = text[8:10]
    stopped = client.chat.completions.create(model="full_sft_64", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[:text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_eight_concurrent_clients_get_their_sequential_answers(server, client, reference):
    # Greedy for half of them, seeded sampling for the other half: each row keeps its own settings and
    # random generator inside the shared batch.
    jobs = [(p, dict(temperature=0) if i % 2 == 0 else dict(temperature=1.0, top_p=0.9, seed=i))
            for i, p in enumerate(PROMPTS)]
    max_tokens = [20 + 7 * i for i in range(len(jobs))]  # different lengths: rows leave at different steps
    answers = [None] * len(jobs)

    def ask(i):
        prompt, sampling = jobs[i]
        completion = client.chat.completions.create(model="full_sft_64", max_tokens=max_tokens[i],
                                                    messages=[{"role": "user", "content": prompt}], **sampling)
        answers[i] = (completion.choices[0].message.content, completion.choices[0].finish_reason)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    expected = []
    for (prompt, sampling), n in zip(jobs, max_tokens):
        sampling = dict(sampling)
        seed = sampling.pop("seed", None)
        expected.append(reference(prompt, n, seed=seed, **sampling)[:2])
    assert answers == expected
    assert len({a for a, _ in answers}) > 4  # the prompts really got different answers
    assert server.health()["completed"] >= len(jobs)


def stream_lines(url, body, lines, leave_after=None):
    """POST a streaming request with plain httpx; collect its `data:` lines; optionally hang up early."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if leave_after is not None and len(lines) >= leave_after:
                    return  # leaving the `with` closes the connection mid-answer


def streamed_text(lines):
    assert lines[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(line) for line in lines[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_client_leaving_mid_stream_does_not_disturb_the_others(server, reference):
    before = server.health()["cancelled"]
    stayers = [PROMPTS[4], PROMPTS[6]]
    results = [[], [], []]
    threads = [threading.Thread(target=stream_lines, args=(
        server.url, {"messages": [{"role": "user", "content": p}], "max_tokens": 150, "temperature": 0,
                     "stream": True}, results[i])) for i, p in enumerate(stayers)]
    leaver = threading.Thread(target=stream_lines, args=(
        server.url, {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 3000, "temperature": 0,
                     "stream": True}, results[2], 5))
    for t in threads + [leaver]:
        t.start()
    for t in threads + [leaver]:
        t.join(timeout=120)
    for lines, prompt in zip(results, stayers):
        assert streamed_text(lines) == reference(prompt, 150, temperature=0)[0]
    assert len(results[2]) == 5
    deadline = time.monotonic() + 20  # the row is dropped at the next token the server fails to send
    while server.health()["cancelled"] != before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    health = server.health()
    assert health["cancelled"] == before + 1 and health["running"] == 0, health


def test_client_leaving_before_a_whole_answer_has_its_row_dropped(server):
    """Not streaming: the server notices the closed connection while it waits for the answer."""
    before = server.health()["cancelled"]
    body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 3500,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 20
        while server.health()["running"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.health()["running"] == 1
    deadline = time.monotonic() + 20  # the handler looks at the connection every 0.5 s
    while server.health()["cancelled"] != before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    health = server.health()
    assert (health["cancelled"], health["running"]) == (before + 1, 0), health


def test_full_queue_answers_503_and_the_server_recovers(server):
    long_body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 3500, "temperature": 0,
                 "stream": True}
    before = server.health()["cancelled"]
    with contextlib.ExitStack() as open_streams, httpx.Client(timeout=60, limits=httpx.Limits(max_connections=20)) as http:
        # Fill every row (each has its first token), then every queue place (each has the role chunk).
        readers = []
        for has_a_row in [True] * MAX_BATCH + [False] * MAX_QUEUE:
            response = open_streams.enter_context(http.stream("POST", server.url + "/v1/chat/completions",
                                                              json=long_body))
            # Kept: a line iterator that is garbage-collected closes its response.
            readers.append(lines := (line for line in response.iter_lines() if line.startswith("data: ")))
            assert '"role": "assistant"' in next(lines)
            if has_a_row:
                assert '"content"' in next(lines)
        health = server.health()
        assert (health["running"], health["queued"]) == (MAX_BATCH, MAX_QUEUE), health
        busy = httpx.post(server.url + "/v1/chat/completions", json=long_body, timeout=10)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "server_error" and busy.json()["error"]["code"] == "overloaded"
    # Leaving the `with` hung up on all eight: their rows and queue places are dropped.
    deadline = time.monotonic() + 30
    while (server.health()["running"] or server.health()["queued"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    health = server.health()
    assert (health["running"], health["queued"], health["cancelled"]) == (0, 0, before + MAX_BATCH + MAX_QUEUE)
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


def user(text="hi"):
    return [{"role": "user", "content": text}]


BAD_REQUESTS = [  # (what, raw body, status, error param)
    ("malformed JSON", b'{"messages": [', 400, None),
    ("not UTF-8", b'\xff\xfe', 400, None),
    ("body is a list", b"[]", 400, None),
    ("no messages", {"model": "full_sft_64"}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("a message not an object", {"messages": ["hi"]}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("empty content", {"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ("roles not alternating", {"messages": user() + user()}, 400, "messages"),
    ("system message not first", {"messages": user() + [{"role": "system", "content": "x"}]}, 400, "messages"),
    ("ends with the assistant", {"messages": user() + [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("prompt longer than the context", {"messages": user("word " * CONTEXT)}, 400, "messages"),
    ("max_tokens 0", {"messages": user(), "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"messages": user(), "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens a string", {"messages": user(), "max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens true", {"messages": user(), "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens 2.5", {"messages": user(), "max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature a string", {"messages": user(), "temperature": "hot"}, 400, "temperature"),
    ("temperature negative", {"messages": user(), "temperature": -1}, 400, "temperature"),
    ("top_p 0", {"messages": user(), "top_p": 0}, 400, "top_p"),
    ("top_p above 1", {"messages": user(), "top_p": 1.5}, 400, "top_p"),
    ("stop a number", {"messages": user(), "stop": 5}, 400, "stop"),
    ("stop list with a number", {"messages": user(), "stop": ["a", 1]}, 400, "stop"),
    ("seed a string", {"messages": user(), "seed": "x"}, 400, "seed"),
    ("seed past 64 bits", {"messages": user(), "seed": 2**64}, 400, "seed"),
    ("JSON nested too deep", b"[" * 100000 + b"]" * 100000, 400, None),
    ("NaN temperature", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("stream a string", {"messages": user(), "stream": "yes"}, 400, "stream"),
    ("n 2", {"messages": user(), "n": 2}, 400, "n"),
    ("model a number", {"messages": user(), "model": 7}, 400, "model"),
    ("unknown model", {"messages": user(), "model": "gpt-4"}, 404, "model"),
]


def test_bad_requests_get_their_status_and_error_json_and_the_server_keeps_serving(server):
    seen = []
    for what, body, status, param in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=30,
                              headers={"Content-Type": "application/json"})
        error = response.json().get("error", {})
        seen.append((what, response.status_code, error.get("param")))
        assert isinstance(error.get("message"), str) and error["message"] and error.get("type"), (what, response.text)
    assert seen == [(what, status, param) for what, _, status, param in BAD_REQUESTS]
    for method, path, status in [("GET", "/v1/nothing", 404), ("POST", "/v1/models", 405),
                                 ("GET", "/v1/models/gpt-4", 404), ("GET", "/v1/chat/completions", 405)]:
        response = httpx.request(method, server.url + path, timeout=10)
        assert response.status_code == status and response.json()["error"]["message"], (path, response.text)
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                    json={"messages": user(), "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.health()["status"] == "ok"


def test_port_in_use_is_one_line(out_dir, server):
    proc = subprocess.run([sys.executable, "scripts/serve_openai_api.py", "--out_dir", str(out_dir), "--port",
                           str(server.port), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"could not serve on 127.0.0.1:{server.port}" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="no Debian chromium + chromium-driver (apt-get install chromium chromium-driver)")
def test_chat_page_in_a_real_browser(server, reference, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait
    driver = open_browser()
    wait = WebDriverWait(driver, 60)
    script = driver.execute_script
    try:
        driver.get(server.url + "/")
        wait.until(lambda d: script("return [...document.querySelectorAll('#model option')].map(o => o.value)")
                   == ["full_sft_64", "rlhf_64"])
        set_field(driver, "temperature", 0)
        set_field(driver, "max_tokens", 300)
        first_question = "<b>bold?</b> " + PROMPTS[3]
        first, shown = ask(driver, first_question)
        assert first == reference(first_question, 300, temperature=0)[0] and len(first) > 50
        assert len({len(t) for t in shown if 0 < len(t) < len(first)}) >= 3, "the answer did not stream"
        second, _ = ask(driver, PROMPTS[5])  # the second turn is sent with the first exchange as history
        history = [{"role": "user", "content": first_question}, {"role": "assistant", "content": first},
                   {"role": "user", "content": PROMPTS[5]}]
        assert second == reference(history, 300, temperature=0)[0]
        # HTML in the conversation is shown as text: no element inside any message bubble.
        bubbles = script("return [...document.querySelectorAll('#messages .msg')]"
                         ".map(m => [m.className, m.children.length, m.textContent])")
        assert [(c.split()[1], n) for c, n, _ in bubbles] == [("user", 0), ("assistant", 0)] * 2
        assert bubbles[0][2] == first_question
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # Stop: a long answer stopped mid-stream; its row leaves the server's batch; New chat empties the page.
        cancelled = server.health()["cancelled"]
        set_field(driver, "max_tokens", 3000)
        driver.find_element("id", "prompt").send_keys(PROMPTS[0] + "\n")
        wait.until(lambda d: len(script("return [...document.querySelectorAll('.assistant')].pop().textContent")) > 20)
        driver.find_element("id", "stop").click()
        wait.until(lambda d: "stopped" in d.find_element("id", "status").text)
        deadline = time.monotonic() + 20
        while server.health()["cancelled"] != cancelled + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.health()["cancelled"] == cancelled + 1
        driver.find_element("id", "new_chat").click()
        assert script("return document.querySelectorAll('#messages .msg').length") == 0
        set_field(driver, "max_tokens", 100)
        Select(driver.find_element("id", "model")).select_by_value("rlhf_64")  # the model picker
        third, _ = ask(driver, PROMPTS[2])  # a new conversation (no history sent), with the other model
        assert third == reference(PROMPTS[2], 100, temperature=0, model="rlhf_64")[0]
    finally:
        driver.quit()
