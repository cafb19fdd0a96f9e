"""The ``llm`` behaviour source: a language model asked once per archetype cell, behaviour and
period, every answer cached on disk.

**What the model learns.** For each cell of the grid it is asked one question per behaviour
(:class:`~behaviour.prompts.PromptTemplates`), rendered from the cell's public attribute levels
and the period's public numbers (:class:`sim.archetypes.PublicNumbers`: opened aggregates and
public policy). It never sees an agent, an individual attribute or an individual outcome; the
whole grid is asked, empty cells included, so the questions do not even say which cells are
inhabited. Its answers become the period's row of the public behaviour table, from which each
agent (on its device, in a federation) draws its own decisions.

**Calls.** Identical prompts (cells whose questions read the same) are asked once. Each prompt
is first looked up in the :class:`~behaviour.cache.AnswerCache` under the hash of (model,
prompt, sampling parameters); only misses reach the backend, ``workers`` at a time. A rerun
with the same model, templates, sampling parameters and public numbers therefore makes no
backend call and returns the same probabilities bit for bit. On a failure the prompts not yet
asked are dropped; the answers already in are cached, so a rerun resumes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from behaviour.answers import CompletionClient, Sampling
from behaviour.cache import AnswerCache, answer_key
from behaviour.prompts import PromptTemplates
from sim.archetypes import ArchetypeGrid, PublicNumbers


class LLMSource:
    """A :class:`sim.archetypes.BehaviourSource` asking a language model (see the module doc)."""

    def __init__(
        self,
        client: CompletionClient,
        cache_dir: str | Path,
        *,
        templates: PromptTemplates | None = None,
        sampling: Sampling | None = None,
        workers: int = 8,
    ) -> None:
        """Ask ``client``, caching under ``cache_dir``.

        Args:
            client: the backend (:class:`~behaviour.openai_http.OpenAIClient`,
                :class:`~behaviour.local.LocalLlamaClient`).
            cache_dir: the answer cache's folder (created if needed).
            templates: the questions; the seed talk's by default.
            sampling: how the backend is asked; :class:`~behaviour.answers.Sampling`'s
                defaults by default.
            workers: prompts asked at once (at most the client's ``concurrency``).
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.client = client
        self.cache = AnswerCache(cache_dir)
        self.templates = templates or PromptTemplates()
        self.sampling = sampling or Sampling()
        self.workers = workers
        self.cache_hits = 0

    @property
    def source(self) -> str:
        """``llm:MODEL@ENDPOINT``: what a table filled by this source records as its source."""
        return f"llm:{self.client.model}@{self.client.where}"

    @property
    def calls(self) -> int:
        """Backend calls made so far (0 on a fully cached rerun)."""
        return self.client.calls

    def _ask(self, prompt: str, key: str) -> tuple[str, float]:
        answer = self.client.ask(prompt, self.sampling)
        self.cache.put(key, self.client.model, prompt, self.sampling, answer)
        return prompt, answer.p_yes

    def probabilities(self, grid: ArchetypeGrid, public: PublicNumbers) -> np.ndarray:
        """(cells, len(BEHAVIOURS)) p(Yes) for the period of ``public``.

        Raises:
            TemplateError: a template names a field the grid lacks (before any call).
            BackendError: the backend failed (the message names the endpoint).
            CacheError: a cache file is not the entry of its key.
        """
        prompts = self.templates.render_grid(grid, public)
        p_yes: dict[str, float] = {}
        todo: list[tuple[str, str]] = []
        for prompt in dict.fromkeys(p for row in prompts for p in row):
            key = answer_key(self.client.model, prompt, self.sampling)
            hit = self.cache.get(key, prompt)
            if hit is None:
                todo.append((prompt, key))
            else:
                p_yes[prompt] = hit.p_yes
        self.cache_hits += len(p_yes)
        if todo:
            pool = ThreadPoolExecutor(min(self.workers, self.client.concurrency, len(todo)))
            try:
                futures = [pool.submit(self._ask, prompt, key) for prompt, key in todo]
                for future in as_completed(futures):
                    prompt, p = future.result()
                    p_yes[prompt] = p
            finally:
                # After a failure, drop the prompts not yet asked (the answers in are cached).
                pool.shutdown(wait=True, cancel_futures=True)
        return np.array([[p_yes[p] for p in row] for row in prompts], dtype=np.float64)
