"""The annotation store: SQLite in WAL mode.

Tables: ``annotators`` (a name and the SHA-256 of their token; the token itself is shown once and
never stored), ``items`` (a prompt and its K responses), ``assignments`` (each annotator's queue,
in order; an item may sit in several queues, which is what makes agreement measurable),
``rankings`` (one per annotator per item: a UNIQUE constraint, so a double submit cannot store
twice however the requests interleave), ``unsafe_flags`` and ``wrong_steps`` (per ranking).

WAL lets readers proceed while one writer commits; every connection waits (busy timeout) rather
than failing when another thread holds the write lock. Each thread opens its own connection.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.data.loading import DataError, iter_records, require

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY, content_sha256 TEXT NOT NULL UNIQUE, prompt TEXT NOT NULL, responses TEXT NOT NULL,
  source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
  annotator_id INTEGER NOT NULL REFERENCES annotators(id), item_id INTEGER NOT NULL REFERENCES items(id),
  position INTEGER NOT NULL, PRIMARY KEY (annotator_id, item_id));
CREATE TABLE IF NOT EXISTS rankings (
  id INTEGER PRIMARY KEY, annotator_id INTEGER NOT NULL REFERENCES annotators(id),
  item_id INTEGER NOT NULL REFERENCES items(id), ranking TEXT NOT NULL, time REAL NOT NULL,
  UNIQUE (annotator_id, item_id));
CREATE TABLE IF NOT EXISTS unsafe_flags (
  ranking_id INTEGER NOT NULL REFERENCES rankings(id), response INTEGER NOT NULL, PRIMARY KEY (ranking_id, response));
CREATE TABLE IF NOT EXISTS wrong_steps (
  ranking_id INTEGER NOT NULL REFERENCES rankings(id), response INTEGER NOT NULL, line INTEGER NOT NULL,
  PRIMARY KEY (ranking_id, response, line));
"""


class StoreError(ValueError):
    """A request the store refuses; ``status`` is the HTTP status that fits it."""

    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Item:
    id: int
    prompt: str
    responses: tuple[str, ...]


def load_items(path: str | Path) -> list[tuple[str, list[str], str]]:
    """``(prompt, responses, where)`` from records ``{"prompt", "responses": [at least 2 strings]}``."""
    out = []
    for rec in iter_records(path):
        require(rec, {"prompt": str, "responses": list}, nonempty=("prompt",))
        resp = rec.record["responses"]
        if len(resp) < 2:
            raise DataError(f"{rec.where}: 'responses' must hold at least 2 responses, got {len(resp)}")
        if len(resp) > 9:
            raise DataError(f"{rec.where}: at most 9 responses per item (ranked with keys 1-9), got {len(resp)}")
        for i, r in enumerate(resp):
            if not isinstance(r, str):
                raise DataError(f"{rec.where}: responses[{i}] must be a string, got {type(r).__name__}")
        out.append((rec.record["prompt"], list(resp), rec.where))
    if not out:
        raise DataError(f"{path}: no records")
    return out


