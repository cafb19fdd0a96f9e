"""The OpenAI-compatible HTTP client against a real server process on loopback — the rule
backend of ``rule_server.py`` (a deterministic rule, not a language model): log-probabilities,
the K-samples fallback, retries, and a one-line typed error naming the URL for each failure."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from behaviour import (
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    MalformedAnswer,
    NonCompliantEndpoint,
    OpenAIClient,
    Sampling,
)

PROMPT = "You are a person aged 30 to 39. Do you choose to isolate at home? Answer Yes or No."


def _client(base_url: str, model: str = "rule", **kwargs: object) -> OpenAIClient:
    kwargs = {"timeout": 5.0, "retries": 2, "backoff": 0.01, **kwargs}
    return OpenAIClient(base_url, model, **kwargs)  # type: ignore[arg-type]


def _one_line_naming(error: BaseException, url: str) -> str:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(url), message
    return message


def test_p_yes_from_logprobs(rule_backend) -> None:
    before = rule_backend.requests()
    with _client(rule_backend.base_url) as client:
        answer = client.ask(PROMPT, Sampling())
    assert answer.method == "logprobs"
    # The rule puts 0.8 p on Yes/" yes" and 0.8 (1 - p) on No: p comes back exactly.
    assert math.isclose(answer.p_yes, rule_backend.rule_p(PROMPT), rel_tol=1e-12)
    assert math.isclose(answer.yes + answer.no, 0.8, rel_tol=1e-12)
    assert client.calls == 1 == rule_backend.requests() - before
    body = rule_backend.stats()["bodies"][-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1


def test_k_samples_where_the_endpoint_offers_no_logprobs(rule_backend) -> None:
    p = rule_backend.rule_p(PROMPT)
    with _client(rule_backend.base_url, "rule-nologprobs") as client:
        first = client.ask(PROMPT, Sampling(samples=20))
        assert client.calls == 2  # the logprobs probe, then one request for n=20
        second = client.ask(PROMPT + " ", Sampling(samples=20))
        assert client.calls == 3  # the endpoint is known to offer none: no probe again
    assert first.method == second.method == "samples"
    assert first.p_yes == round(p * 20) / 20
    assert first.yes + first.no == 20
    body = rule_backend.stats()["bodies"][-1]
    assert body["n"] == 20 and "logprobs" not in body


def test_k_samples_from_an_endpoint_that_answers_one_at_a_time(rule_backend) -> None:
    p = rule_backend.rule_p(PROMPT)
    before = rule_backend.requests()
    with _client(rule_backend.base_url, "rule-n1") as client:
        answer = client.ask(PROMPT, Sampling(method="samples", samples=8, seed=5))
    assert answer.p_yes == round(p * 8) / 8
    assert client.calls == 8 == rule_backend.requests() - before
    bodies = rule_backend.stats()["bodies"][-8:]
    # Each request asks for what is still missing, with a new seed.
    assert [b["n"] for b in bodies] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert [b["seed"] for b in bodies] == list(range(5, 13))


def test_method_logprobs_on_an_endpoint_without_them(rule_backend) -> None:
    client = _client(rule_backend.base_url, "rule-nologprobs")
    client.ask(PROMPT, Sampling())  # `auto` finds out that the endpoint offers none …
    with pytest.raises(MalformedAnswer) as e:  # … and `logprobs` insists on them
        client.ask(PROMPT, Sampling(method="logprobs"))
    assert "carries no log-probabilities" in _one_line_naming(e.value, client.where)


def test_a_malformed_answer(rule_backend) -> None:
    client = _client(rule_backend.base_url, "rule-malformed")
    with pytest.raises(MalformedAnswer) as e:
        client.ask(PROMPT, Sampling())
    assert "choice 0 has no message content" in _one_line_naming(e.value, client.where)
    assert client.calls == 1  # not retried: the endpoint answered, wrongly


def test_an_answer_that_is_neither_yes_nor_no(rule_backend) -> None:
    client = _client(rule_backend.base_url, "rule-maybe")
    with pytest.raises(MalformedAnswer) as e:
        client.ask(PROMPT, Sampling(samples=3))
    assert "none of 3 answers is Yes or No (first: 'Maybe.')" in _one_line_naming(
        e.value, client.where
    )


def test_http_500_is_retried_then_a_clear_error(rule_backend) -> None:
    before = rule_backend.requests()
    client = _client(rule_backend.base_url, "rule-500", retries=2)
    with pytest.raises(BackendHTTPError) as e:
        client.ask(PROMPT, Sampling())
    message = _one_line_naming(e.value, client.where)
    assert "HTTP 500" in message and "planted failure" in message
    assert message.endswith("(gave up after 3 attempts)")
    assert client.calls == 3 == rule_backend.requests() - before


def test_a_transient_500_succeeds_on_retry(rule_backend) -> None:
    client = _client(rule_backend.base_url, "rule-flaky", backoff=0.05)
    start = time.perf_counter()
    answer = client.ask(PROMPT, Sampling())
    assert time.perf_counter() - start >= 0.05  # the documented backoff before retry 1
    assert math.isclose(answer.p_yes, rule_backend.rule_p(PROMPT), rel_tol=1e-12)
    assert client.calls == 2


def test_a_dropped_keep_alive_connection_is_reopened_not_retried(rule_backend) -> None:
    before = rule_backend.requests()
    with _client(rule_backend.base_url, "rule-drop", retries=0) as client:
        first = client.ask(PROMPT, Sampling())
        # The pooled connection was closed by the server: resent once on a fresh one.
        second = client.ask(PROMPT, Sampling())
    assert first == second
    assert rule_backend.requests() - before == 2
    assert client.calls == 3  # the send that found the connection closed counts too


def test_a_timeout(rule_backend) -> None:
    client = _client(rule_backend.base_url, "rule-slow", timeout=0.2, retries=1)
    start = time.perf_counter()
    with pytest.raises(BackendTimeout) as e:
        client.ask(PROMPT, Sampling())
    assert time.perf_counter() - start < 1.5  # two tries of 0.2 s, not the server's 2 s
    message = _one_line_naming(e.value, client.where)
    assert "no answer within 0.2 s (gave up after 2 attempts)" in message
    assert client.calls == 2


def test_an_answer_that_is_not_json(rule_backend) -> None:
    client = _client(rule_backend.base_url, "rule-html")
    with pytest.raises(NonCompliantEndpoint) as e:
        client.ask(PROMPT, Sampling())
    assert "answer is not JSON" in _one_line_naming(e.value, client.where)
    assert client.calls == 1


def test_no_chat_completions_at_the_url(rule_backend) -> None:
    client = _client(rule_backend.base_url.removesuffix("/v1"))
    with pytest.raises(NonCompliantEndpoint) as e:
        client.ask(PROMPT, Sampling())
    assert client.where == rule_backend.base_url.removesuffix("/v1") + "/chat/completions"
    message = _one_line_naming(e.value, client.where)
    assert "HTTP 404: no OpenAI-compatible chat-completions endpoint" in message
    assert client.calls == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_endpoint() -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    client = _client(url, retries=2)
    with pytest.raises(BackendUnreachable) as e:
        client.ask(PROMPT, Sampling())
    message = _one_line_naming(e.value, f"{url}/chat/completions")
    assert "connection failed (Connection refused) (gave up after 3 attempts)" in message
    assert client.calls == 3


@pytest.fixture
def not_http() -> Iterator[str]:
    """A loopback TCP server that answers like an SSH server, not HTTP."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(10)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    thread.join(timeout=10)
    server.close()


def test_a_server_that_does_not_speak_http(not_http: str) -> None:
    client = _client(not_http)
    with pytest.raises(NonCompliantEndpoint) as e:
        client.ask(PROMPT, Sampling())
    assert "answer is not HTTP (BadStatusLine" in _one_line_naming(e.value, client.where)


def test_the_api_key_comes_from_the_environment(
    rule_backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DECENTSIM_TEST_KEY", "sk-test")
    _client(rule_backend.base_url, api_key_env="DECENTSIM_TEST_KEY").ask(PROMPT, Sampling())
    assert rule_backend.stats()["authorization"][-1] == "Bearer sk-test"
    monkeypatch.delenv("DECENTSIM_TEST_KEY")
    _client(rule_backend.base_url, api_key_env="DECENTSIM_TEST_KEY").ask(PROMPT, Sampling())
    assert rule_backend.stats()["authorization"][-1] is None


@pytest.mark.parametrize("url", ["127.0.0.1:8080/v1", "ftp://host/v1", "http:///v1"])
def test_a_bad_base_url(url: str) -> None:
    with pytest.raises(ValueError, match="base URL must be http"):
        OpenAIClient(url, "m")
