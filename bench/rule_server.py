"""A rule backend for the tests and benchmarks: a standard-library HTTP server speaking the
OpenAI-compatible chat-completions API on loopback. It is *not* a language model: it answers by
a fixed, deterministic rule from the prompt, so the tests know exactly what p(Yes) must come
out, and a benchmark counts backend calls without a model's cost.

The rule: ``p = rule_p(prompt)`` (a hash of the prompt, in (0, 1)). With ``logprobs`` the first
token's ``top_logprobs`` carry ``Yes``/`` yes`` (together ``0.8 p``), ``No`` (``0.8 (1 - p)``)
and `` Maybe`` (``0.2``), so p(Yes) is recovered as ``P(yes) / (P(yes) + P(no))``. Without
them it returns ``n`` choices, the first ``round(p n)`` saying yes.

The request's ``model`` selects a behaviour, so one server serves every test:

- ``rule``: as above; ``rule-nologprobs``: ignores ``logprobs`` (an endpoint without them);
- ``rule-n1``: one choice per request whatever ``n`` (the k-th request for a prompt is sample
  k of K, the first request's ``n``: yes for the first ``round(p K)``);
- ``rule-500``: always HTTP 500; ``rule-flaky``: HTTP 500 on a prompt's first request only;
- ``rule-slow``: sleeps 2 s before answering; ``rule-pause``: sleeps 0.25 s, then as ``rule``;
- ``rule-drop``: as ``rule``, then closes the connection without saying so (a server dropping
  an idle kept-alive connection); ``rule-malformed``: a choice without a message;
- ``rule-html``: a 200 answer that is not JSON; ``rule-maybe``: answers neither Yes nor No.

Any path other than ``/v1/chat/completions`` is a 404. ``GET /stats`` (test-only) returns
``{"requests": N, "bodies": [...], "authorization": [...]}``: every chat request received (its
body and its ``Authorization`` header, or null), for the tests to count backend calls and read
what was sent.

Run: ``python -m bench.rule_server`` prints ``PORT <n>`` (a free loopback port) and serves until
killed.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_lock = threading.Lock()
_bodies: list[dict[str, Any]] = []
_authorization: list[str | None] = []
_seen: Counter[tuple[str, str]] = Counter()


def rule_p(prompt: str) -> float:
    """The rule's p(Yes) for a prompt: its SHA-256, mapped into (0, 1)."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return (digest % 998 + 1) / 1000


def _logprobs(p: float) -> dict[str, Any]:
    top = [
        {"token": "Yes", "logprob": math.log(0.8 * p * 0.75)},
        {"token": " yes", "logprob": math.log(0.8 * p * 0.25)},
        {"token": "No", "logprob": math.log(0.8 * (1 - p))},
        {"token": " Maybe", "logprob": math.log(0.2)},
    ]
    first = max(top, key=lambda t: t["logprob"])
    return {"content": [{**first, "top_logprobs": top}]}


def _choice(index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": "stop",
    }


def answer(body: dict[str, Any], seen: int) -> tuple[int, bytes]:
    """(status, payload) for a chat request; ``seen``: earlier requests with this prompt."""
    model = body.get("model", "")
    prompt = body["messages"][-1]["content"]
    p = rule_p(prompt)
    n = int(body.get("n", 1))
    if model == "rule-drop":
        model = "rule"
    if model == "rule-500" or (model == "rule-flaky" and seen == 0):
        return 500, b'{"error": "rule backend: planted failure"}'
    if model in ("rule-slow", "rule-pause"):
        time.sleep(2.0 if model == "rule-slow" else 0.25)
    if model == "rule-html":
        return 200, b"<html><body>not an API</body></html>"
    if model == "rule-malformed":
        return 200, json.dumps({"object": "chat.completion", "choices": [{"index": 0}]}).encode()
    if model == "rule-maybe":
        choices = [_choice(i, "Maybe.", None) for i in range(n)]
    elif body.get("logprobs") and model != "rule-nologprobs":
        choices = [_choice(0, "Yes" if p >= 0.5 else "No", _logprobs(p))]
    elif model == "rule-n1":
        # The client asks for the n answers still missing: seen + n is the K of the first ask.
        yes = seen < round(p * (seen + n))
        choices = [_choice(0, "Yes." if yes else "no", None)]
    else:
        yes = round(p * n)
        choices = [_choice(i, "Yes." if i < yes else "No, I would not.", None) for i in range(n)]
    out = {"id": "rule", "object": "chat.completion", "model": model, "choices": choices}
    return 200, json.dumps(out).encode()


class Handler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1, as the real servers speak it."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        if self.path != "/stats":
            self._send(404, b'{"error": "not found"}')
            return
        with _lock:
            stats = {"requests": len(_bodies), "bodies": _bodies, "authorization": _authorization}
            payload = json.dumps(stats).encode()
        self._send(200, payload)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": "not found"}')
            return
        body = json.loads(raw)
        key = (body.get("model", ""), body["messages"][-1]["content"])
        with _lock:
            _bodies.append(body)
            _authorization.append(self.headers.get("Authorization"))
            seen = _seen[key]
            _seen[key] += 1
        self._send(*answer(body, seen))
        if key[0] == "rule-drop":
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read /stats, not a log."""


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
