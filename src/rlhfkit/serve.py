"""``rlhfkit serve --model DIR``: an OpenAI-compatible chat-completions server for a causal LM.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (no streaming). Honoured:
``messages``, ``temperature`` (0 = greedy), ``top_p``, ``max_tokens``, ``n``, ``stop``, ``seed``,
``logprobs`` and ``top_logprobs`` (log-probabilities of the model's raw distribution, before
temperature and top-p, as OpenAI reports them). ``usage`` counts the prompt once and the
completion tokens of all ``n`` choices. Messages are rendered by ``data.chat.render_prompt``, the
function training, labelling and eval use: the tokenizer's chat template when it has one; without
one, a single user message is its text as is (the plain format training used), a conversation
``role: content`` lines cued with ``assistant:``.

Limits, each answered in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``:
a prompt whose tokens plus ``max_tokens`` exceed the model's context (its config's
``max_position_embeddings``) is a 400 with code ``context_length_exceeded``, found by counting the
prompt's tokens before any generation; out-of-range numbers (``seed: 2**70``, a 5,000-digit
integer, ``1e400``) and bodies nested deeper than ``MAX_JSON_DEPTH`` are 400s; a full queue is a
429 (``rate_limit_exceeded``, ``Retry-After: 1``); any other failure is a 500 (``server_error``)
whose traceback goes to stderr, never to the client.

One worker thread runs every generation (``generate`` on a shared module is not thread-safe, and
on a CPU parallel calls only slow each other down). Requests wait for it in a bounded queue; see
:class:`ChatModel` for how the requests waiting together are batched.
"""
from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20
MAX_JSON_DEPTH = 32
"""deepest nesting of arrays and objects a request body may have (a chat request needs 3)"""
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
"""what ``torch.manual_seed`` accepts; outside it torch raises instead of seeding"""
_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}


class BadRequest(ValueError):
    """A 400; ``code`` and ``param`` fill the fields of OpenAI's error object."""

    def __init__(self, msg: str, code: str | None = None, param: str | None = None):
        super().__init__(msg)
        self.code, self.param = code, param


class QueueFull(RuntimeError):
    """The generation queue holds ``queue_depth`` requests already (a 429)."""


class GenerationFailed(RuntimeError):
    """``generate`` raised in the worker; the worker logged the traceback (a 500)."""


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.DOTALL)  # possessive, and an open string runs to the end: linear
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, measured without parsing it.

    The trap: ``json.loads`` recurses once per level, so a 30,000-deep ``[[[...]]]`` that fits
    under any size cap raises RecursionError deep in a handler (the client sees a dropped
    connection). Strings are cut out first, so brackets inside them do not count; on text that is
    not JSON the result is only an estimate, and the parser refuses such text anyway.
    """
    depth = deepest = 0
    for c in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        depth += 1 if c in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model directory, .gguf file, or package:NAME/FILE.gguf")
    p.add_argument("--gguf-file", default=None, help="the .gguf file inside --model, when it holds several")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--queue-depth", type=int, default=32,
                   help="requests that may wait for generation; one more is answered 429 (default 32)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most requests with the same sampling settings generated together (default 16)")
    p.add_argument("--api-key-env", default=None,
                   help="require 'Authorization: Bearer KEY' where KEY is this environment variable's value")


def _validate(body: dict, max_tokens_limit: int) -> dict:
    """The request's parameters, checked; raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{'role': system|user|assistant, 'content': string}}")

    def num(key, default, lo, hi, kind=float):
        v = body.get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise BadRequest(f"'{key}' must be a{'n integer' if kind is int else ' number'}")
        if not lo <= v <= hi:
            raise BadRequest(f"'{key}' must be in [{lo}, {hi}], got {v}")
        return kind(v)

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be true or false")
    top = num("top_logprobs", 0, 0, 20, int)
    if top and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", param="seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise BadRequest(f"'seed' must be in [-2**63, 2**64 - 1], got {seed}", param="seed")
    return {"messages": msgs, "temperature": num("temperature", 1.0, 0.0, 2.0), "top_p": num("top_p", 1.0, 0.0, 1.0),
            "max_tokens": num("max_tokens", 64, 1, max_tokens_limit, int), "n": num("n", 1, 1, 16, int),
            "stop": stop, "logprobs": logprobs, "top_logprobs": top, "seed": seed}


class _Job:
    """One request on its way through the queue: the worker fills ``seqs``/``logits`` or ``error``."""

    def __init__(self, req: dict, ids: list[int]):
        self.req, self.ids = req, ids
        self.seqs = self.logits = self.error = None
        self.done = threading.Event()


def _sampling_key(req: dict) -> tuple:
    """Requests with equal keys can share one ``generate`` call (their results are cut apart after)."""
    return (req["temperature"], req["top_p"], req["max_tokens"], req["n"], req["logprobs"])


