"""A real chat-completions HTTP server on 127.0.0.1 for tests, answering from a script.

It speaks the OpenAI protocol: ``POST /v1/chat/completions`` with a JSON body holding
``model``, ``messages`` and ``temperature`` (every body is kept in ``requests``, every request
of any method in ``hits``); it answers
``{"choices": [{"message": {"role": "assistant", "content": ...}}]}``. Requests that break the
protocol get HTTP 400/404, so a client bug fails the test instead of passing silently.

Each request is answered by the next step of ``script``, then by ``default``. A step is a
callable ``step(request) -> Response``; helpers below build the usual ones.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

__all__ = [
    "ChatServer",
    "ChatRequest",
    "Response",
    "reply",
    "reply_json",
    "per_class",
    "status",
    "stall",
    "redirect",
    "echo_auth",
    "trickle",
    "huge",
]


@dataclass
class ChatRequest:
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any]

    @property
    def user_message(self) -> str:
        return [m["content"] for m in self.body["messages"] if m["role"] == "user"][-1]

    @property
    def requested(self) -> list[str]:
        """The classes this request asks sentences for (from the user message): the list after
        "each of these N classes:", else the last JSON list of strings in the message (a custom
        instruction template)."""
        m = re.search(r"each of these \d+ classes: (\[.*\])", self.user_message)
        if m:
            return json.loads(m.group(1))
        lists = re.findall(r"\[\s*\"[^\[\]]*\]", self.user_message)
        assert lists, f"no requested class list in: {self.user_message}"
        return json.loads(lists[-1])


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (to provoke client time-outs)
    # > 0: send the whole answer (status line, headers, body) one byte at a time, this many
    # seconds apart, as a slow or hostile server does (each socket read gets a byte in time).
    trickle: float = 0.0
    trickle_body_only: bool = False  # with trickle: status line and headers at once, then the body slowly
    # the body is ``body`` sent ``repeat`` times (Content-Length says so), streamed, never held whole
    repeat: int = 1


Step = Callable[[ChatRequest], Response]


def _completion(content: str) -> Response:
    payload = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    return Response(200, json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                    {"Content-Type": "application/json; charset=utf-8"})


def reply(content: str) -> Step:
    """Answer with ``content`` as the assistant message."""
    return lambda request: _completion(content)


def reply_json(obj: Any) -> Step:
    """Answer with ``obj`` serialised as JSON (UTF-8, not escaped) as the assistant message."""
    return reply(json.dumps(obj, ensure_ascii=False))


def per_class(sentence: Callable[[str, int], str | None], wrap: Callable[[str], str] = lambda s: s) -> Step:
    """Answer each requested class with ``sentence(class_name, call_number)`` (``None``: leave
    the class out); ``wrap`` dresses the JSON text (e.g. in a markdown fence)."""
    calls = {"n": 0}

    def step(request: ChatRequest) -> Response:
        calls["n"] += 1
        answer = {}
        for name in request.requested:
            text = sentence(name, calls["n"])
            if text is not None:
                answer[name] = text
        return _completion(wrap(json.dumps(answer, ensure_ascii=False)))

    return step


def status(code: int, body: str = "", retry_after: float | None = None) -> Step:
    """Answer with HTTP ``code`` and an OpenAI-style error body."""
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    payload = json.dumps({"error": {"message": body or f"scripted {code}", "code": code}}).encode()
    return lambda request: Response(code, payload, headers)


def redirect(location: str, code: int = 302) -> Step:
    """Answer with HTTP ``code`` and ``Location: location`` (e.g. another server's endpoint)."""
    return lambda request: Response(code, b"", {"Location": location})


def echo_auth(code: int = 200, as_error: bool = True) -> Step:
    """Echo the request's ``Authorization`` (or ``api-key``) header back, as a hostile or buggy
    server does: in an error body with HTTP ``code``, or (``as_error=False``) as the assistant's
    message of a 200 answer."""

    def step(request: ChatRequest) -> Response:
        header = request.headers.get("authorization") or request.headers.get("api-key") or ""
        if not as_error:
            return _completion(f"Your header was {header}")
        body = json.dumps({"error": {"message": f"invalid credentials: Authorization: {header}",
                                     "received_headers": request.headers}}).encode()
        return Response(code, body, {"Content-Type": "application/json"})

    return step


def trickle(interval: float, then: Step, body_only: bool = False) -> Step:
    """Send the answer ``then`` gives one byte every ``interval`` seconds, from the status line on
    (``body_only``: status line and headers at once, then the body byte by byte).
    ``ChatServer.trickled`` records, per such answer, how long the client stayed (seconds from the
    first byte until writing failed, i.e. the client had closed the connection)."""

    def step(request: ChatRequest) -> Response:
        response = then(request)
        response.trickle = interval
        response.trickle_body_only = body_only
        return response

    return step


def huge(code: int, megabytes: int) -> Step:
    """Answer HTTP ``code`` with a body of ``megabytes`` MiB (JSON-looking text, streamed)."""
    block = b"x" * (1 << 20)
    prefix = b'{"choices": [{"message": {"role": "assistant", "content": "'
    body = prefix + block[len(prefix):]
    return lambda request: Response(code, body, {"Content-Type": "application/json"}, repeat=megabytes)


def stall(seconds: float, then: Step) -> Step:
    """Wait ``seconds`` before answering as ``then`` would (the client may have given up)."""

    def step(request: ChatRequest) -> Response:
        response = then(request)
        response.delay = seconds
        return response

    return step


class ChatServer:
    """``with ChatServer(script, default=...) as server:`` → ``server.base_url`` ends in ``/v1``."""

    def __init__(self, script: Iterable[Step] = (), default: Step | None = None, api_key: str | None = None):
        self.script = list(script)
        self.default = default or status(500, "script exhausted")
        self.api_key = api_key
        self.requests: list[ChatRequest] = []
        # Every HTTP request that reached the server, whatever its method: (method, path, headers).
        self.hits: list[tuple[str, str, dict[str, str]]] = []
        # Per trickled answer: seconds from its first byte until the client was gone.
        self.trickled: list[float] = []
        # Per streamed (repeat > 1) answer: bytes of the body written before the client left.
        self.streamed: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/chat/completions"

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_step(self, request: ChatRequest) -> Step:
        with self._lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else self.default

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _trickle(self, response: Response) -> None:
                head = [f"HTTP/1.1 {response.status} {self.responses.get(response.status, ('',))[0]}"]
                head += [f"{k}: {v}" for k, v in response.headers.items()]
                head += [f"Content-Length: {len(response.body)}", "Connection: close", "", ""]
                raw = "\r\n".join(head).encode("latin-1") + response.body
                start = time.monotonic()
                try:
                    if response.trickle_body_only:
                        self.wfile.write(raw[: len(raw) - len(response.body)])
                        raw = response.body
                    for i in range(len(raw)):
                        self.wfile.write(raw[i : i + 1])
                        time.sleep(response.trickle)
                except OSError:  # the client left (EPIPE, ECONNRESET)
                    pass
                with server._lock:
                    server.trickled.append(time.monotonic() - start)
                self.close_connection = True

            def _stream(self, response: Response) -> None:
                sent = 0
                try:
                    self.send_response(response.status)
                    for key, value in response.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(response.body) * response.repeat))
                    self.end_headers()
                    for _ in range(response.repeat):
                        self.wfile.write(response.body)
                        sent += len(response.body)
                except OSError:
                    pass
                with server._lock:
                    server.streamed.append(sent)
                self.close_connection = True

            def _send(self, response: Response) -> None:
                if response.delay:
                    time.sleep(response.delay)
                if response.trickle:
                    return self._trickle(response)
                if response.repeat > 1:
                    return self._stream(response)
                try:
                    self.send_response(response.status)
                    for key, value in response.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(response.body)))
                    self.end_headers()
                    self.wfile.write(response.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def _hit(self) -> None:
                with server._lock:
                    server.hits.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

            def do_GET(self):
                self._hit()
                self._send(Response(405, b'{"error": {"message": "use POST"}}'))

            def do_POST(self):
                self._hit()
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path.split("?")[0] != "/v1/chat/completions":
                    return self._send(Response(404, b'{"error": {"message": "not found"}}'))
                try:
                    body = json.loads(raw.decode("utf-8"))
                    assert isinstance(body["model"], str) and body["model"]
                    assert isinstance(body["temperature"], (int, float))
                    assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                               for m in body["messages"])
                except (ValueError, KeyError, TypeError, AssertionError) as exc:
                    error = {"error": {"message": f"bad request: {exc!r}"}}
                    return self._send(Response(400, json.dumps(error).encode()))
                request = ChatRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}" \
                        and self.headers.get("api-key") != server.api_key:
                    with server._lock:
                        server.requests.append(request)
                    return self._send(Response(401, b'{"error": {"message": "bad api key"}}'))
                self._send(server._next_step(request)(request))

        return Handler
