"""From a chat completion to p(Yes): the sampling parameters, the answer record, and the part
every language-model client shares (:class:`CompletionClient`).

Both clients — the OpenAI-compatible HTTP client and the in-process local backend — speak the
same chat-completions format; they differ only in how a request body becomes a response
(:meth:`CompletionClient._complete`). What a backend is told is one user message: the prompt
(a cell's public attributes and the period's public numbers, see :mod:`behaviour.prompts`) and
the sampling parameters; what it answers is one word. The backend learns nothing else.

**p(Yes)**, per :attr:`Sampling.method`:

- ``logprobs``: one request (``max_tokens=1``, ``logprobs``, ``top_logprobs``); over the first
  token's top log-probabilities, ``P(yes) = Σ exp(lp)`` over the tokens that read *yes* (case,
  spaces and punctuation ignored: ``Yes``, `` yes``, ``YES.``), ``P(no)`` likewise, and
  ``p(Yes) = P(yes) / (P(yes) + P(no))`` — the model's choice between the two answers;
- ``samples``: ``K`` answers at the temperature (``n=K`` in one request; an endpoint that gives
  fewer choices is asked again for the rest, the seed, if any, advanced so each request is a new
  draw); an answer's first word decides it, and ``p(Yes) = yes / (yes + no)``, answers that are
  neither left out;
- ``auto`` (the default): ``logprobs`` where the endpoint offers them (its answer carries
  them), ``samples`` from then on where it does not.

An answer with no yes or no token at all is a :class:`~behaviour.errors.MalformedAnswer`.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from behaviour.errors import MalformedAnswer, NonCompliantEndpoint

Method = Literal["auto", "logprobs", "samples"]
_PUNCTUATION = ".,;:!?\"'()*`"


@dataclass(frozen=True)
class Sampling:
    """How a backend is asked; all of it is part of an answer's cache key.

    Attributes:
        method: ``auto``, ``logprobs`` or ``samples`` (see the module doc).
        temperature: sampling temperature (also sent with ``logprobs``, which some servers
            apply to the probabilities they report).
        samples: K, the answers drawn per prompt without log-probabilities.
        top_logprobs: how many top tokens' log-probabilities to ask for (1–20).
        max_tokens: the answer's length when sampling (its first word decides).
        seed: the backend's sampling seed, if it takes one; ``None`` sends none.
    """

    method: Method = "auto"
    temperature: float = 1.0
    samples: int = 10
    top_logprobs: int = 20
    max_tokens: int = 4
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("auto", "logprobs", "samples"):
            raise ValueError(f"method must be auto, logprobs or samples, got {self.method!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 1 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in 1..20, got {self.top_logprobs}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def to_json(self) -> dict[str, Any]:
        """The parameters as a JSON object (for the cache key and the cache entry)."""
        return {
            "method": self.method,
            "temperature": self.temperature,
            "samples": self.samples,
            "top_logprobs": self.top_logprobs,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Answer:
    """A backend's answer to one prompt.

    Attributes:
        p_yes: p(Yes) in [0, 1].
        method: how it was computed: ``logprobs`` or ``samples``.
        yes: the yes tokens' probability mass (``logprobs``) or the yes answers (``samples``).
        no: the same for no.
    """

    p_yes: float
    method: Literal["logprobs", "samples"]
    yes: float
    no: float

    def to_json(self) -> dict[str, Any]:
        """The answer as a JSON object (floats round-trip exactly through :mod:`json`)."""
        return {"p_yes": self.p_yes, "method": self.method, "yes": self.yes, "no": self.no}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Answer:
        """Inverse of :meth:`to_json`; raises ``KeyError``/``TypeError``/``ValueError``."""
        method = raw["method"]
        if method not in ("logprobs", "samples"):
            raise ValueError(f"unknown method {method!r}")
        p = float(raw["p_yes"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p_yes {p} is outside [0, 1]")
        return cls(p, method, float(raw["yes"]), float(raw["no"]))


def yes_no(text: str) -> bool | None:
    """True for a *yes*, False for a *no*, None otherwise: by the text's first word."""
    words = text.strip().split(maxsplit=1)
    word = words[0].strip(_PUNCTUATION).lower() if words else ""
    return {"yes": True, "no": False}.get(word)


@dataclass(frozen=True)
class Choice:
    """One choice of a chat completion: its text, and its first token's top log-probabilities
    (token → log-probability; ``None`` where the answer carries none)."""

    text: str
    top_logprobs: dict[str, float] | None


