"""Serve a trained model over the OpenAI chat API, to many users at once, with a web chat page at /.

    python scripts/serve_openai_api.py                        # the SFT model in out/, http://127.0.0.1:8998
    python scripts/serve_openai_api.py --model_mode 2 --max_batch_size 16
    python scripts/serve_openai_api.py --checkpoint out/full_sft_768.pth --host 0.0.0.0
    python scripts/serve_openai_api.py --extra_checkpoints out/pretrain_128.pth out/rlhf_128.pth   # 3 models

    POST /v1/chat/completions   messages, stream, max_tokens, temperature, top_p, stop, seed (OpenAI's fields)
    GET  /v1/models             the models served (an id is the checkpoint's file name without .pth)
    GET  /health                {"status": "ok", running / queued rows, ...}
    GET  /                      the chat page (scripts/chat.html)

How many users share the model (continuous batching): one background thread owns the batched engine
(model/engine.py) and loops: take new requests into free rows of the batch, run one decoding step for all rows,
hand each request its new text. A request that arrives while others generate joins at the next step; a row
whose client has gone is dropped at the next step. Requests wait in a queue of --max_queue places for a free
row; when that is full the server answers 503 at once (the client may retry) instead of piling up work.
Every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}} with a 4xx status.
Each model served (the main one, and any --extra_checkpoints) has its own batch thread, rows and queue.
"""
import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python scripts/serve_openai_api.py`: import the project's packages

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request as HTTPRequest  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from dataset.chat import DEFAULT_SYSTEM_PROMPT, ChatFormatError, render_chat, validate_messages  # noqa: E402
from model.engine import Engine, Request  # noqa: E402
from trainer.chat_model import ChatModel, add_model_args, load_chat_model, text_prompt  # noqa: E402
from trainer.cli import ArgumentParser, UserError, non_negative_float, positive_int, probability_mass, run_main  # noqa: E402

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
MAX_STOP_STRINGS = 4  # as OpenAI


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--extra_checkpoints", nargs="+", default=[], metavar="PATH",
                    help="more checkpoints to serve next to the main one (a request picks one by its `model`)")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    ap.add_argument("--port", type=positive_int, default=8998, help="as MiniMind2's server")
    ap.add_argument("--max_batch_size", type=positive_int, default=8, help="rows decoded together")
    ap.add_argument("--max_queue", type=positive_int, default=64,
                    help="requests waiting for a free row; one more is answered 503")
    ap.add_argument("--max_seq_len", type=positive_int, default=None,
                    help="context per conversation, prompt + answer (default: the checkpoint's max_seq_len)")
    ap.add_argument("--max_tokens", type=positive_int, default=512,
                    help="longest answer when a request gives no max_tokens")
    ap.add_argument("--temperature", type=non_negative_float, default=0.85,
                    help="when a request gives none (default: 0.85, as eval_model.py; OpenAI's is 1)")
    ap.add_argument("--top_p", type=probability_mass, default=0.85, help="when a request gives none (as eval_model.py)")
    ap.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                    help="used when a conversation has no system message ('' for none); the same default as "
                         "eval_model.py, so both give the same answers")
    return ap.parse_args(argv)


class APIError(Exception):
    """A request the server refuses: answered with `status` and OpenAI's error JSON."""

    def __init__(self, status, message, param=None, code=None, error_type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, error_type

    def response(self, headers=None):
        return error_response(self.status, self.message, self.param, self.code, self.type, headers)


def error_response(status, message, param=None, code=None, error_type="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------- the batch loop

class Job:
    """One chat completion on its way: the engine's Request, and the asyncio queue its HTTP handler reads.
    The batch thread puts (text so far, tokens so far, finish_reason) there after each step of the row."""

    def __init__(self, request, loop):
        self.request, self.loop = request, loop
        self.updates = asyncio.Queue()
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def publish(self, update):
        """Called from the batch thread: hand an update to the handler's event loop (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, update)
        except RuntimeError:  # the event loop is closed (the server is shutting down): nobody listens
            pass

    def cancel(self):
        """The client left (or the handler ended early): the row leaves the batch at the next step."""
        self.request.cancelled = True


class BatchLoop(threading.Thread):
    """The one thread that runs the model. It owns the engine; other threads only `submit` jobs (which
    raises queue.Full when every row is busy and `max_queue` jobs already wait) and set `request.cancelled`."""

    def __init__(self, engine, max_queue):
        super().__init__(name="batch-loop", daemon=True)
        self.engine = engine
        self.inbox = queue.Queue()  # submitted, not yet given to the engine
        # Jobs submitted and not finished, counted under a lock by the handlers (submit) and this thread
        # (a job ends): the bound is rows + queue places, whatever the threads' timing.
        self.capacity, self.in_flight, self.lock = len(engine.slots) + max_queue, 0, threading.Lock()
        self.jobs = {}           # engine request -> job, for the rows the engine has
        self.stopping = threading.Event()
        self.cancelled = 0       # rows dropped because their client left (shown in /health)
        self.completed = 0

    def submit(self, job):
        with self.lock:
            if self.in_flight >= self.capacity:
                raise queue.Full
            self.in_flight += 1
        self.inbox.put(job)

    def running(self):
        return sum(r is not None for r in self.engine.slots)

    def queued(self):
        return self.in_flight - self.running()

    def finish(self, job):
        with self.lock:
            self.in_flight -= 1

    def free_rows(self):
        return self.engine.slots.count(None) - len(self.engine.waiting)

    def run(self):
        while not self.stopping.is_set():
            if not self.engine.has_work():  # idle: sleep until a request comes (or shutdown is asked)
                try:
                    job = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                self.admit(job)
            # Requests take free rows only; the rest wait in the inbox (submit bounds how many).
            while self.free_rows() > 0:
                try:
                    self.admit(self.inbox.get_nowait())
                except queue.Empty:
                    break
            self.step()

    def admit(self, job):
        try:
            self.engine.add(job.request)  # the handler checked the prompt and the seed: this should not raise
        except Exception as e:  # noqa: BLE001 - one bad request must not end the loop that serves everyone
            job.publish(("error", f"{type(e).__name__}: {e}"))
            self.finish(job)
            return
        self.jobs[job.request] = job

    def step(self):
        try:
            served = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failing step (a bug, out of memory) must not kill the server
            print(f"batch step failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            for job in self.jobs.values():
                job.publish(("error", f"generation failed: {type(e).__name__}: {e}"))
                self.engine.cancel(job.request)
                self.finish(job)
            self.jobs.clear()
            return
        for request in served:
            self.jobs[request].publish((request.text, len(request.tokens), request.finish_reason))
        # Rows that ended (or were cancelled at the start of this step) are no longer the engine's.
        for request in [r for r in self.jobs if r.finished]:
            job = self.jobs.pop(request)
            self.finish(job)
            if request.finish_reason == "cancelled":
                self.cancelled += 1
            else:
                self.completed += 1
            if request not in served:  # cancelled: tell the handler, should it still be listening
                job.publish((request.text, len(request.tokens), request.finish_reason))


@dataclass
class ServedModel:
    """A model the server answers with: the loaded checkpoint, the thread that runs it, its context."""
    chat: ChatModel
    batch_loop: BatchLoop
    context: int

    @property
    def name(self):
        return self.chat.name


# ----------------------------------------------------------------------------------------- reading a request

def field(body, name, kinds, default=None, check=None, must=""):
    """body[name] if it has one of the JSON types `kinds` (and passes `check`), else APIError 400.
    JSON true/false are not numbers here (Python's bool is an int)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or (check and not check(value)):
        raise APIError(400, f"'{name}': {must or 'wrong type'}, got {json.dumps(value)[:80]}", param=name,
                       code="invalid_value")
    return value


def message_text(i, message):
    """A message's content: a string, or OpenAI's list of parts [{"type": "text", "text": ...}] (text only)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
        return "".join(p["text"] for p in content)
    return content


def find_model(models, name):
    if name not in models:
        raise APIError(404, f"the model '{name}' does not exist; this server has {', '.join(map(repr, models))} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    return models[name]


def read_completion_request(body, models, args):
    """Check an OpenAI chat completion request; return (the ServedModel it asks for, prompt ids, Request
    settings, stream, include_usage). No `model`: the first one (the main checkpoint)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    served = find_model(models, field(body, "model", (str,), default=next(iter(models)), must="must be a string"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    messages = [{"role": m.get("role"), "content": message_text(i, m)} if isinstance(m, dict) else m
                for i, m in enumerate(messages)]
    try:
        validate_messages(messages)  # roles, alternation, non-empty text (dataset/chat.py)
    except ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from None
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's (the model answers it)", param="messages")
    stream = field(body, "stream", (bool,), default=False, must="must be true or false")
    options = field(body, "stream_options", (dict,), default={}, must="must be an object")
    if field(body, "n", (int,), default=1, must="must be an integer") != 1:
        raise APIError(400, "'n': only one choice per request (n=1) is supported", param="n")
    max_tokens = field(body, "max_tokens", (int,), check=lambda v: v > 0, must="must be an integer >= 1")
    max_tokens = field(body, "max_completion_tokens", (int,), default=max_tokens or args.max_tokens,
                       check=lambda v: v > 0, must="must be an integer >= 1")
    stop = field(body, "stop", (str, list), default=[], must="must be a string or a list of strings",
                 check=lambda v: isinstance(v, str) or (len(v) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in v)))
    settings = dict(
        max_new_tokens=max_tokens,
        temperature=field(body, "temperature", (int, float), default=args.temperature, check=lambda v: 0 <= v <= 2,
                          must="must be a number in [0, 2]"),
        top_p=field(body, "top_p", (int, float), default=args.top_p, check=lambda v: 0 < v <= 1,
                    must="must be a number in (0, 1]"),
        top_k=field(body, "top_k", (int,), default=0, check=lambda v: v >= 0, must="must be an integer >= 0"),
        repetition_penalty=field(body, "repetition_penalty", (int, float), default=1.0, check=lambda v: v > 0,
                                 must="must be a number > 0"),
        seed=field(body, "seed", (int,), check=lambda v: -2**63 <= v < 2**64, must="must be a 64-bit integer"),
        stop=tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s),
    )
    tokenizer = served.chat.tokenizer
    if served.chat.chat:  # the chat template eval_model.py uses, with the same default system prompt
        ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True, system_prompt=args.system_prompt or None)
    else:  # a pretrained model continues the text of the last message (it has never seen the template)
        ids = text_prompt(tokenizer, messages[-1]["content"])
    if len(ids) >= served.context:
        raise APIError(400, f"the prompt is {len(ids)} tokens (with the chat template); the context is "
                            f"{served.context} tokens, and the answer needs at least one", param="messages",
                       code="context_length_exceeded")
    return served, ids, settings, stream, bool(options.get("include_usage"))


# ----------------------------------------------------------------------------------------------- the HTTP API

def create_app(models, args):
    """The HTTP API over `models` (name -> ServedModel; the first is the default)."""
    app = FastAPI(title="TinyMind", docs_url=None, redoc_url=None, openapi_url=None)

    # Every error in OpenAI's shape: ours, unknown paths / wrong methods (starlette's), and anything else.
    @app.exception_handler(APIError)
    async def on_api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_, e: RequestValidationError):
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def on_bug(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", error_type="server_error")

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        """Rows running and queued, requests completed and cancelled: per model, and summed over them."""
        per_model = {name: {"running": m.batch_loop.running(), "queued": m.batch_loop.queued(),
                            "completed": m.batch_loop.completed, "cancelled": m.batch_loop.cancelled,
                            "max_batch_size": len(m.batch_loop.engine.slots)} for name, m in models.items()}
        alive = all(m.batch_loop.is_alive() for m in models.values())
        totals = {key: sum(m[key] for m in per_model.values()) for key in ("running", "queued", "completed", "cancelled")}
        body = {"status": "ok" if alive else "a batch loop stopped", **totals, "models": per_model}
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_card(served):
        return {"id": served.name, "object": "model", "created": int(os.path.getmtime(served.chat.path)),
                "owned_by": "tinymind", "context_length": served.context, "stage": served.chat.ckpt.get("stage")}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in models.values()]}

    @app.get("/v1/models/{model_id}")
    async def one_model(model_id: str):
        return model_card(find_model(models, model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: [[[[...]]]]
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        served, ids, settings, stream, include_usage = read_completion_request(body, models, args)
        job = Job(Request(ids, **settings), asyncio.get_running_loop())
        try:
            served.batch_loop.submit(job)
        except queue.Full:
            error = APIError(503, f"the server is busy ({args.max_queue} requests already wait); retry later",
                             error_type="server_error", code="overloaded")
            return error.response(headers={"Retry-After": "1"})
        if stream:
            return CancelOnExit(sse_chunks(job, served, include_usage), job, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole_answer(job, http, served)

    return app


def usage(job):
    prompt, completion = len(job.request.prompt_ids), len(job.request.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(reason):
    return "length" if reason == "length" else "stop"


async def whole_answer(job, http, served, check_every=0.5):
    """Wait for the answer; every `check_every` seconds look whether the client is still there (else drop
    the row). Updates come at every step, so the check goes by the clock, not by a quiet queue."""
    last_check = time.monotonic()
    while True:
        try:
            update = await asyncio.wait_for(job.updates.get(), timeout=check_every)
        except asyncio.TimeoutError:
            update = None
        if update and update[0] == "error":
            return error_response(500, update[1], error_type="server_error")
        if update and update[2] is not None:
            text, _, reason = update
            break
        if time.monotonic() - last_check >= check_every:
            last_check = time.monotonic()
            if await http.is_disconnected():
                job.cancel()
                return error_response(499, "client closed the request")  # nobody reads it
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": served.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(reason), "logprobs": None}],
            "usage": usage(job), "system_fingerprint": None}


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_chunks(job, served, include_usage):
    """Server-sent events in OpenAI's chunk format: the role, then text deltas, then the finish_reason (and
    the usage when stream_options.include_usage asks for it), then `data: [DONE]`."""
    def chunk(delta, reason=None):
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": served.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
                "system_fingerprint": None}

    yield sse(chunk({"role": "assistant", "content": ""}))
    sent = ""
    while True:
        update = await job.updates.get()
        if update[0] == "error":
            yield sse({"error": {"message": update[1], "type": "server_error", "param": None, "code": None}})
            break
        text, _, reason = update
        if len(text) > len(sent):
            yield sse(chunk({"content": text[len(sent):]}))
            sent = text
        if reason is not None:
            yield sse(chunk({}, finish_reason(reason)))
            if include_usage:
                yield sse({**chunk({}), "choices": [], "usage": usage(job)})
            break
    yield "data: [DONE]\n\n"


class CancelOnExit(StreamingResponse):
    """A streaming response that drops its row when it ends early: the client disconnected (sending fails)
    or the server shuts down. After a complete answer the cancel is a no-op."""

    def __init__(self, content, job, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def load_models(args):
    """name -> ServedModel: the checkpoint the model flags name first, then --extra_checkpoints (no LoRA)."""
    loaded = [load_chat_model(args)]
    for path in args.extra_checkpoints:
        loaded.append(load_chat_model(argparse.Namespace(**{**vars(args), "checkpoint": path, "lora_name": None})))
    models = {}
    for chat in loaded:
        if chat.name in models:
            raise UserError(f"two checkpoints named {chat.name} ({models[chat.name].chat.path}, {chat.path}): the "
                            "model id is the file name, so serve files with different names")
        context = args.max_seq_len or chat.model.cfg.max_seq_len
        engine = Engine(chat.model, chat.tokenizer, args.max_batch_size, context)
        models[chat.name] = ServedModel(chat, BatchLoop(engine, args.max_queue), context)
        note = f" + LoRA adapters {chat.lora_path}" if chat.lora else ""
        print(f"{chat.path}{note}: serving '{chat.name}' ({'chat' if chat.chat else 'text continuation'}) on "
              f"{chat.device}, context {context} tokens, {args.max_batch_size} rows per batch", file=sys.stderr)
    return models


def main():
    args = parse_args()
    models = load_models(args)
    for served in models.values():
        served.batch_loop.start()
    print(f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(models, args), host=args.host, port=args.port, log_level="warning")
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind (port in use): say so in one line
        if e.code:
            raise UserError(f"could not serve on {args.host}:{args.port} (in use? pick another --port)") from None
    finally:
        for served in models.values():
            served.batch_loop.stopping.set()


if __name__ == "__main__":
    run_main(main)
