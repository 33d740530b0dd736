"""``rlhfkit serve --model DIR``: an OpenAI-compatible chat-completions server for a causal LM.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (no streaming). Honoured:
``messages``, ``temperature`` (0 = greedy), ``top_p``, ``max_tokens``, ``n``, ``stop``, ``seed``,
``logprobs`` and ``top_logprobs`` (log-probabilities of the model's raw distribution, before
temperature and top-p, as OpenAI reports them). ``usage`` counts the prompt once and the
completion tokens of all ``n`` choices. Messages go through the tokenizer's chat template when it
has one; otherwise they are joined as ``role: content`` lines and cued with ``assistant:``.

One model serves one request at a time (a lock around generation): ``generate`` on a shared
module is not thread-safe, and on a CPU parallel requests would only slow each other down.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20


class BadRequest(ValueError):
    pass


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model directory, .gguf file, or package:NAME/FILE.gguf")
    p.add_argument("--gguf-file", default=None, help="the .gguf file inside --model, when it holds several")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--api-key-env", default=None,
                   help="require 'Authorization: Bearer KEY' where KEY is this environment variable's value")


def _render(tok, messages: list[dict]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


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
        raise BadRequest("'seed' must be an integer")
    return {"messages": msgs, "temperature": num("temperature", 1.0, 0.0, 2.0), "top_p": num("top_p", 1.0, 0.0, 1.0),
            "max_tokens": num("max_tokens", 64, 1, max_tokens_limit, int), "n": num("n", 1, 1, 16, int),
            "stop": stop, "logprobs": logprobs, "top_logprobs": top, "seed": seed}


class ChatModel:
    """Generation behind the API: a model, its tokenizer, and a lock."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.lock = threading.Lock()
        self.completions = 0
        """requests answered (a diagnostic; tests count cache hits with it)"""

    def complete(self, req: dict) -> dict:
        import torch

        prompt = _render(self.tok, req["messages"])
        enc = self.tok(prompt, return_tensors="pt", add_special_tokens=False)
        n_prompt = enc["input_ids"].shape[1]
        greedy = req["temperature"] == 0.0
        kwargs = dict(max_new_tokens=req["max_tokens"], num_return_sequences=req["n"], do_sample=not greedy,
                      return_dict_in_generate=True, output_logits=req["logprobs"],
                      pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id)
        if not greedy:
            kwargs.update(temperature=req["temperature"], top_p=req["top_p"], top_k=0)
        with self.lock, torch.no_grad():
            if req["seed"] is not None:
                torch.manual_seed(req["seed"])
            if greedy and req["n"] > 1:
                kwargs["num_return_sequences"] = 1  # n identical greedy answers: generate once
            out = self.model.generate(**enc, **kwargs)
            self.completions += 1
        seqs = out.sequences[:, n_prompt:]
        logits = torch.stack(out.logits, dim=1).float() if req["logprobs"] else None  # (rows, T, V)
        choices, n_completion = [], 0
        eos = self._eos_ids()
        for i in range(req["n"]):
            row = min(i, seqs.shape[0] - 1)
            ids = seqs[row].tolist()
            finish, n_used = "length", len(ids)
            end = next((k for k, t in enumerate(ids) if t in eos), None)
            if end is not None:  # cut at the first EOS; what follows is padding
                ids, finish, n_used = ids[:end], "stop", end + 1
            text = self.tok.decode(ids, skip_special_tokens=True)
            for s in req["stop"]:
                cut = text.find(s)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            n_completion += n_used
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            if logits is not None:
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

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, msg: str) -> None:
            self._send(status, {"error": {"message": msg, "type": HTTPStatus(status).phrase}})

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            if self.headers.get("Authorization", "") == f"Bearer {api_key}":
                return True
            self._error(401, "missing or wrong API key")
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0,
                                                             "owned_by": "rlhfkit"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
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
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                req = _validate(body, max_tokens_limit)
                if body.get("stream"):
                    raise BadRequest("streaming is not supported")
            except (json.JSONDecodeError, UnicodeDecodeError):
                self._error(400, "the body is not valid JSON")
                return
            except BadRequest as e:
                self._error(400, str(e))
                return
            self.close_connection = not keep_alive
            self._send(200, chat.complete(req))

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
    try:
        model, tok = load_for_inference(args.model, args.gguf_file)
    except ModelNotFound as e:
        raise ConfigError(str(e)) from None
    name = args.name or Path(args.model.split(":", 1)[-1]).name
    server = make_server(ChatModel(model, tok, name), args.host, args.port, args.max_tokens_limit, api_key)
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
