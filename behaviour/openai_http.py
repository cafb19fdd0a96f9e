"""An OpenAI-compatible chat-completions client over HTTP, standard library only.

It serves any server of that API: llama.cpp's ``llama-server``, vLLM, Ollama's ``/v1``, or a
hosted API. The base URL is the one OpenAI's own clients take (``http://127.0.0.1:8080/v1``);
requests go to ``BASE/chat/completions``. An API key is read from an environment variable
(``OPENAI_API_KEY`` unless told otherwise) when set, and sent as a bearer token; it appears in
no error message and no cache entry.

What the server sees: the model's name, one user message (a prompt made of a cell's public
attributes and the period's public numbers, :mod:`behaviour.prompts`) and the sampling
parameters — no agent, no individual attribute, no identifier of the run.

**Retry policy.** A request is tried ``1 + retries`` times (3 retries by default). It is retried
on HTTP 5xx, HTTP 429 (rate limited), a timeout (no answer within ``timeout`` seconds on
connecting or reading) and a connection error (refused, reset, unresolvable host), after a
wait of ``backoff · 2^(k-1)`` seconds before retry k, at most ``max_backoff``. Anything else
fails at once: HTTP 404/405 (no chat-completions endpoint at that URL) and an answer that is
not HTTP or not JSON are a :class:`~behaviour.errors.NonCompliantEndpoint`, other 4xx a
:class:`~behaviour.errors.BackendHTTPError`. When the retries run out, the last failure is
raised as :class:`~behaviour.errors.BackendHTTPError`,
:class:`~behaviour.errors.BackendTimeout` or :class:`~behaviour.errors.BackendUnreachable`.
Every message is one line that starts with the URL.

Connections are kept alive and pooled (one per concurrent request); a pooled connection that
the server closed while idle is reopened and the request resent once, without counting as a
retry.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import time
from typing import Any
from urllib.parse import urlsplit

from behaviour.answers import CompletionClient
from behaviour.errors import (
    BackendError,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    NonCompliantEndpoint,
)


def _excerpt(data: bytes) -> str:
    """A short one-line excerpt of a response body, for an error message."""
    text = data.decode("utf-8", errors="replace")
    return " ".join(text.split())[:200]


class OpenAIClient(CompletionClient):
    """Chat completions from an OpenAI-compatible HTTP endpoint (see the module doc)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        concurrency: int = 8,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        """A client of ``BASE_URL/chat/completions`` asking ``model``.

        Args:
            base_url: ``http(s)://HOST[:PORT]/PATH`` — the API's base, e.g. ``.../v1``.
            model: the model's name as the server knows it (part of every cache key).
            timeout: seconds to wait for a connection and for each read.
            retries: further tries after a retryable failure (see the module doc).
            backoff: the wait before the first retry, in seconds; it doubles each retry.
            max_backoff: the longest wait between tries.
            concurrency: requests that may run at once (connections kept).
            api_key_env: the environment variable holding an API key, if one is needed.

        Raises:
            ValueError: the base URL is not ``http(s)://HOST…``, or a number is out of range.
        """
        super().__init__()
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"LLM base URL must be http(s)://HOST[:PORT]/PATH, got {base_url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1:
            raise ValueError(
                "timeout must be > 0, retries and backoff >= 0 and concurrency >= 1; got "
                f"{timeout}, {retries}, {backoff}, {concurrency}"
            )
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._secure = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + "/chat/completions"
        self.where = f"{parts.scheme}://{parts.netloc}{self._path}"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(api_key_env)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._pool: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()

    def close(self) -> None:
        """Close the kept-alive connections (the client stays usable: it opens new ones)."""
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exchange(self, conn: http.client.HTTPConnection, payload: bytes) -> tuple[int, bytes]:
        self._count()
        conn.request("POST", self._path, payload, self._headers)
        response = conn.getresponse()
        data = response.read()
        if response.will_close:
            conn.close()
        return response.status, data

    def _post(self, payload: bytes) -> tuple[int, bytes]:
        """One request on a pooled connection: (status, body)."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            make = http.client.HTTPSConnection if self._secure else http.client.HTTPConnection
            conn = make(self._host, self._port, timeout=self.timeout)
        reused = conn.sock is not None
        ok = False
        try:
            try:
                answer = self._exchange(conn, payload)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                # The server closed this kept-alive connection while it was idle: that says
                # nothing about the server, so resend once on a fresh connection.
                conn.close()
                answer = self._exchange(conn, payload)
            ok = True
            return answer
        finally:
            if ok:
                self._pool.put(conn)
            else:
                conn.close()

    def _complete(self, body: dict[str, Any]) -> Any:
        payload = json.dumps(body).encode()
        attempts = 1 + self.retries
        failure: BackendError | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                status, data = self._post(payload)
            except TimeoutError:
                failure = BackendTimeout(f"{self.where}: no answer within {self.timeout} s")
                continue
            except OSError as e:
                reason = e.strerror or type(e).__name__
                failure = BackendUnreachable(f"{self.where}: connection failed ({reason})")
                continue
            except http.client.HTTPException as e:
                said = " ".join(str(e).split())[:80]
                raise NonCompliantEndpoint(
                    f"{self.where}: the answer is not HTTP ({type(e).__name__}: {said})"
                ) from None
            if status >= 500 or status == 429:
                failure = BackendHTTPError(f"{self.where}: HTTP {status}: {_excerpt(data)}")
                continue
            if status in (404, 405):
                raise NonCompliantEndpoint(
                    f"{self.where}: HTTP {status}: no OpenAI-compatible chat-completions "
                    "endpoint here (the base URL ends in /v1 for most servers)"
                )
            if status >= 400:
                raise BackendHTTPError(f"{self.where}: HTTP {status}: {_excerpt(data)}")
            try:
                return json.loads(data)
            except ValueError:
                raise NonCompliantEndpoint(
                    f"{self.where}: HTTP {status} answer is not JSON: {_excerpt(data)[:80]!r}"
                ) from None
        assert failure is not None
        raise type(failure)(f"{failure} (gave up after {attempts} attempts)")
