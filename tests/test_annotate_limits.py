"""`rlhfkit annotate serve` against hostile clients on loopback: stalled connections, a connection cap, deep JSON."""
from __future__ import annotations

import http.client
import json
import selectors
import socket
import threading
import time

import pytest

from rlhfkit.annotate.server import READ_TIMEOUT_S, make_server
from rlhfkit.annotate.store import Store


@pytest.fixture
def app(tmp_path):
    """app(**limits) -> (store, port, token of an annotator with 2 items); servers are closed after the test."""
    servers = []

    def start(**limits):
        store = Store(tmp_path / f"db{len(servers)}.sqlite")
        items = tmp_path / "items.jsonl"
        items.write_text("".join(json.dumps({"prompt": f"p{i}", "responses": ["a", "b", "c"]}) + "\n" for i in (0, 1)))
        store.import_items(items)
        token = store.add_annotator("ann", 2)
        server = make_server(store, "127.0.0.1", 0, **limits)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return store, server.server_address[1], token

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def request(port, method, path, token=None, raw=None, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        c.request(method, path, body=raw, headers=headers)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""  # a refusal's 503 is read first, then EOF on the next call
    except ConnectionResetError:
        return True


def test_200_stalled_connections_are_closed_and_capped_while_a_real_request_succeeds(app):
    """Each stalled client sends a request line and part of its headers, then nothing. With a cap of
    16 and a 1 s read timeout: threads stay within the cap, a real request made during the attack
    is answered, and every stalled connection is closed within the timeout (+ slack)."""
    cap, timeout, n = 16, 1.0, 200
    store, port, token = app(read_timeout_s=timeout, max_connections=cap)
    stop, peak = threading.Event(), [0]

    def watch():  # the server runs in this process: its handler threads are ours to count
        while not stop.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    baseline = threading.active_count()  # this thread, serve_forever, the watcher, pytest's own
    stalled = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /api/me HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ")  # headers never end
            stalled.append(s)
        sent = time.monotonic()
        status, me = request(port, "GET", "/api/me", token=token, timeout=5)
        assert status == 200 and me["name"] == "ann"
        answered = time.monotonic() - sent
        # Every stalled connection is closed by the server: at once when evicted, after `timeout` otherwise.
        sel = selectors.DefaultSelector()
        for s in stalled:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        open_, deadline = set(stalled), sent + timeout + 3.0
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                if closed_by_peer(key.fileobj):
                    sel.unregister(key.fileobj)
                    open_.discard(key.fileobj)
        all_closed = time.monotonic() - sent
        assert not open_, f"{len(open_)} of {n} stalled connections still open {timeout + 3:.0f} s after the last"
    finally:
        stop.set()
        watcher.join(5)
        for s in stalled:
            s.close()
    assert peak[0] <= baseline + cap + 2, f"{peak[0]} threads at peak, baseline {baseline}, cap {cap}"
    print(f"real request answered in {answered:.2f} s; all {n} stalled connections closed after {all_closed:.2f} s; "
          f"peak threads {peak[0]} (baseline {baseline})")


def test_busy_connections_are_refused_with_503_not_queued(app):
    """When every slot is mid-request (not merely waiting), a newcomer gets an immediate 503."""
    store, port, token = app(read_timeout_s=5, max_connections=1)
    gate, entered = threading.Event(), threading.Event()
    original = store.queue

    def slow_queue(aid):  # holds the only slot inside a request
        entered.set()
        gate.wait(10)
        return original(aid)

    store.queue = slow_queue
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", request(port, "GET", "/api/me", token=token)))
    t.start()
    try:
        assert entered.wait(10)
        t0 = time.monotonic()
        status, body = request(port, "GET", "/api/me", token=token, timeout=5)
        assert status == 503 and "too many connections" in body["error"] and time.monotonic() - t0 < 2
    finally:
        gate.set()
        t.join(10)
    assert result["r"][0] == 200


def test_30k_deep_json_under_the_size_cap_is_400(app):
    store, port, token = app()
    deep = b"[" * 30_000 + b"]" * 30_000  # 60,000 bytes: under the 64 KiB cap
    assert len(deep) < 64 * 1024
    for path, body in [("/api/login", deep), ("/api/items/1/ranking", b'{"ranking": %s}' % deep),
                       ("/api/login", b'{"token": "%s"}' % (b"[" * 40_000))]:  # brackets in a string are text
        status, out = request(port, "POST", path, token=token, raw=body)
        if body.startswith(b'{"token"'):
            assert status == 401  # valid JSON: an unknown token, not a nesting error
        else:
            assert status == 400 and "deeper than 32" in out["error"], out
    assert request(port, "POST", "/api/login", raw=b'{"token": ' + b"9" * 5000 + b"}")[0] == 400  # int-parsing cap
    assert store.rankings() == []
    assert request(port, "GET", "/api/me", token=token)[0] == 200  # the server is fine
    assert READ_TIMEOUT_S == 30.0
