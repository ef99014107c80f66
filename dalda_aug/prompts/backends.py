"""Chat backends: :class:`TemplateBackend` (no LLM), :class:`OpenAIChatBackend` (any
OpenAI-compatible chat-completions endpoint over stdlib ``urllib``: redaction of the key,
same-origin redirects, a deadline per request, a cap on the answer's size) and
:class:`HFChatBackend` (a local transformers chat model); :func:`parse_backend` builds one from a
``"kind:MODEL"`` string. Neither torch nor transformers is imported until a model is loaded.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterable

from ..errors import BackendError, InputError, MissingFileError, ModelLoadError, require
from ._text import check_template
from .bank import DEFAULT_TEMPLATE

__all__ = [
    "TemplateBackend",
    "OpenAIChatBackend",
    "HFChatBackend",
    "parse_backend",
    "redact",
    "DEFAULT_BASE_URL",
    "OPENAI_SAMPLING",
    "MAX_ANSWER_BYTES",
    "REDACTED",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class TemplateBackend:
    """No LLM: one prompt per class from a template such as "a photo of a {}"."""

    kind = "template"

    def __init__(self, template: str = DEFAULT_TEMPLATE):
        check_template(template)
        self.template = template

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "template": self.template}

    def __repr__(self) -> str:
        return f"TemplateBackend({self.template!r})"


_AZURE_HOSTS = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")
_RETRY_STATUS = {408, 409, 425, 429}
# Table 4 of the paper / the reference's chat call: sent explicitly, as servers' defaults differ
# (temperature is sent too, from the ``temperature`` argument, 1.0 by default).
OPENAI_SAMPLING: dict[str, float] = {"top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
# The most of an HTTP answer the chat client reads (a chat answer of M sentences per class is a few
# KiB; a larger one is refused, not read into memory). An error body is read up to _MAX_ERROR_BYTES.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
_MAX_ERROR_BYTES = 64 * 1024
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)[^\s\"',;}\]]+")
REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every ``secrets`` value and every ``Bearer <token>`` replaced by [REDACTED]."""
    out = str(text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        out = out.replace(secret, REDACTED)
        quoted = urllib.parse.quote(secret, safe="")
        if quoted != secret:
            out = out.replace(quoted, REDACTED)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", out)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the endpoint's origin; a redirect elsewhere would carry the
    API key (urllib copies the ``Authorization`` header) to another host, so it is refused."""

    def __init__(self, backend: "OpenAIChatBackend"):
        self.backend = backend

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        target = urllib.parse.urljoin(req.full_url, newurl)
        if _origin(target) != _origin(req.full_url):
            fp.close()
            raise BackendError(self.backend._redact(
                f"chat endpoint {self.backend.endpoint} redirected (HTTP {code}) to another origin, "
                f"{target}; refusing to send the API key there. Set --base-url to the address that "
                "should receive it"
            ))
        fp.close()  # urllib would read the whole redirect body before following; it is not needed
        if code in (307, 308) and req.get_method() == "POST":  # keeps method and body (RFC 9110)
            return urllib.request.Request(target, data=req.data, headers=dict(req.headers), method="POST")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """A deadline for one whole HTTP request: when it passes, every socket it watches is shut
    down, so a read blocked in connect, headers or body returns at once (a socket timeout alone
    bounds each read, not the request: a server trickling a byte per second never trips it)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._started = time.monotonic()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(0.001, self.seconds - (time.monotonic() - self._started))

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            self._shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:  # the plain socket's shutdown, also for a TLS socket (no TLS close from this thread)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed, or detached when TLS wrapped it (the TLS socket is watched too)

    def message(self) -> str:
        return f"TimeoutError: no complete answer within {self.seconds:g} s (connect, headers and body)"


def _watched_connection(deadline: _Deadline, address: tuple[str, int], timeout: Any = None,
                        source_address: Any = None, *args: Any, **kwargs: Any) -> socket.socket:
    """``socket.create_connection`` within what is left of ``deadline``, the socket then watched."""
    limit = deadline.remaining() if not isinstance(timeout, (int, float)) else min(float(timeout), deadline.remaining())
    sock = socket.create_connection(address, limit, source_address, *args, **kwargs)
    deadline.watch(sock)
    return sock


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_watched_connection, deadline)


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = functools.partial(_watched_connection, deadline)

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)  # the TLS socket (the plain one it wrapped is detached)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPSConnection, deadline=self.deadline), req,
                            context=self._context)  # type: ignore[attr-defined]


