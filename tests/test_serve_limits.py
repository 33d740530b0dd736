"""`rlhfkit serve` under load and abuse on loopback: context cap, bounded queue, batching, 500s, bad numbers."""
from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlhfkit.serve import ChatModel
from rlhfkit.serve_http import make_server

SHORT = [{"role": "user", "content": "Question: 1 + 1?"}]


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from rlhfkit.models.local import load_for_inference

    return load_for_inference(str(tiny_lm_dir))  # context: 256 positions (conftest)


@pytest.fixture
def serving():
    """serving(chat) -> port of a started server; every server is shut down after the test."""
    servers = []

    def start(chat):
        server = make_server(chat, "127.0.0.1", 0, max_tokens_limit=64)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


class Gate:
    """Wraps ``model.generate``: records each call's inputs and holds the first until ``release``."""

    def __init__(self, model, fail: Exception | None = None):
        self.model, self.fail, self.calls = model, fail, []
        self.entered, self.released = threading.Event(), threading.Event()
        original = model.generate

        def generate(**kw):
            self.calls.append(kw)
            self.entered.set()
            assert self.released.wait(10), "the test never released the gate"
            if self.fail is not None:
                raise self.fail
            return original(**kw)

        model.generate = generate

    def close(self):
        self.released.set()
        del self.model.generate  # the instance attribute: the class's generate shows through again


