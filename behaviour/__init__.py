"""Behaviour backends: what fills a period's row of the public behaviour table.

Each backend is a :class:`sim.archetypes.BehaviourSource` —
``probabilities(grid, public) -> (cells, len(BEHAVIOURS))`` in [0, 1] — and sees only public
things: the grid's cells (public attribute levels, empty cells included) and the period's
public numbers (opened aggregates, public policy). No backend sees an agent.

- :class:`TableSource` (``table``): a user's CSV/JSON table.
- :class:`LLMSource` (``llm``): a language model asked the seed talk's questions per cell,
  through :class:`OpenAIClient` (any OpenAI-compatible HTTP server) or
  :class:`LocalLlamaClient` (llama.cpp in process, the ``llm-local`` extra), every answer
  cached on disk (:class:`AnswerCache`).

This package builds on :mod:`sim` only; nothing in :mod:`sim` imports it.
"""

from behaviour.answers import Answer, CompletionClient, Sampling
from behaviour.cache import AnswerCache, CacheError, answer_key
from behaviour.errors import (
    BackendError,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    MalformedAnswer,
    NonCompliantEndpoint,
    TemplateError,
)
from behaviour.llm import LLMSource
from behaviour.local import LocalLlamaClient
from behaviour.openai_http import OpenAIClient
from behaviour.prompts import ISOLATE_TEMPLATE, WORK_TEMPLATE, PromptTemplates
from behaviour.table import TableSource

__all__ = [
    "ISOLATE_TEMPLATE",
    "WORK_TEMPLATE",
    "Answer",
    "AnswerCache",
    "BackendError",
    "BackendHTTPError",
    "BackendTimeout",
    "BackendUnreachable",
    "CacheError",
    "CompletionClient",
    "LLMSource",
    "LocalLlamaClient",
    "MalformedAnswer",
    "NonCompliantEndpoint",
    "OpenAIClient",
    "PromptTemplates",
    "Sampling",
    "TableSource",
    "TemplateError",
    "answer_key",
]
