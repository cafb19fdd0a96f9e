"""An in-process local backend: a GGUF model run by llama.cpp through ``llama-cpp-python``
(the optional extra ``decentsim[llm-local]``). No server, no network: the model file is read
from disk, nothing is downloaded.

It answers the same chat-completions requests as the HTTP client (``llama-cpp-python`` returns
the OpenAI format), so p(Yes) is computed the same way (:mod:`behaviour.answers`); it always
offers log-probabilities. Like the HTTP backend it is told only a prompt of public cell
attributes and public numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from behaviour.answers import CompletionClient
from behaviour.errors import BackendError


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LocalLlamaClient(CompletionClient):
    """Chat completions from a GGUF model file, in this process (one request at a time)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 1024,
        n_threads: int | None = None,
        seed: int = 0,
    ) -> None:
        """Load ``model_path`` (GGUF).

        The model's name — part of every cache key — is the file's name and the first 12 hex
        digits of its SHA-256, so another file under the same name is another model.

        Raises:
            BackendError: ``llama-cpp-python`` is not installed, or the file is missing or
                not a model llama.cpp can load.
        """
        super().__init__()
        path = Path(model_path)
        self.where = str(path)
        self.concurrency = 1
        try:
            # The optional extra: imported only when this backend is used.
            import llama_cpp
        except ImportError:
            raise BackendError(
                f"{path}: the local backend needs llama-cpp-python "
                "(pip install 'decentsim[llm-local]')"
            ) from None
        if not path.is_file():
            raise BackendError(f"{path}: no such model file")
        self.model = f"{path.name}@{_digest(path)[:12]}"
        try:
            # logits_all: llama-cpp-python reports log-probabilities only with every logit kept.
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                seed=seed,
                logits_all=True,
                verbose=False,
            )
        except ValueError as e:
            raise BackendError(f"{path}: llama.cpp cannot load it ({e})") from None

    def _complete(self, body: dict[str, Any]) -> Any:
        # llama-cpp-python has no ``n``: draw the choices one by one, each its own call.
        choices = []
        for i in range(int(body.get("n", 1))):
            self._count()
            seed = body.get("seed")
            out = self._llm.create_chat_completion(
                messages=body["messages"],
                max_tokens=body["max_tokens"],
                temperature=body["temperature"],
                logprobs=body.get("logprobs", False),
                top_logprobs=body.get("top_logprobs"),
                seed=None if seed is None else seed + i,
            )
            choices.extend(out["choices"])
        # llama-cpp-python's numbers are numpy floats: parse exactly what a server would send.
        return json.loads(json.dumps({"choices": choices}, default=float))