def _top_logprobs(raw: Any, where: str, index: int) -> dict[str, float] | None:
    if raw is None:
        return None
    content = raw.get("content") if isinstance(raw, dict) else None
    if content is None:
        return None
    first = content[0] if isinstance(content, list) and content else None
    entries = first.get("top_logprobs") if isinstance(first, dict) else None
    if not isinstance(entries, list):
        raise MalformedAnswer(
            f"{where}: choice {index}: 'logprobs' has no first token with 'top_logprobs'"
        )
    # The chosen token counts too: at a temperature it need not be among the top ones.
    out: dict[str, float] = {}
    for entry in [first, *entries]:
        token = entry.get("token") if isinstance(entry, dict) else None
        lp = entry.get("logprob") if isinstance(entry, dict) else None
        if (
            not isinstance(token, str)
            or isinstance(lp, bool)
            or not isinstance(lp, (int, float))
            or math.isnan(lp)
            or lp > 0
        ):
            raise MalformedAnswer(
                f"{where}: choice {index}: log-probability entry {entry!r} is not "
                "{token: str, logprob: number <= 0}"
            )
        out[token] = float(lp)
    return out


def parse_choices(raw: Any, where: str) -> list[Choice]:
    """The choices of a chat completion (the parsed JSON of its response).

    Raises:
        NonCompliantEndpoint: not a chat completion at all (no ``choices`` list).
        MalformedAnswer: a choice without message content, or with malformed log-probabilities.
    """
    choices = raw.get("choices") if isinstance(raw, dict) else None
    if not isinstance(choices, list) or not choices:
        raise NonCompliantEndpoint(
            f"{where}: the answer is not an OpenAI chat completion (no 'choices'): {raw!r:.200}"
        )
    out = []
    for index, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise MalformedAnswer(
                f"{where}: choice {index} has no message content: {choice!r:.200}"
            )
        out.append(Choice(text, _top_logprobs(choice.get("logprobs"), where, index)))
    return out


def from_logprobs(top: dict[str, float], where: str) -> Answer:
    """p(Yes) from a first token's top log-probabilities (see the module doc)."""
    yes = sum(math.exp(lp) for token, lp in top.items() if yes_no(token) is True)
    no = sum(math.exp(lp) for token, lp in top.items() if yes_no(token) is False)
    if yes + no <= 0:
        raise MalformedAnswer(
            f"{where}: no Yes or No among the answer's top tokens {sorted(top)[:10]}"
        )
    return Answer(yes / (yes + no), "logprobs", yes, no)


def from_samples(texts: list[str], where: str) -> Answer:
    """p(Yes) from K sampled answers (see the module doc)."""
    votes = [yes_no(t) for t in texts]
    yes, no = votes.count(True), votes.count(False)
    if yes + no == 0:
        raise MalformedAnswer(
            f"{where}: none of {len(texts)} answers is Yes or No (first: {texts[0][:60]!r})"
        )
    return Answer(yes / (yes + no), "samples", float(yes), float(no))


class CompletionClient(ABC):
    """A language-model client: asks for p(Yes) to a prompt; counts its backend calls.

    Subclasses turn a chat-completions request body into the response's parsed JSON
    (:meth:`_complete`), calling :meth:`_count` once per backend call.

    Attributes:
        model: the model's name (part of every cache key).
        where: the endpoint (URL or model file), named in every error.
        concurrency: how many :meth:`ask` calls may run at once.
    """

    model: str
    where: str
    concurrency: int

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        # Whether the backend's answers carry log-probabilities; None until one answer says.
        self._offers_logprobs: bool | None = None

    @property
    def calls(self) -> int:
        """Backend calls made so far (every request sent, retries included)."""
        with self._lock:
            return self._calls

    def _count(self) -> None:
        with self._lock:
            self._calls += 1

    @abstractmethod
    def _complete(self, body: dict[str, Any]) -> Any:
        """The parsed JSON answer to a chat-completions request body."""

    def ask(self, prompt: str, sampling: Sampling) -> Answer:
        """p(Yes) to ``prompt`` by ``sampling.method`` (see the module doc)."""
        base: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": sampling.temperature,
        }
        if sampling.method == "logprobs" or (
            sampling.method == "auto" and self._offers_logprobs is not False
        ):
            body = {
                **base,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": sampling.top_logprobs,
            }
            if sampling.seed is not None:
                body["seed"] = sampling.seed
            top = parse_choices(self._complete(body), self.where)[0].top_logprobs
            if top is not None:
                self._offers_logprobs = True
                return from_logprobs(top, self.where)
            if sampling.method == "logprobs":
                raise MalformedAnswer(
                    f"{self.where}: the answer carries no log-probabilities (method "
                    "'logprobs'; use 'auto' or 'samples' for this endpoint)"
                )
            self._offers_logprobs = False
        texts: list[str] = []
        while len(texts) < sampling.samples:
            need = sampling.samples - len(texts)
            body = {**base, "max_tokens": sampling.max_tokens, "n": need}
            if sampling.seed is not None:
                body["seed"] = sampling.seed + len(texts)
            texts.extend(c.text for c in parse_choices(self._complete(body), self.where)[:need])
        return from_samples(texts, self.where)