def _read_capped(response: Any, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of ``response``'s body, and whether there was more."""
    raw = response.read(limit + 1)
    return raw[:limit], len(raw) > limit


class OpenAIChatBackend:
    """Any OpenAI-compatible chat-completions endpoint, over stdlib ``urllib``.

    ``base_url`` is the API root (``https://api.openai.com/v1``; vLLM ``http://host:8000/v1``;
    Ollama ``http://localhost:11434/v1``; llama.cpp ``http://localhost:8080/v1``; Azure
    ``https://RESOURCE.openai.azure.com/openai/v1`` or ``.../openai/deployments/NAME`` with
    ``api_version``). The key comes from ``api_key`` or the environment variable
    ``api_key_env``; it is sent as ``Authorization: Bearer`` or, for Azure hosts (or
    ``azure=True``), as ``api-key``. Local servers need no key.

    HTTP 408/409/425/429, 5xx, time-outs and connection errors are retried up to
    ``max_retries`` times, waiting ``base_delay * 2**attempt`` seconds (or the server's
    ``Retry-After``), at most ``max_delay``; then :class:`BackendError` names the endpoint.
    ``timeout`` is a deadline for each whole request (connect, headers and the full answer), not
    per socket read. An answer larger than :data:`MAX_ANSWER_BYTES` is refused without reading
    the rest.
    """

    kind = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        azure: bool | None = None,
        api_version: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        json_mode: bool = False,
    ):
        if not model or not model.strip():
            raise InputError("the openai backend needs a model name, e.g. 'openai:gpt-4o-mini'")
        base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"base URL {base_url!r} must be an http(s) URL such as {DEFAULT_BASE_URL}")
        if max_retries < 0 or timeout <= 0 or base_delay < 0:
            raise InputError(
                f"need max_retries >= 0, timeout > 0, base_delay >= 0 (got {max_retries}, {timeout}, {base_delay})"
            )
        host = (parts.hostname or "").lower()
        self.model = model
        self.base_url = base_url
        self.azure = host.endswith(_AZURE_HOSTS) if azure is None else bool(azure)
        self.api_version = api_version
        query = f"?{urllib.parse.urlencode({'api-version': api_version})}" if api_version else ""
        self.endpoint = f"{base_url}/chat/completions{query}"
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.json_mode = bool(json_mode)
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        # a password in the URL (https://user:PASSWORD@host/v1) is a secret too
        self._secrets = tuple(v for v in (key, parts.password) if v)
        if not key and (host == "api.openai.com" or self.azure):
            raise InputError(f"no API key for {self.endpoint}: set the environment variable {api_key_env}")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "dalda-aug"}
        if key:
            self._headers.update({"api-key": key} if self.azure else {"Authorization": f"Bearer {key}"})

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "base_url": self._redact(self.base_url)}

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIChatBackend({self.model!r}, base_url={self._redact(self.base_url)!r})"

    def _redact(self, text: str) -> str:
        """``text`` without the API key or any ``Bearer`` token (what a server may echo back)."""
        return redact(text, self._secrets)

    def chat(self, messages: list[dict[str, str]], *, temperature: float = 1.0, max_tokens: int | None = None) -> str:
        """The assistant's answer to ``messages``. ``max_tokens`` is a hint this backend ignores."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                **OPENAI_SAMPLING}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        last_error = ""
        for attempt in range(self.max_retries + 1):
            delay = min(self.max_delay, self.base_delay * 2**attempt)
            request = urllib.request.Request(self.endpoint, data=data, headers=self._headers, method="POST")
            with _Deadline(self.timeout) as deadline:
                opener = urllib.request.build_opener(
                    _SameOriginRedirects(self), _DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline)
                )
                try:
                    with opener.open(request, timeout=self.timeout) as response:
                        raw, more = _read_capped(response, MAX_ANSWER_BYTES)
                    if deadline.expired:  # the body may look complete when the socket was shut
                        raise TimeoutError(deadline.message())
                except urllib.error.HTTPError as exc:
                    detail = self._redact(_http_error_detail(exc))
                    if exc.code not in _RETRY_STATUS and exc.code < 500:
                        raise BackendError(self._redact(
                            f"chat endpoint {self.endpoint} refused the request: HTTP {exc.code} {detail}"
                        )) from None
                    last_error = f"HTTP {exc.code} {detail}"
                    retry_after = _retry_after(exc.headers)
                    if retry_after is not None:
                        delay = min(self.max_delay, retry_after)
                except (OSError, http.client.HTTPException) as exc:  # URLError, time-outs, resets
                    if deadline.expired:
                        last_error = deadline.message()
                    else:
                        last_error = self._redact(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
                else:
                    if more:
                        raise BackendError(self._redact(
                            f"chat endpoint {self.endpoint} answered with more than {MAX_ANSWER_BYTES >> 20} MiB; "
                            "refusing to read it (a chat answer is a few KiB: is --base-url a chat-completions API?)"
                        ))
                    return self._redact(self._content(raw))
            if attempt < self.max_retries:
                time.sleep(delay)
        raise BackendError(self._redact(
            f"chat endpoint {self.endpoint} is unavailable: {self.max_retries + 1} attempt(s) failed, "
            f"the last with {last_error}"
        ))

    def _content(self, raw: bytes) -> str:
        try:
            return self._parse_content(raw)
        except BackendError as exc:
            raise BackendError(self._redact(str(exc))) from None

    def _parse_content(self, raw: bytes) -> str:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BackendError(
                f"chat endpoint {self.endpoint} answered with something other than JSON: {raw[:200]!r}"
            ) from None
        if isinstance(obj, dict) and obj.get("error"):
            raise BackendError(f"chat endpoint {self.endpoint} answered with an error: {obj['error']}")
        try:
            message = obj["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(
                f"chat endpoint {self.endpoint} answered without choices[0].message: {raw[:200]!r}"
            ) from None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""


def _http_error_detail(exc: urllib.error.HTTPError) -> str:
    """The reason and the start of the error body, on one line (at most _MAX_ERROR_BYTES are read)."""
    try:
        body = exc.read(_MAX_ERROR_BYTES).decode("utf-8", "replace")
    except Exception:  # pragma: no cover - the body is only a detail of the message
        body = ""
    finally:
        exc.close()
    body = " ".join(body[:300].split())
    reason = " ".join(str(exc.reason).split())
    return f"{reason}: {body}" if body else reason


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


class HFChatBackend:
    """A local transformers chat model (a hub id or a folder), on ``device`` in ``dtype``.

    Loaded on first use with ``AutoTokenizer``/``AutoModelForCausalLM``; the prompt is built
    with the tokenizer's chat template. Sampling is seeded per call (``seed`` + call number)
    without touching the caller's global RNG state.
    """

    kind = "hf"

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        revision: str | None = None,
    ):
        if not model or not str(model).strip():
            raise InputError("the hf backend needs a model id or folder, e.g. 'hf:Qwen/Qwen2.5-1.5B-Instruct'")
        if dtype not in (None, "float32", "float16", "bfloat16"):
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.model = str(model)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.seed = int(seed)
        self.revision = revision
        self._calls = 0
        self._loaded: tuple[Any, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "device": str(self.device), "dtype": self.dtype or "float32"}

    def __repr__(self) -> str:
        return f"HFChatBackend({self.model!r}, device={self.device!r})"

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            torch = require("torch", "llm")
            transformers = require("transformers", "llm")
            from ..locations import parse_location  # the one "hub id or local path" rule

            location = parse_location(self.model)
            if location.is_local and not location.path.is_dir():
                raise MissingFileError(f"chat model folder not found: {location.path}")
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(location.value, revision=self.revision)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    location.value, revision=self.revision, dtype=getattr(torch, self.dtype or "float32")
                )
            except OSError as exc:
                raise ModelLoadError(f"could not load the chat model {self.model!r}: {exc}") from exc
            if not getattr(tokenizer, "chat_template", None):
                raise InputError(f"the tokenizer of {self.model!r} has no chat template; use a chat/instruct model")
            self._loaded = (tokenizer, model.to(self.device).eval())
        return self._loaded

    def chat(self, messages: list[dict[str, str]], *, temperature: float = 1.0, max_tokens: int | None = None) -> str:
        """Sample an answer to ``messages`` (at most ``max_new_tokens`` or ``max_tokens`` new tokens)."""
        import torch

        tokenizer, model = self._load()
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.device)
        n_prompt = inputs["input_ids"].shape[-1]
        new_tokens = self.max_new_tokens or max_tokens or 1024
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and n_prompt + 1 > limit:
            raise InputError(
                f"the request has {n_prompt} tokens but {self.model!r} reads at most {limit}; lower the chunk size"
            )
        if limit is not None:
            new_tokens = min(new_tokens, limit - n_prompt)
        # Table 4: temperature 1, top-p 1, no frequency/presence penalty. Set explicitly, so a model's
        # generation_config.json (often top_k 20-50, top_p < 1, a repetition penalty) is overridden.
        sampling: dict[str, Any] = dict(top_k=None, top_p=None, min_p=None, typical_p=None, repetition_penalty=None)
        if temperature > 0:
            sampling.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            sampling.update(do_sample=False, temperature=None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = torch.device(self.device)
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.inference_mode():
            torch.manual_seed(self.seed + self._calls)
            self._calls += 1
            output = model.generate(**inputs, max_new_tokens=new_tokens, pad_token_id=pad, **sampling)
        return str(tokenizer.decode(output[0, n_prompt:], skip_special_tokens=True))


def parse_backend(
    spec: str,
    *,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    api_version: str | None = None,
    timeout: float = 120.0,
    max_retries: int = 5,
    base_delay: float = 1.0,
    json_mode: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    seed: int = 0,
) -> OpenAIChatBackend | HFChatBackend | TemplateBackend:
    """A backend from ``"openai:MODEL"``, ``"hf:MODEL_ID_OR_PATH"``, ``"template"`` or
    ``"template:TEMPLATE"``. Each keyword goes only to the backend that uses it; giving one
    to another backend (e.g. ``base_url`` with ``hf``) is an error."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "openai":
        return OpenAIChatBackend(
            arg, base_url=base_url, api_key_env=api_key_env, api_version=api_version, timeout=timeout,
            max_retries=max_retries, base_delay=base_delay, json_mode=json_mode,
        )
    if base_url is not None or api_version is not None:
        raise InputError(f"--base-url/--api-version apply to the openai backend only, not to {spec!r}")
    if kind == "hf":
        return HFChatBackend(arg, device=device, dtype=dtype, seed=seed)
    if kind == "template":
        return TemplateBackend(arg or DEFAULT_TEMPLATE)
    raise InputError(f"unknown LLM backend {spec!r}; use openai:MODEL, hf:MODEL_ID_OR_PATH or template")
