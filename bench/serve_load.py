"""Load on the OpenAI-compatible server: N concurrent clients for a bounded time. Figures, not a test.

    python bench/serve_load.py                          # starts its own servers (random tiny model), 1/4/16 clients
    python bench/serve_load.py --checkpoint out/full_sft_512.pth --seconds 30
    python bench/serve_load.py --url http://127.0.0.1:8998 --clients 8  # a server that already runs

Each client sends streaming chat completions one after another until --seconds have passed (the request in
flight then finishes). Printed per run: requests/s, generated tokens/s (the usage counts), time to first
token and whole-request latency (p50, p99), and errors. Without --url the bench starts the server twice, with
--max_batch_size 1 (one request at a time: the others queue) and with --max_batch_size = the most clients, so
the table shows what continuous batching buys. Without --checkpoint it saves a model with random weights
(--dim, --n_layers) in a temporary folder; speed does not depend on the weights' values.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["你好", "What is your name?", "「学习」是什么意思？", 'What does "water" mean?', "请背诵李白的《静夜思》。",
           "「床前明月光」的下一句是什么？", 'How do you say "book" in Chinese?', "Define the word \"happy\"."]


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def one_request(url, prompt, max_tokens, seed):
    """Stream one answer; return (time to first token, latency, completion tokens)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.85,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    return (first if first is not None else latency), latency, tokens


def load(url, clients, seconds, max_tokens):
    """`clients` threads sending requests back to back for `seconds`; the figures of the run."""
    results, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i):
        n = 0
        while time.perf_counter() < deadline:
            try:
                result = one_request(url, PROMPTS[(i + n) % len(PROMPTS)], max_tokens, seed=1000 * i + n)
                with lock:
                    results.append(result)
            except Exception as e:  # noqa: BLE001 - a failed request is a figure of the run, not the end of it
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            n += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft, latency = [r[0] for r in results], [r[1] for r in results]
    return {"requests/s": len(results) / wall, "tokens/s": sum(r[2] for r in results) / wall,
            "ttft p50": percentile(ttft, 50), "ttft p99": percentile(ttft, 99),
            "latency p50": percentile(latency, 50), "latency p99": percentile(latency, 99),
            "requests": len(results), "errors": len(errors), "first error": errors[0] if errors else ""}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, max_batch_size, max_queue, extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve_openai_api.py"), "--checkpoint",
                             checkpoint, "--port", str(port), "--max_batch_size", str(max_batch_size),
                             "--max_queue", str(max_queue), *extra], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")


def random_checkpoint(folder, dim, n_layers):
    import torch
    from model import ModelConfig, Transformer
    from trainer.checkpoint import atomic_save, model_payload
    torch.manual_seed(0)
    path = os.path.join(folder, f"full_sft_{dim}.pth")
    atomic_save(model_payload(Transformer(ModelConfig(dim=dim, n_layers=n_layers)), "full_sft", 0), path)
    return path


def print_table(rows):
    columns = ["server batch", "clients", "requests/s", "tokens/s", "ttft p50", "ttft p99", "latency p50",
               "latency p99", "errors"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in columns) + "|")
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("| " + " | ".join(cell.rjust(len(c)) for cell, c in zip(cells, columns)) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start our own, twice)")
    ap.add_argument("--checkpoint", default=None, help="the model our servers load (default: random weights)")
    ap.add_argument("--dim", type=int, default=64, help="the random model's size (without --checkpoint)")
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=10.0, help="each run sends new requests for this long")
    ap.add_argument("--max_tokens", type=int, default=128, help="per answer")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    rows = []
    if args.url:
        for clients in args.clients:
            rows.append({"server batch": "?", "clients": clients,
                         **load(args.url, clients, args.seconds, args.max_tokens)})
        print_table(rows)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or random_checkpoint(folder, args.dim, args.n_layers)
        print(f"model {checkpoint}, {args.seconds:g} s per run, answers of up to {args.max_tokens} tokens, "
              f"device {args.device}", flush=True)
        for batch in sorted({1, max(args.clients)}):
            proc, url = start_server(checkpoint, batch, max(args.clients), ["--device", args.device])
            try:
                for clients in args.clients:
                    rows.append({"server batch": batch, "clients": clients,
                                 **load(url, clients, args.seconds, args.max_tokens)})
            finally:
                proc.terminate()
                proc.wait()
    print_table(rows)
    for row in rows:
        if row["errors"]:
            print(f"batch {row['server batch']}, {row['clients']} clients: {row['errors']} errors, e.g. {row['first error']}")


if __name__ == "__main__":
    main()
