"""The annotation web app: a JSON API over the store, and a static page (``static/``).

Sign-in: the token ``rlhfkit annotate add-annotator`` printed, sent as ``Authorization: Bearer
TOKEN`` or kept in an HttpOnly, SameSite=Strict cookie set by ``POST /api/login``. POSTs must be
``application/json``, which a cross-site form cannot send without a CORS preflight we never
grant, so the cookie cannot be ridden by another site.

Statuses: 401 without a valid token, 403 for an item outside the annotator's queue, 404 for no
such item or route, 400 for a malformed body (a body nesting arrays or objects deeper than 32
levels included), 409 for an item already ranked, 413 for a body over 64 KiB.

Hostile or stalled clients: every socket read times out after ``read_timeout_s`` (default 30 s),
closing the connection. At most ``max_connections`` (default 64) connections hold a thread. When
all are held and another arrives, the one that has waited longest for its next request (a client
stalled in its headers or body, or an idle keep-alive) is closed to make room; when every held
connection is busy in a request, the newcomer gets an immediate ``503`` with ``Retry-After: 1``
and is closed, without a thread.

API:
  POST /api/login {"token"}             -> {"name"}  (sets the cookie)
  POST /api/logout                      -> {}
  GET  /api/me                          -> {"name", "total", "done"}
  GET  /api/queue                       -> {"items": [{"item_id", "done"}]}
  GET  /api/next                        -> {"item": {...} or null, "total", "done"}
  GET  /api/items/ID                    -> {"item_id", "prompt", "responses"}
  POST /api/items/ID/ranking {"ranking", "unsafe"?, "wrong_steps"?}  -> 201 {"ranking_id"}
"""
from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rlhfkit.annotate.store import Store, StoreError
from rlhfkit.serve_requests import json_nesting_depth

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/index.html": ("index.html", "text/html; charset=utf-8"),
                "/app.js": ("app.js", "text/javascript; charset=utf-8")}
COOKIE = "rlhfkit_token"
MAX_BODY = 64 * 1024
MAX_JSON_DEPTH = 32
READ_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64
ITEM_RE = re.compile(r"^/api/items/(\d{1,12})$")
RANK_RE = re.compile(r"^/api/items/(\d{1,12})/ranking$")


def _item_json(item) -> dict:
    return {"item_id": item.id, "prompt": item.prompt, "responses": list(item.responses)}


