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

import os
import queue
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from rlhfkit.config import ConfigError
from rlhfkit.data.chat import parse_messages
from rlhfkit.models.local import ModelNotFound, load_for_inference
from rlhfkit.serve_requests import BadRequest

class QueueFull(RuntimeError):
    """The generation queue holds ``queue_depth`` requests already (a 429)."""


class GenerationFailed(RuntimeError):
    """``generate`` raised in the worker; the worker logged the traceback (a 500)."""


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
        from rlhfkit.data.collate import encode_prompt  # lazy: torch, only once a model is served

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
        import torch  # lazy: only once a model is served (`rlhfkit serve --help` stays light)

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
        import torch  # lazy: only once a model is served (`rlhfkit serve --help` stays light)

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


def run(args) -> int:
    # lazy: cycle with serve_http, which imports ChatModel from here
    from rlhfkit.serve_http import make_server, serve_until_interrupted

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
