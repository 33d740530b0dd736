"""The LLM judge over any OpenAI-compatible chat-completions endpoint.

Same prompt as the local judge (``prompt.py``). The probability of the first slot comes from
the answer token's ``top_logprobs`` when the server returns them (renormalised over the two
labels), else from the letter in the answer text (1.0 / 0.0; 0.5 when it names neither).

Robustness: a timeout per request, retries with exponential backoff on timeouts, connection
errors, 429 and 5xx (other 4xx are the caller's mistake and raise at once), at most
``concurrency`` requests in flight, and an SQLite cache keyed by a hash of the model, the
messages and the sampling parameters, so a rerun pays only for what it has not asked before.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from rlhfkit.judges.prompt import JudgePrompt, Judgment, combine

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class JudgeHTTPError(RuntimeError):
    """The endpoint refused a request, or kept failing after every retry."""


class ResponseCache:
    """An SQLite file of ``key -> response JSON``; safe to share between threads (one connection each)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, time REAL)")

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30)
            c.execute("PRAGMA journal_mode=WAL")
            self._local.conn = c
        return c

    def get(self, key: str) -> dict | None:
        row = self._conn().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, response: dict) -> None:
        with self._conn() as c:
            c.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, json.dumps(response), time.time()))


class HTTPJudge:
    """A PreferenceFunction over a chat-completions endpoint. ``judge`` returns full Judgments."""

    def __init__(self, base_url: str, model: str, prompt: JudgePrompt | None = None, api_key: str | None = None,
                 average_orders: bool = True, cot: bool = False, max_new_tokens: int = 128, timeout_s: float = 60.0,
                 max_retries: int = 4, backoff_s: float = 0.5, concurrency: int = 4, cache: str | Path | None = None,
                 use_logprobs: bool = True, name: str | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout_s > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.prompt = prompt or JudgePrompt()
        self.average_orders, self.cot, self.max_new_tokens = average_orders, cot, max_new_tokens
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.concurrency, self.use_logprobs = concurrency, use_logprobs
        self.cache = ResponseCache(cache) if cache else None
        self.name = name or f"http:{model}"
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}
        self._stats_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg, prompt: JudgePrompt) -> "HTTPJudge":
        base = cfg.base_url or os.environ.get("RLHFKIT_JUDGE_BASE_URL")
        if not base:
            raise ValueError("an http judge needs base_url (in the config or env RLHFKIT_JUDGE_BASE_URL)")
        key = cfg.api_key or os.environ.get(cfg.api_key_env) or None
        return cls(base, cfg.model, prompt, api_key=key, average_orders=cfg.average_orders, cot=cfg.cot,
                   max_new_tokens=cfg.max_new_tokens, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                   backoff_s=cfg.backoff_s, concurrency=cfg.concurrency, cache=cfg.cache, use_logprobs=cfg.use_logprobs)

    # -- the PreferenceFunction interface -------------------------------------------------------
    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        return [j.prob for j in self.judge(items)]

    def judge(self, items: Sequence[tuple[str, str, str]], both_orders: bool | None = None) -> list[Judgment]:
        both = self.average_orders if both_orders is None else both_orders
        queries = [(p, a, b) for p, a, b in items]
        if both:
            queries += [(p, b, a) for p, a, b in items]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self._ask, queries))  # [(P(first slot), rationale)]
        n, out = len(items), []
        for i in range(n):
            p1, r1 = answers[i]
            p2 = 1.0 - answers[n + i][0] if both else None
            rats = ((r1, answers[n + i][1]) if both else (r1,)) if self.cot else ()
            out.append(Judgment(prob=combine(p1, p2, self.average_orders), prob_a_first=p1, prob_a_second=p2,
                                rationales=rats))
        return out

    # -- one query --------------------------------------------------------------------------------
    def _payload(self, prompt: str, first: str, second: str) -> dict:
        body = {"model": self.model, "messages": self.prompt.messages(prompt, first, second, cot=self.cot),
                "temperature": 0, "max_tokens": self.max_new_tokens if self.cot else 1}
        if self.use_logprobs:
            body.update(logprobs=True, top_logprobs=5)
        return body

    def _ask(self, query: tuple[str, str, str]) -> tuple[float, str]:
        body = self._payload(*query)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        resp = self.cache.get(key) if self.cache else None
        if resp is not None:
            with self._stats_lock:
                self.stats["cache_hits"] += 1
        else:
            resp = self._post(body)
            if self.cache:
                self.cache.put(key, resp)
        return self._read(resp)

    def _read(self, resp: dict) -> tuple[float, str]:
        """P(first slot) and the answer text from one chat completion."""
        try:
            choice = resp["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeHTTPError(f"{self.url}: not a chat completion: {json.dumps(resp)[:200]}") from None
        p = self._from_logprobs(choice.get("logprobs"))
        if p is None:
            slot = self.prompt.parse_letter(text)
            p = 0.5 if slot is None else (1.0 if slot == 0 else 0.0)
        return p, text.strip() if self.cot else ""

    def _from_logprobs(self, logprobs) -> float | None:
        """From the last generated token that is an answer label: its top alternatives, renormalised."""
        content = (logprobs or {}).get("content") if isinstance(logprobs, dict) else None
        if not content:
            return None
        labels = self.prompt.labels
        for entry in reversed(content):
            if entry.get("token", "").strip() not in labels:
                continue
            mass = [0.0, 0.0]
            for alt in entry.get("top_logprobs") or [entry]:
                tok = alt.get("token", "").strip()
                if tok in labels:
                    mass[labels.index(tok)] += math.exp(alt["logprob"])
            if mass[0] + mass[1] > 0:
                return mass[0] / (mass[0] + mass[1])
        return None

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                # Exponential backoff with jitter, so concurrent workers do not retry in lockstep.
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
                with self._stats_lock:
                    self.stats["retries"] += 1
            with self._stats_lock:
                self.stats["requests"] += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in RETRY_STATUS:
                    raise JudgeHTTPError(f"{self.url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError:
                last = "the response is not JSON"
        raise JudgeHTTPError(f"{self.url}: failed after {self.max_retries + 1} attempts; last error: {last}")