class Store:
    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        """A new connection (use one per thread). ``with conn:`` commits or rolls back."""
        c = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        c.execute("PRAGMA foreign_keys=ON")
        c.execute("PRAGMA busy_timeout=30000")
        c.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe against corruption
        c.isolation_level = "DEFERRED"
        return c

    # -- admin ------------------------------------------------------------------------------------
    def import_items(self, path: str | Path) -> tuple[int, int]:
        """Add the items of a data file; items already present (same prompt and responses) are kept once.

        Returns (added, already present)."""
        rows = load_items(path)
        added = 0
        with self.connect() as c:
            for prompt, responses, where in rows:
                h = hashlib.sha256(json.dumps([prompt, responses]).encode()).hexdigest()
                cur = c.execute("INSERT OR IGNORE INTO items (content_sha256, prompt, responses, source) VALUES (?,?,?,?)",
                                (h, prompt, json.dumps(responses), where))
                added += cur.rowcount
        return added, len(rows) - added

    def add_annotator(self, name: str, n_items: int | None = None) -> str:
        """Create an annotator, assign items, and return their token (shown once, stored hashed).

        ``n_items=None`` assigns every item (full overlap); ``n_items=N`` assigns the N items with
        the fewest annotators so far (ties by item order), spreading overlap evenly.
        """
        name = name.strip()
        if not name or len(name) > 100:
            raise StoreError("the annotator name must be 1-100 characters")
        token = secrets.token_urlsafe(24)
        with self.connect() as c:
            n_total = c.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            if n_total == 0:
                raise StoreError("the store has no items; import some first (annotate import --data FILE)")
            if n_items is not None and not 1 <= n_items <= n_total:
                raise StoreError(f"--items must be between 1 and {n_total} (the items in the store)")
            try:
                cur = c.execute("INSERT INTO annotators (name, token_sha256, created) VALUES (?,?,?)",
                                (name, token_hash(token), time.time()))
            except sqlite3.IntegrityError:
                raise StoreError(f"an annotator named {name!r} already exists", 409) from None
            aid = cur.lastrowid
            items = [r[0] for r in c.execute(
                "SELECT i.id FROM items i LEFT JOIN assignments a ON a.item_id = i.id "
                "GROUP BY i.id ORDER BY COUNT(a.annotator_id), i.id")]
            chosen = sorted(items if n_items is None else items[:n_items])
            c.executemany("INSERT INTO assignments VALUES (?,?,?)", [(aid, iid, k) for k, iid in enumerate(chosen)])
        return token

    # -- annotator-facing -------------------------------------------------------------------------
    def annotator_for_token(self, token: str | None) -> tuple[int, str] | None:
        if not token or len(token) > 200:
            return None
        with self.connect() as c:
            row = c.execute("SELECT id, name FROM annotators WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        return (row[0], row[1]) if row else None

    def queue(self, annotator_id: int) -> list[dict]:
        with self.connect() as c:
            rows = c.execute(
                "SELECT a.item_id, r.id IS NOT NULL FROM assignments a LEFT JOIN rankings r "
                "ON r.item_id = a.item_id AND r.annotator_id = a.annotator_id "
                "WHERE a.annotator_id = ? ORDER BY a.position", (annotator_id,)).fetchall()
        return [{"item_id": i, "done": bool(d)} for i, d in rows]

    def item_for(self, annotator_id: int, item_id: int) -> Item:
        """The item, if it is in this annotator's queue (404 if no such item, 403 if not theirs)."""
        with self.connect() as c:
            row = c.execute("SELECT id, prompt, responses FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise StoreError(f"no item {item_id}", 404)
            if c.execute("SELECT 1 FROM assignments WHERE annotator_id = ? AND item_id = ?",
                         (annotator_id, item_id)).fetchone() is None:
                raise StoreError(f"item {item_id} is not in your queue", 403)
        return Item(row[0], row[1], tuple(json.loads(row[2])))

    def submit(self, annotator_id: int, item_id: int, ranking: list[int], unsafe: list[int] = (),
               wrong_steps: list[tuple[int, int]] = ()) -> int:
        """Store one ranking (indices, best first) with its flags, in one transaction; returns its id."""
        item = self.item_for(annotator_id, item_id)
        validate_submission(item, ranking, unsafe, wrong_steps)
        c = self.connect()
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                cur = c.execute("INSERT INTO rankings (annotator_id, item_id, ranking, time) VALUES (?,?,?,?)",
                                (annotator_id, item_id, json.dumps(list(ranking)), time.time()))
            except sqlite3.IntegrityError:
                c.execute("ROLLBACK")
                raise StoreError(f"item {item_id} is already ranked", 409) from None
            rid = cur.lastrowid
            c.executemany("INSERT INTO unsafe_flags VALUES (?,?)", [(rid, i) for i in sorted(set(unsafe))])
            c.executemany("INSERT INTO wrong_steps VALUES (?,?,?)", [(rid, r, l) for r, l in sorted(set(map(tuple, wrong_steps)))])
            c.execute("COMMIT")
            return rid
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        finally:
            c.close()

    # -- export -----------------------------------------------------------------------------------
    def rankings(self) -> list[dict]:
        """Every ranking with its item, annotator and flags, in submission order."""
        with self.connect() as c:
            rows = c.execute(
                "SELECT r.id, i.id, i.prompt, i.responses, r.ranking, an.name, r.time FROM rankings r "
                "JOIN items i ON i.id = r.item_id JOIN annotators an ON an.id = r.annotator_id ORDER BY r.id").fetchall()
            unsafe, steps = {}, {}
            for rid, resp in c.execute("SELECT ranking_id, response FROM unsafe_flags ORDER BY ranking_id, response"):
                unsafe.setdefault(rid, []).append(resp)
            for rid, resp, line in c.execute("SELECT ranking_id, response, line FROM wrong_steps ORDER BY 1, 2, 3"):
                steps.setdefault(rid, []).append([resp, line])
        return [{"item_id": iid, "prompt": p, "responses": json.loads(rs), "ranking": json.loads(rk), "annotator": name,
                 "unsafe": unsafe.get(rid, []), "wrong_steps": steps.get(rid, []),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))}
                for rid, iid, p, rs, rk, name, t in rows]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_submission(item: Item, ranking, unsafe, wrong_steps) -> None:
    k = len(item.responses)
    if not isinstance(ranking, list) or not all(_is_int(x) for x in ranking) or sorted(ranking) != list(range(k)):
        raise StoreError(f"'ranking' must list each response index 0..{k - 1} exactly once, best first")
    if not isinstance(unsafe, (list, tuple)) or not all(_is_int(x) and 0 <= x < k for x in unsafe):
        raise StoreError(f"'unsafe' must be a list of response indices 0..{k - 1}")
    if not isinstance(wrong_steps, (list, tuple)):
        raise StoreError("'wrong_steps' must be a list of [response, line] pairs")
    for s in wrong_steps:
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(x) for x in s)):
            raise StoreError("'wrong_steps' must be a list of [response, line] pairs")
        r, line = s
        if not 0 <= r < k:
            raise StoreError(f"wrong_steps: response {r} is not in 0..{k - 1}")
        n_lines = len(item.responses[r].split("\n"))
        if not 0 <= line < n_lines:
            raise StoreError(f"wrong_steps: response {r} has lines 0..{n_lines - 1}, not {line}")
