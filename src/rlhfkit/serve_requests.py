"""Requests of the OpenAI chat-completions API as ``rlhfkit serve`` takes them: the size and nesting
guards a JSON body passes before it is parsed (the annotation app uses them too), and the
validation of a request's fields, each error a 400 naming the field.
"""
from __future__ import annotations

import re

MAX_BODY = 1 << 20
MAX_JSON_DEPTH = 32
"""deepest nesting of arrays and objects a request body may have (a chat request needs 3)"""
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
"""what ``torch.manual_seed`` accepts; outside it torch raises instead of seeding"""

class BadRequest(ValueError):
    """A 400; ``code`` and ``param`` fill the fields of OpenAI's error object."""

    def __init__(self, msg: str, code: str | None = None, param: str | None = None):
        super().__init__(msg)
        self.code, self.param = code, param


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


def validate_request(body: dict, max_tokens_limit: int) -> dict:
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
