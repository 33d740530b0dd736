"""`rlhfkit serve` (OpenAI-compatible) on loopback, and the HTTP judge against it: cache, retries, timeouts."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhfkit.judges.http import HTTPJudge, JudgeHTTPError
from rlhfkit.data.collate import encode_prompt
from rlhfkit.serve import ChatModel
from rlhfkit.serve_http import make_server

ITEMS = [("Question: Tom has 3 apples and buys 2 more. How many?\n", "3 + 2 = 5\nAnswer: 5", "Answer: 7"),
         ("Question: 2 boxes of 6 eggs. How many eggs?\n", "2 * 6 = 12\nAnswer: 12", "Answer: 8")]


def start(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def served(tiny_lm_dir):
    from rlhfkit.models.local import load_for_inference

    model, tok = load_for_inference(str(tiny_lm_dir))
    # The judge's prompts (~450 tokens) exceed the tiny config's 256 positions, which serve now
    # enforces; its rotary embeddings run past that, so these judge tests declare a longer context.
    chat = ChatModel(model, tok, "tiny", context_length=1024)
    server = start(make_server(chat, "127.0.0.1", 0, max_tokens_limit=64))
    yield chat, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_chat_completions(served):
    chat, base = served
    with urllib.request.urlopen(base + "/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    msgs = [{"role": "user", "content": "Question: 1 + 1?"}]
    status, out = post(base + "/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 5, "n": 3,
                                                    "temperature": 0.9, "top_p": 0.9, "seed": 1})
    assert status == 200 and out["object"] == "chat.completion" and len(out["choices"]) == 3
    # The prompt is the training format: the tiny tokenizer has no chat template, so one user turn is its text.
    n_prompt = len(encode_prompt(chat.tok, msgs[0]["content"]))
    assert n_prompt == len(chat.tok(msgs[0]["content"], add_special_tokens=False)["input_ids"])
    for c in out["choices"]:
        assert c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == n_prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 3 <= usage["completion_tokens"] <= 15
    if all(c["finish_reason"] == "length" for c in out["choices"]):
        assert usage["completion_tokens"] == 15
    # Greedy with logprobs: the chosen token is the top alternative, and the answer is reproducible.
    body = {"messages": msgs, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    s1, g1 = post(base + "/chat/completions", body)
    s2, g2 = post(base + "/chat/completions", body)
    assert s1 == s2 == 200 and g1["choices"][0]["message"] == g2["choices"][0]["message"]
    content = g1["choices"][0]["logprobs"]["content"]
    assert len(content) == min(4, g1["usage"]["completion_tokens"])
    for e in content:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert e["logprob"] == pytest.approx(tops[0]) and e["token"] == e["top_logprobs"][0]["token"]


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                                  {"messages": [{"role": "user", "content": "x"}], "n": 0},
                                  {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
                                  {"messages": [{"role": "user", "content": "x"}], "max_tokens": 65},
                                  {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}])
def test_bad_requests_are_400(served, body):
    status, out = post(served[1] + "/chat/completions", body)
    assert status == 400 and out["error"]["message"]


def test_api_key_required_when_configured(served):
    chat, _ = served
    server = start(make_server(chat, "127.0.0.1", 0, api_key="s3cret"))
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert post(base + "/chat/completions", body)[0] == 401
        assert post(base + "/chat/completions", body, {"Authorization": "Bearer nope"})[0] == 401
        assert post(base + "/chat/completions", body, {"Authorization": "Bearer s3cret"})[0] == 200
        judge = HTTPJudge(base, "tiny", api_key="s3cret", max_retries=0)
        assert len(judge.prob(ITEMS[:1])) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_http_judge_both_orders_and_cache(served, tmp_path):
    chat, base = served
    cache = tmp_path / "cache.sqlite"
    judge = HTTPJudge(base, "tiny", cache=cache, concurrency=2, max_retries=0)
    before = chat.completions
    first = judge.judge(ITEMS)
    assert chat.completions - before == 2 * len(ITEMS)  # both orders of each pair
    for j in first:
        assert 0 <= j.prob_a_first <= 1 and 0 <= j.prob_a_second <= 1
        assert j.prob == pytest.approx(0.5 * (j.prob_a_first + j.prob_a_second))
    # A rerun (a new judge object, same cache file) asks the server nothing.
    again = HTTPJudge(base, "tiny", cache=cache, max_retries=0)
    second = again.judge(ITEMS)
    assert chat.completions - before == 2 * len(ITEMS)
    assert again.stats["cache_hits"] == 2 * len(ITEMS) and again.stats["requests"] == 0
    assert [j.to_dict() for j in second] == [j.to_dict() for j in first]
    # A different question is not a cache hit.
    again.judge([(ITEMS[0][0], ITEMS[0][1], "something else")])
    assert chat.completions - before == 2 * len(ITEMS) + 2


class Flaky:
    """A loopback proxy that fails the first ``fail`` requests with 503 (or sleeps ``delay``), then forwards."""

    def __init__(self, target: str | None, fail: int = 0, delay: float = 0.0):
        self.fail, self.delay, self.seen, self.in_flight, self.max_in_flight = fail, delay, 0, 0, 0
        lock = threading.Lock()
        flaky = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    flaky.seen += 1
                    n = flaky.seen
                    flaky.in_flight += 1
                    flaky.max_in_flight = max(flaky.max_in_flight, flaky.in_flight)
                try:
                    if flaky.delay:
                        time.sleep(flaky.delay)
                    if n <= flaky.fail or target is None:
                        data, status = b'{"error": {"message": "overloaded"}}', 503
                    else:
                        host, port = target.split("//")[1].split("/")[0].split(":")
                        c = http.client.HTTPConnection(host, int(port), timeout=30)
                        c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
                        r = c.getresponse()
                        data, status = r.read(), r.status
                        c.close()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left: expected in the timeout test
                finally:
                    with lock:
                        flaky.in_flight -= 1

        self.server = start(ThreadingHTTPServer(("127.0.0.1", 0), H))
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_judge_retries_with_backoff(served):
    flaky = Flaky(served[1], fail=3)
    try:
        judge = HTTPJudge(flaky.base, "tiny", max_retries=3, backoff_s=0.05, concurrency=1, average_orders=False)
        t0 = time.monotonic()
        p = judge.prob(ITEMS[:1])
        # Three 503s, then success: waits of 0.05, 0.1 and 0.2 s (plus up to 25% jitter).
        assert len(p) == 1 and judge.stats["retries"] == 3 and flaky.seen == 4
        assert time.monotonic() - t0 >= 0.35
        flaky.fail, flaky.seen = 10, 0
        judge = HTTPJudge(flaky.base, "tiny", max_retries=2, backoff_s=0.01, average_orders=False)
        with pytest.raises(JudgeHTTPError, match="failed after 3 attempts; last error: HTTP 503"):
            judge.prob(ITEMS[:1])
        assert flaky.seen == 3
    finally:
        flaky.close()


def test_http_judge_does_not_retry_client_errors(served):
    chat, base = served
    before = chat.completions
    # One order only: with both orders the two requests race, and the first 400 cancels the second if its
    # worker has not started yet, so the request count would be 1 or 2 by timing alone.
    judge = HTTPJudge(base, "tiny", cot=True, max_new_tokens=500, max_retries=3, backoff_s=0.01,
                      average_orders=False)  # over the limit
    with pytest.raises(JudgeHTTPError, match="HTTP 400"):
        judge.prob(ITEMS[:1])
    assert judge.stats["requests"] == 1 and judge.stats["retries"] == 0 and chat.completions == before


def test_http_judge_timeouts_and_concurrency_limit():
    slow = Flaky(None, delay=1.0)
    try:
        judge = HTTPJudge(slow.base, "tiny", timeout_s=0.2, max_retries=1, backoff_s=0.01, average_orders=False)
        t0 = time.monotonic()
        with pytest.raises(JudgeHTTPError, match="(?i)time"):
            judge.prob(ITEMS[:1])
        assert time.monotonic() - t0 < 0.9 and judge.stats["requests"] == 2
        deadline = time.monotonic() + 5
        while slow.in_flight and time.monotonic() < deadline:  # the timed-out requests still sleep there
            time.sleep(0.05)
        slow.delay, slow.seen, slow.max_in_flight = 0.1, 0, 0
        limited = HTTPJudge(slow.base, "tiny", concurrency=2, max_retries=0, average_orders=True)
        with pytest.raises(JudgeHTTPError):  # the stub answers 503; what matters is how many were in flight
            limited.prob(ITEMS * 3)
        assert slow.max_in_flight == 2
    finally:
        slow.close()