def make_handler(store: Store):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rlhfkit-annotate"

        def log_message(self, fmt, *a):
            pass

        # -- connection limits (see _Server) ------------------------------------------------------
        def setup(self):
            self.timeout = self.server.read_timeout_s  # StreamRequestHandler.setup puts it on the socket
            super().setup()

        def handle_one_request(self):
            self.server.waiting(self.connection)  # evictable until its request has fully arrived
            super().handle_one_request()

        def _working(self) -> bool:
            """Mark the request as arrived; False when the server already closed this connection."""
            if self.server.working(self.connection):
                return True
            self.close_connection = True
            return False

        # -- responses ----------------------------------------------------------------------------
        def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json", headers)

        def _error(self, status: int, msg: str) -> None:
            self._json(status, {"error": msg})

        # -- auth and input -----------------------------------------------------------------------
        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                return auth[len("Bearer "):].strip()
            try:
                cookie = SimpleCookie(self.headers.get("Cookie", ""))
            except CookieError:
                return None
            return cookie[COOKIE].value if COOKIE in cookie else None

        def _annotator(self):
            who = store.annotator_for_token(self._token())
            if who is None:
                self._error(401, "sign in with your annotator token")
            return who

        def _read(self) -> bytes | None:
            """Read the whole request body first, so that an early refusal (401, 404) never leaves
            unread bytes on a keep-alive connection to be misread as the next request."""
            try:
                length = int(self.headers.get("Content-Length", "0") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self.close_connection = True  # the body is not read: this connection cannot be reused
                self._error(413 if length > MAX_BODY else 400, f"body over {MAX_BODY} bytes" if length > MAX_BODY
                            else "bad Content-Length")
                return None
            return self.rfile.read(length)

        def _parse(self, raw: bytes):
            """The JSON object of a POST, or None after sending the error."""
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                self._error(400, "Content-Type must be application/json")
                return None
            # json.loads recurses per level: a 30k-deep body under MAX_BODY would raise RecursionError.
            if json_nesting_depth(raw) > MAX_JSON_DEPTH:
                self._error(400, f"the body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
                return None
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, ints over 4,300 digits
                self._error(400, "the body is not valid JSON")
                return None
            if not isinstance(obj, dict):
                self._error(400, "the body must be a JSON object")
                return None
            return obj

        # -- routes -------------------------------------------------------------------------------
        def do_GET(self):
            if not self._working():
                return
            path = self.path.split("?", 1)[0]
            if path in STATIC_FILES:
                name, ctype = STATIC_FILES[path]
                self._send(200, (STATIC / name).read_bytes(), ctype)
                return
            if not path.startswith("/api/"):
                self._error(404, f"no route {path}")
                return
            who = self._annotator()
            if who is None:
                return
            aid, name = who
            try:
                if path == "/api/me" or path == "/api/queue" or path == "/api/next":
                    queue = store.queue(aid)
                    done = sum(q["done"] for q in queue)
                    if path == "/api/me":
                        self._json(200, {"name": name, "total": len(queue), "done": done})
                    elif path == "/api/queue":
                        self._json(200, {"items": queue})
                    else:
                        nxt = next((q["item_id"] for q in queue if not q["done"]), None)
                        item = _item_json(store.item_for(aid, nxt)) if nxt is not None else None
                        self._json(200, {"item": item, "total": len(queue), "done": done})
                elif m := ITEM_RE.match(path):
                    self._json(200, _item_json(store.item_for(aid, int(m.group(1)))))
                else:
                    self._error(404, f"no route {path}")
            except StoreError as e:
                self._error(e.status, str(e))

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            raw = self._read()
            if raw is None or not self._working():
                return
            if path == "/api/login":
                body = self._parse(raw)
                if body is None:
                    return
                token = body.get("token")
                who = store.annotator_for_token(token if isinstance(token, str) else None)
                if who is None:
                    self._error(401, "unknown token")
                    return
                cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
                self._json(200, {"name": who[1]}, {"Set-Cookie": cookie})
                return
            if path == "/api/logout":
                self._json(200, {}, {"Set-Cookie": f"{COOKIE}=; Max-Age=0; HttpOnly; SameSite=Strict; Path=/"})
                return
            m = RANK_RE.match(path)
            if not m:
                self._error(404, f"no route {path}")
                return
            who = self._annotator()
            if who is None:
                return
            body = self._parse(raw)
            if body is None:
                return
            unknown = set(body) - {"ranking", "unsafe", "wrong_steps"}
            if unknown:
                self._error(400, f"unknown fields: {', '.join(sorted(unknown))}")
                return
            if "ranking" not in body:
                self._error(400, "missing 'ranking'")
                return
            try:
                rid = store.submit(who[0], int(m.group(1)), body["ranking"], body.get("unsafe", []),
                                   body.get("wrong_steps", []))
            except StoreError as e:
                self._error(e.status, str(e))
                return
            self._json(201, {"ranking_id": rid})

    return Handler


_BUSY_BODY = b'{"error": "too many connections; retry in a moment"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them (see the module docstring).

    A connection is *waiting* from the start of each request until its headers (and body) have
    arrived, *working* while it is answered. Only waiting ones are evicted: a stalled client
    costs nothing but its slot, and the next real request takes that slot.
    """

    daemon_threads = True
    # socketserver's default backlog is 5: a burst of simultaneous connections (20 annotators
    # opening pages at once) would overflow it and see connection resets.
    request_queue_size = 128

    def __init__(self, address, handler, read_timeout_s: float, max_connections: int):
        if max_connections < 1 or not read_timeout_s > 0:
            raise ValueError(f"max_connections must be >= 1 and read_timeout_s > 0, got {max_connections}, "
                             f"{read_timeout_s}")
        super().__init__(address, handler)
        self.read_timeout_s, self.max_connections = read_timeout_s, max_connections
        self._slots = threading.Condition()
        self._open = 0
        self._waiting: dict[socket.socket, float] = {}  # connection -> when it began waiting

    def waiting(self, conn: socket.socket) -> None:
        with self._slots:
            self._waiting[conn] = time.monotonic()

    def working(self, conn: socket.socket) -> bool:
        with self._slots:
            return self._waiting.pop(conn, None) is not None

    def process_request(self, request, client_address):
        with self._slots:
            if self._open >= self.max_connections and self._waiting:
                victim = min(self._waiting, key=self._waiting.get)
                del self._waiting[victim]
                try:
                    victim.shutdown(socket.SHUT_RDWR)  # its blocked read returns at once; its thread ends
                except OSError:
                    pass
                self._slots.wait_for(lambda: self._open < self.max_connections, timeout=2.0)
            if self._open >= self.max_connections:
                self._refuse(request)
                return
            self._open += 1
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request) -> None:
        with self._slots:
            self._waiting.pop(request, None)
            self._open -= 1
            self._slots.notify_all()

    def _refuse(self, request) -> None:
        try:
            request.setblocking(False)  # never let a refusal stall the accept loop
            request.send(_BUSY)
            # Closing with unread bytes would send a reset, which can destroy the 503 in flight.
            request.recv(MAX_BODY)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away, or a connection evicted or timed out: nothing to report
        super().handle_error(request, client_address)


def make_server(store: Store, host: str = "127.0.0.1", port: int = 0, read_timeout_s: float = READ_TIMEOUT_S,
                max_connections: int = MAX_CONNECTIONS) -> ThreadingHTTPServer:
    """A server bound to (host, port); port 0 picks a free one. Run with ``serve_forever``.

    ``read_timeout_s``: seconds a socket read may wait before the connection is closed;
    ``max_connections``: connections served at once (see the module docstring for the rest).
    """
    return _Server((host, port), make_handler(store), read_timeout_s, max_connections)