class ChatModel:
    """Generation behind the API: a model, its tokenizer, and one worker fed by a bounded queue.

    At most ``queue_depth`` requests wait; one more raises QueueFull (a 429) at once instead of
    waiting behind them. When the worker is free it takes everything waiting, up to
    ``max_batch``, and runs one left-padded ``generate`` per group with equal sampling settings
    (temperature, top_p, max_tokens, n, logprobs), in arrival order. A request with a ``seed``
    always runs alone: its answer must not depend on what else happened to be waiting.
    """

    def __init__(self, model, tokenizer, name: str, queue_depth: int = 32, max_batch: int = 16,
                 context_length: int | None = None):
        if queue_depth < 1 or max_batch < 1:  # Queue(maxsize=0) would be unbounded
            raise ValueError(f"queue_depth and max_batch must be >= 1, got {queue_depth} and {max_batch}")
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.context_length = context_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        """prompt tokens + max_tokens may not exceed this: the config's ``max_position_embeddings`` unless
        given (None: unknown, not checked)"""
        self.max_batch = max_batch
        self.queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_depth)
        # Fast tokenizers are Rust objects that raise "Already borrowed" when two threads use one at once.
        self.tok_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.completions = 0
        """requests answered (a diagnostic; tests count cache hits with it)"""
        self.generate_calls = 0
        """``generate`` calls made (fewer than ``completions`` when requests were batched)"""

    def encode(self, req: dict) -> list[int]:
        """The prompt's ids; BadRequest when they and ``max_tokens`` do not fit in the context."""
        from rlhfkit.data.chat import parse_messages
        from rlhfkit.data.collate import encode_prompt

        # The one prompt encoding of training, labelling and eval: a model is served in the format it learned.
        with self.tok_lock:
            ids = encode_prompt(self.tok, parse_messages(req["messages"]))
        if not ids:
            raise BadRequest("the messages render to an empty prompt", param="messages")
        want = len(ids) + req["max_tokens"]
        if self.context_length and want > self.context_length:
            raise BadRequest(f"This model's maximum context length is {self.context_length} tokens. However, you "
                             f"requested {want} tokens ({len(ids)} in the messages, {req['max_tokens']} in the "
                             "completion). Please reduce the length of the messages or completion.",
                             code="context_length_exceeded", param="messages")
        return ids

    def complete(self, req: dict) -> dict:
        """Answer one validated request (blocks until the worker has generated it)."""
        job = _Job(req, self.encode(req))  # counted before queueing: a prompt too long never waits
        with self._start_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=f"serve-{self.name}", daemon=True)
                self._worker.start()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting for generation; retry later") from None
        job.done.wait()
        if job.error is not None:
            raise job.error
        return self._response(req, len(job.ids), job.seqs, job.logits)

    def _work(self) -> None:
        while True:
            jobs = [self.queue.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                key = ("seed", id(job)) if job.req["seed"] is not None else _sampling_key(job.req)
                groups.setdefault(key, []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[_Job]) -> None:
        """One ``generate`` call for ``group``; never raises (the worker must outlive a bad request)."""
        try:
            seqs, logits = self._generate([j.ids for j in group], group[0].req)
            rows = seqs.shape[0] // len(group)  # generate orders rows prompt by prompt, n (or 1) each
            for k, job in enumerate(group):
                job.seqs = seqs[k * rows:(k + 1) * rows]
                job.logits = logits[k * rows:(k + 1) * rows] if logits is not None else None
        except Exception:
            print(f"serve: generation failed for {len(group)} request(s):", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            for job in group:
                job.error = GenerationFailed("generation failed")
        finally:
            for job in group:
                job.done.set()

    def _generate(self, prompts: list[list[int]], req: dict):
        """(sequences after the prompt, (rows, T, V) logits or None) for prompts sharing ``req``'s settings."""
        import torch

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at column `width`, so the generated tokens line up; the
        # mask hides the pads, and generate counts positions from each row's first real token.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        greedy = req["temperature"] == 0.0
        kwargs = dict(max_new_tokens=req["max_tokens"], num_return_sequences=req["n"], do_sample=not greedy,
                      return_dict_in_generate=True, output_logits=req["logprobs"], pad_token_id=pad)
        if not greedy:
            kwargs.update(temperature=req["temperature"], top_p=req["top_p"], top_k=0)
        if greedy and req["n"] > 1:
            kwargs["num_return_sequences"] = 1  # n identical greedy answers: generate once
        with torch.no_grad():
            if req["seed"] is not None:
                torch.manual_seed(req["seed"])
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.generate_calls += 1
        self.completions += len(prompts)
        logits = torch.stack(out.logits, dim=1).float() if req["logprobs"] else None
        return out.sequences[:, width:], logits

    def _response(self, req: dict, n_prompt: int, seqs, logits) -> dict:
        choices, n_completion = [], 0
        eos = self._eos_ids()
        for i in range(req["n"]):
            row = min(i, seqs.shape[0] - 1)
            ids = seqs[row].tolist()
            finish, n_used = "length", len(ids)
            end = next((k for k, t in enumerate(ids) if t in eos), None)
            if end is not None:  # cut at the first EOS; what follows is padding
                ids, finish, n_used = ids[:end], "stop", end + 1
            with self.tok_lock:
                text = self.tok.decode(ids, skip_special_tokens=True)
            for s in req["stop"]:
                cut = text.find(s)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            n_completion += n_used
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            if logits is not None:
                with self.tok_lock:
                    choice["logprobs"] = {"content": self._logprobs(logits[row], ids, req["top_logprobs"])}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion}}

    def _eos_ids(self) -> set[int]:
        """The tokenizer's EOS and the generation config's (chat models often end turns with another)."""
        ids = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, (list, tuple)) else ({extra} if extra is not None else set())
        return ids

    def _logprobs(self, logits, ids: list[int], top: int) -> list[dict]:
        import torch

        out = []
        logp = torch.log_softmax(logits, dim=-1)
        for t, tid in enumerate(ids):
            entry = self._entry(tid, logp[t, tid].item())
            if top:
                vals, idx = logp[t].topk(top)
                entry["top_logprobs"] = [self._entry(j, v) for j, v in zip(idx.tolist(), vals.tolist())]
            else:
                entry["top_logprobs"] = []
            out.append(entry)
        return out

    def _entry(self, tid: int, lp: float) -> dict:
        text = self.tok.decode([tid])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def make_handler(chat: ChatModel, max_tokens_limit: int, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):  # quiet: one line per request on stderr is noise in tests
            pass

        def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
            data = json.dumps(obj).encode()
            self._responded = True  # from here on a failure cannot become a clean 500
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, msg: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> None:
            err = {"message": msg, "type": _ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                   "code": code}
            self._send(status, {"error": err}, headers)

        def _guarded(self, route) -> None:
            """Run ``route``; an exception it lets out is logged here and answered as a bare 500."""
            self._responded = False
            try:
                route()
            except Exception as e:
                self.close_connection = True
                if isinstance(e, ConnectionError):
                    return  # the client went away: nothing to answer, nothing to log
                if not isinstance(e, GenerationFailed):  # the worker logged that one already
                    print(f"serve: {self.command} {self.path} failed:", file=sys.stderr)
                    traceback.print_exc(file=sys.stderr)
                if not self._responded:
                    try:
                        self._error(500, "The server had an error while processing your request.")
                    except OSError:
                        pass

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            if self.headers.get("Authorization", "") == f"Bearer {api_key}":
                return True
            self._error(401, "missing or wrong API key", code="invalid_api_key")
            return False

        def do_GET(self):
            self._guarded(self._get)

        def do_POST(self):
            self._guarded(self._post)

        def _get(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0,
                                                             "owned_by": "rlhfkit"}]})
            else:
                self._error(404, f"no route {self.path}")

        def _post(self):
            # Refusals below may leave the body unread: never reuse such a connection.
            keep_alive = not self.close_connection
            self.close_connection = True
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            if not self._authorized():
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._error(411, "Content-Length required")
                return
            if length > MAX_BODY:
                self._error(413, f"body over {MAX_BODY} bytes")
                return
            raw = self.rfile.read(length)
            if json_nesting_depth(raw) > MAX_JSON_DEPTH:
                self._error(400, f"the body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
                return
            try:
                body = json.loads(raw or b"null")
            except (ValueError, RecursionError):  # also UnicodeDecodeError, and ints over 4,300 digits
                self._error(400, "the body is not valid JSON")
                return
            try:
                req = _validate(body, max_tokens_limit)
                if body.get("stream"):
                    raise BadRequest("streaming is not supported", param="stream")
                answer = chat.complete(req)
            except BadRequest as e:
                self._error(400, str(e), e.code, e.param)
                return
            except QueueFull as e:
                self._error(429, str(e), "rate_limit_exceeded", headers={"Retry-After": "1"})
                return
            self.close_connection = not keep_alive
            self._send(200, answer)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: a burst of simultaneous connections (20 annotators
    # opening pages at once) would overflow it and see connection resets.
    request_queue_size = 128

def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 0, max_tokens_limit: int = 1024,
                api_key: str | None = None) -> ThreadingHTTPServer:
    """A server bound to (host, port) — port 0 picks a free one; call ``serve_forever`` to run it."""
    server = _Server((host, port), make_handler(chat, max_tokens_limit, api_key))
    return server


def run(args) -> int:
    from pathlib import Path

    from rlhfkit.config import ConfigError
    from rlhfkit.models.local import ModelNotFound, load_for_inference

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    for flag, value in (("--queue-depth", args.queue_depth), ("--max-batch", args.max_batch)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    try:
        model, tok = load_for_inference(args.model, args.gguf_file)
    except ModelNotFound as e:
        raise ConfigError(str(e)) from None
    name = args.name or Path(args.model.split(":", 1)[-1]).name
    chat = ChatModel(model, tok, name, queue_depth=args.queue_depth, max_batch=args.max_batch)
    server = make_server(chat, args.host, args.port, args.max_tokens_limit, api_key)
    host, port = server.server_address[:2]
    serve_until_interrupted(server, f"serving {name} at http://{host}:{port}/v1 (Ctrl-C to stop)")
    print("stopped", file=sys.stderr)
    return 0


def serve_until_interrupted(server, banner: str) -> None:
    """Print ``banner``, serve until Ctrl-C, then close the socket (used by ``serve`` and ``annotate serve``)."""
    print(banner, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
