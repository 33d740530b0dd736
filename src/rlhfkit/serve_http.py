"""The HTTP face of ``rlhfkit serve``: an OpenAI-compatible handler around a :class:`rlhfkit.serve.ChatModel`.

``GET /v1/models`` and ``POST /v1/chat/completions``; every error is OpenAI's error object
(``message``, ``type``, ``param``, ``code``), a 500 never carries a traceback.
"""
from __future__ import annotations

import json
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhfkit.serve import ChatModel, GenerationFailed, QueueFull
from rlhfkit.serve_requests import MAX_BODY, MAX_JSON_DEPTH, BadRequest, json_nesting_depth, validate_request

_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}


def make_handler(chat: ChatModel, max_tokens_limit: int, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):  # quiet: one line per request on stderr is noise in tests
            pass

        def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
            data = json.dumps(obj).encode()
            self._responded = True  # from here on a failure cannot become a clean 500
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, msg: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> None:
            err = {"message": msg, "type": _ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                   "code": code}
            self._send(status, {"error": err}, headers)

        def _guarded(self, route) -> None:
            """Run ``route``; an exception it lets out is logged here and answered as a bare 500."""
            self._responded = False
            try:
                route()
            except Exception as e:
                self.close_connection = True
                if isinstance(e, ConnectionError):
                    return  # the client went away: nothing to answer, nothing to log
                if not isinstance(e, GenerationFailed):  # the worker logged that one already
                    print(f"serve: {self.command} {self.path} failed:", file=sys.stderr)
                    traceback.print_exc(file=sys.stderr)
                if not self._responded:
                    try:
                        self._error(500, "The server had an error while processing your request.")
                    except OSError:
                        pass

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            if self.headers.get("Authorization", "") == f"Bearer {api_key}":
                return True
            self._error(401, "missing or wrong API key", code="invalid_api_key")
            return False

        def do_GET(self):
            self._guarded(self._get)

        def do_POST(self):
            self._guarded(self._post)

        def _get(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0,
                                                             "owned_by": "rlhfkit"}]})
            else:
                self._error(404, f"no route {self.path}")

        def _post(self):
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
            raw = self.rfile.read(length)
            if json_nesting_depth(raw) > MAX_JSON_DEPTH:
                self._error(400, f"the body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
                return
            try:
                body = json.loads(raw or b"null")
            except (ValueError, RecursionError):  # also UnicodeDecodeError, and ints over 4,300 digits
                self._error(400, "the body is not valid JSON")
                return
            try:
                req = validate_request(body, max_tokens_limit)
                if body.get("stream"):
                    raise BadRequest("streaming is not supported", param="stream")
                answer = chat.complete(req)
            except BadRequest as e:
                self._error(400, str(e), e.code, e.param)
                return
            except QueueFull as e:
                self._error(429, str(e), "rate_limit_exceeded", headers={"Retry-After": "1"})
                return
            self.close_connection = not keep_alive
            self._send(200, answer)

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


def serve_until_interrupted(server, banner: str) -> None:
    """Print ``banner``, serve until Ctrl-C, then close the socket (used by ``serve`` and ``annotate serve``)."""
    print(banner, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
