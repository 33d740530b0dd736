"""The annotation API on loopback: sign-in, queues, statuses, and a bounded concurrent load test."""
from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlhfkit.annotate.server import make_server
from rlhfkit.annotate.store import Store


@pytest.fixture
def served(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    server = make_server(store, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield store, server.server_address[1]
    server.shutdown()
    server.server_close()


def items_file(path, n, k=3):
    path.write_text("".join(json.dumps({"prompt": f"prompt {i}", "responses": [f"resp {i}.{j}" for j in range(k)]}) + "\n"
                            for i in range(n)))
    return path


def call(port, method, path, body=None, token=None, headers=None, raw=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    if token:
        h["Authorization"] = f"Bearer {token}"
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    payload = r.read()
    if conn is None:
        c.close()
    try:
        return r.status, json.loads(payload), r
    except json.JSONDecodeError:
        return r.status, payload, r


def test_api_statuses_and_cookie_sign_in(served, tmp_path):
    store, port = served
    store.import_items(items_file(tmp_path / "items.jsonl", 2))
    ta, tb = store.add_annotator("ann", 1), store.add_annotator("bob", 1)
    assert call(port, "GET", "/")[0] == 200
    assert call(port, "GET", "/app.js")[0] == 200
    assert call(port, "GET", "/api/me")[0] == 401
    assert call(port, "GET", "/api/me", token="wrong")[0] == 401
    assert call(port, "POST", "/api/login", {"token": "wrong"})[0] == 401
    status, body, resp = call(port, "POST", "/api/login", {"token": ta})
    assert status == 200 and body == {"name": "ann"}
    cookie = resp.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    cookie_hdr = {"Cookie": cookie.split(";")[0]}
    status, me, _ = call(port, "GET", "/api/me", headers=cookie_hdr)
    assert status == 200 and me == {"name": "ann", "total": 1, "done": 0}
    status, nxt, _ = call(port, "GET", "/api/next", token=ta)
    mine = nxt["item"]["item_id"]
    theirs = call(port, "GET", "/api/next", token=tb)[1]["item"]["item_id"]
    assert mine != theirs and len(nxt["item"]["responses"]) == 3
    assert call(port, "GET", f"/api/items/{theirs}", token=ta)[0] == 403
    assert call(port, "GET", "/api/items/12345", token=ta)[0] == 404
    url = f"/api/items/{mine}/ranking"
    assert call(port, "POST", url, {"ranking": [0, 1]}, token=ta)[0] == 400
    assert call(port, "POST", url, {"ranking": [0, 1, 2], "extra": 1}, token=ta)[0] == 400
    assert call(port, "POST", url, {"rank": [0, 1, 2]}, token=ta)[0] == 400
    assert call(port, "POST", url, raw=b"{not json", token=ta, headers={"Content-Type": "application/json"})[0] == 400
    assert call(port, "POST", url, raw=b"[1]", token=ta, headers={"Content-Type": "application/json"})[0] == 400
    assert call(port, "POST", url, raw=json.dumps({"ranking": [0, 1, 2]}).encode(), token=ta,
                headers={"Content-Type": "text/plain"})[0] == 400  # a cross-site form cannot post JSON
    assert call(port, "POST", url, raw=b"x" * (70 * 1024), token=ta, headers={"Content-Type": "application/json"})[0] == 413
    assert call(port, "POST", f"/api/items/{theirs}/ranking", {"ranking": [0, 1, 2]}, token=ta)[0] == 403
    assert call(port, "POST", url, {"ranking": [0, 1, 2]})[0] == 401
    assert store.rankings() == []
    status, body, _ = call(port, "POST", url, {"ranking": [1, 2, 0], "unsafe": [2]}, headers=cookie_hdr)
    assert status == 201
    assert call(port, "POST", url, {"ranking": [0, 1, 2]}, token=ta)[0] == 409
    assert call(port, "GET", "/api/next", token=ta)[1] == {"item": None, "total": 1, "done": 1}
    assert [(r["annotator"], r["ranking"], r["unsafe"]) for r in store.rankings()] == [("ann", [1, 2, 0], [2])]


def test_load_20_annotators_50_rankings_each(served, tmp_path):
    """20 concurrent annotators x 50 rankings: all 1,000 stored once; bad requests refused, changing nothing."""
    store, port = served
    n_ann, per = 20, 50
    store.import_items(items_file(tmp_path / "items.jsonl", 100))
    tokens = [store.add_annotator(f"a{i:02d}", per) for i in range(n_ann)]  # each item ranked by 10 annotators
    queues = {t: [q["item_id"] for q in store.queue(store.annotator_for_token(t)[0])] for t in tokens}
    all_items = set(range(1, 101))
    deadline = time.monotonic() + 120  # bounded in time as well as in count

    def annotator(idx):
        token = tokens[idx]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # keep-alive, like a browser
        statuses = {"ok": 0, "refused": []}
        try:
            not_mine = sorted(all_items - set(queues[token]))[0]
            for k, item in enumerate(queues[token]):
                assert time.monotonic() < deadline, "load test ran past its time bound"
                ranking = [(k + j) % 3 for j in range(3)]
                s, _, _ = call(port, "POST", f"/api/items/{item}/ranking", {"ranking": ranking}, token=token, conn=conn)
                statuses["ok"] += s == 201
                if k % 10 == 0:  # interleave refused requests with the real ones
                    statuses["refused"].append(call(port, "POST", f"/api/items/{item}/ranking", {"ranking": [0, 1, 2]},
                                                    token=token, conn=conn)[0])  # duplicate
                    statuses["refused"].append(call(port, "POST", f"/api/items/{item}/ranking", {"ranking": [0, 1, 2]},
                                                    token="forged-" + token[:8], conn=conn)[0])
                    statuses["refused"].append(call(port, "POST", f"/api/items/{item}/ranking", {"ranking": [0, 1, 2]},
                                                    conn=conn)[0])
                    statuses["refused"].append(call(port, "POST", f"/api/items/{not_mine}/ranking",
                                                    {"ranking": [0, 1, 2]}, token=token, conn=conn)[0])
        finally:
            conn.close()
        return statuses

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=n_ann) as pool:
        results = list(pool.map(annotator, range(n_ann)))
    elapsed = time.monotonic() - t0
    assert sum(r["ok"] for r in results) == n_ann * per
    for r in results:
        assert r["refused"] == [409, 401, 401, 403] * 5
    with store.connect() as c:
        assert c.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 1000
        assert c.execute("SELECT COUNT(*) FROM (SELECT DISTINCT annotator_id, item_id FROM rankings)").fetchone()[0] == 1000
        # Only assigned items were ranked, each by exactly its 10 annotators.
        assert c.execute("SELECT COUNT(*) FROM rankings r LEFT JOIN assignments a ON a.item_id = r.item_id "
                         "AND a.annotator_id = r.annotator_id WHERE a.item_id IS NULL").fetchone()[0] == 0
        counts = {n for (n,) in c.execute("SELECT COUNT(*) FROM rankings GROUP BY item_id")}
    assert counts == {10}
    # Each stored ranking is the one its annotator sent (not a refused request's [0, 1, 2] overwrite).
    by = {(r["annotator"], r["item_id"]): r["ranking"] for r in store.rankings()}
    for t, q in queues.items():
        name = f"a{tokens.index(t):02d}"
        for k, item in enumerate(q):
            assert by[(name, item)] == [(k + j) % 3 for j in range(3)]
    print(f"load test: 1000 rankings + 400 refused requests in {elapsed:.1f} s")