def post(port, body, raw: bytes | None = None, timeout=30):
    """(status, parsed body, headers); a dropped connection raises, which fails the test."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v1/chat/completions", body=raw if raw is not None else json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        return r.status, json.loads(data), dict(r.getheaders())
    finally:
        c.close()


def is_openai_error(out: dict, code=None) -> bool:
    err = out.get("error", {})
    return (set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
            and err["message"] and (code is None or err["code"] == code))


def wait_until(cond, what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_20_concurrent_requests_one_of_100k_tokens(lm, serving):
    """The 100k-token prompt is refused before generation (400 context_length_exceeded), and the 19
    short requests sent with it are each answered 200 in under 5 s (before: the long one held the
    generation lock for ~47 s and everything queued behind it)."""
    model, tok = lm
    chat = ChatModel(model, tok, "tiny")  # the defaults `rlhfkit serve` uses
    port = serving(chat)
    long_text = "1234567890" * 10_000  # digits are one token each: 100,000 tokens in 100 KB
    assert len(tok(long_text, add_special_tokens=False)["input_ids"]) >= 100_000
    bodies = [{"messages": SHORT, "max_tokens": 8, "temperature": 0}] * 19
    bodies.insert(7, {"messages": [{"role": "user", "content": long_text}], "max_tokens": 8, "temperature": 0})
    start = threading.Barrier(len(bodies), timeout=10)

    def one(body):
        start.wait()
        t0 = time.monotonic()
        status, out, _ = post(port, body, timeout=30)
        return status, out, time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        results = list(pool.map(one, bodies))
    status, out, _ = results.pop(7)
    assert status == 400 and is_openai_error(out, "context_length_exceeded"), out
    assert "256" in out["error"]["message"] and out["error"]["param"] == "messages"
    for status, out, seconds in results:
        assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
        assert seconds < 5, f"a short request took {seconds:.1f} s"
    assert chat.completions == 19
    print(f"short requests: slowest {max(r[2] for r in results):.2f} s; {chat.generate_calls} generate calls for 19")


def test_a_prompt_that_fits_only_without_max_tokens_is_refused(lm, serving):
    model, tok = lm
    port = serving(ChatModel(model, tok, "tiny"))
    n = len(tok("1234567890" * 24, add_special_tokens=False)["input_ids"])  # 240 of 256 positions
    body = {"messages": [{"role": "user", "content": "1234567890" * 24}], "temperature": 0}
    status, out, _ = post(port, {**body, "max_tokens": 256 - n})
    assert status == 200
    status, out, _ = post(port, {**body, "max_tokens": 256 - n + 1})
    assert status == 400 and is_openai_error(out, "context_length_exceeded")


def test_a_full_queue_answers_429(lm, serving):
    """Depth 1: one request generating (held by the gate), one waiting; the third is refused at once."""
    model, tok = lm
    chat = ChatModel(model, tok, "tiny", queue_depth=1)
    port = serving(chat)
    gate = Gate(model)
    body = {"messages": SHORT, "max_tokens": 4, "temperature": 0}
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(post, port, body)
            assert gate.entered.wait(10)
            second = pool.submit(post, port, body)
            wait_until(lambda: chat.queue.qsize() == 1, "the second request to queue")
            t0 = time.monotonic()
            status, out, headers = post(port, body, timeout=5)
            assert status == 429 and is_openai_error(out, "rate_limit_exceeded"), out
            assert out["error"]["type"] == "rate_limit_error" and headers.get("Retry-After") == "1"
            assert time.monotonic() - t0 < 2
            gate.released.set()
            assert first.result(timeout=20)[0] == 200 and second.result(timeout=20)[0] == 200
    finally:
        gate.close()
    assert chat.completions == 2


def test_requests_waiting_together_are_batched_with_left_padding(lm, serving):
    """Three waiting greedy requests with equal settings share one generate call, left-padded, and
    get the answers they get alone; different settings, or a seed, run on their own."""
    model, tok = lm
    chat = ChatModel(model, tok, "tiny")
    port = serving(chat)
    greedy = {"max_tokens": 6, "temperature": 0}
    prompts = ["Question: 1 + 1?", "Question: Tom has 3 apples and buys 2 more. How many?", "Question: 9 - 4?"]
    alone = [post(port, {"messages": [{"role": "user", "content": p}], **greedy})[1] for p in prompts]
    gate = Gate(model)
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(post, port, {"messages": SHORT, **greedy})]  # held by the gate
            assert gate.entered.wait(10)
            bodies = [{"messages": [{"role": "user", "content": p}], **greedy} for p in prompts]
            bodies += [{"messages": SHORT, "max_tokens": 6, "temperature": 0.7},
                       {"messages": SHORT, **greedy, "seed": 3}]
            for k, b in enumerate(bodies):  # one at a time, so the queue order is known
                futures.append(pool.submit(post, port, b))
                wait_until(lambda: chat.queue.qsize() == k + 1, f"request {k + 1} to queue")
            gate.released.set()
            results = [f.result(timeout=30) for f in futures]
    finally:
        gate.close()
    assert all(r[0] == 200 for r in results)
    rows = [c["input_ids"].shape[0] for c in gate.calls]
    assert rows == [1, 3, 1, 1]
    ids, mask = gate.calls[1]["input_ids"], gate.calls[1]["attention_mask"]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert ids.shape[1] == max(lengths) and mask.sum(1).tolist() == lengths
    assert all(mask[i, -1] == 1 for i in range(3))  # padded on the left: every prompt ends in the last column
    for got, want in zip(results[1:4], alone):
        assert got[1]["choices"][0]["message"] == want["choices"][0]["message"]
        assert got[1]["usage"] == want["usage"]


def test_an_exception_in_generate_is_an_openai_500_without_traceback(lm, serving, capsys):
    model, tok = lm
    chat = ChatModel(model, tok, "tiny")
    port = serving(chat)
    gate = Gate(model, fail=RuntimeError("secret detail /home/model/internals.py"))
    gate.released.set()
    try:
        status, out, _ = post(port, {"messages": SHORT, "max_tokens": 4})
    finally:
        gate.close()
    assert status == 500 and is_openai_error(out) and out["error"]["type"] == "server_error"
    text = json.dumps(out)
    assert "secret" not in text and "Traceback" not in text and "RuntimeError" not in text
    err = capsys.readouterr().err
    assert "Traceback" in err and "secret detail" in err  # logged for the operator
    # The worker outlived the failure.
    assert post(port, {"messages": SHORT, "max_tokens": 4})[0] == 200


@pytest.mark.parametrize("raw", [
    b'{"messages": %s, "seed": %d}' % (json.dumps(SHORT).encode(), 2**70),
    b'{"messages": %s, "seed": %d}' % (json.dumps(SHORT).encode(), -2**64),
    b'{"messages": %s, "max_tokens": %d}' % (json.dumps(SHORT).encode(), 10**30),
    b'{"messages": %s, "temperature": 1e400}' % json.dumps(SHORT).encode(),
    b'{"messages": %s, "top_p": NaN}' % json.dumps(SHORT).encode(),
    b'{"messages": %s, "seed": %s}' % (json.dumps(SHORT).encode(), b"9" * 5000),  # past Python's int-parsing cap
    b'{"messages": %s, "x": %s%s}' % (json.dumps(SHORT).encode(), b"[" * 30_000, b"]" * 30_000),
], ids=["seed-2**70", "seed--2**64", "max_tokens-1e30", "temperature-1e400", "top_p-NaN", "5000-digits", "deep"])
def test_out_of_range_numbers_and_deep_bodies_are_400(lm, serving, raw):
    model, tok = lm
    chat = ChatModel(model, tok, "tiny")
    port = serving(chat)
    status, out, _ = post(port, None, raw=raw)
    assert status == 400 and is_openai_error(out), out
    if raw.count(b"[") > 1000:  # refused by the depth check, before json.loads could recurse
        assert "deeper than 32 levels" in out["error"]["message"]
    assert chat.completions == 0
