"""The answer cache: every backend answer on disk, so a rerun is reproducible and calls nothing.

**Key**: the SHA-256 of the canonical JSON (sorted keys, no spaces) of
``{"model": MODEL, "prompt": PROMPT, "sampling": Sampling.to_json()}``; any change to the
model's name, the prompt or a sampling parameter is another key.

**Format**: one small JSON file per key, ``DIR/<key[:2]>/<key>.json``, holding
``{"version": 1, "key", "model", "prompt", "sampling", "answer": Answer.to_json()}``, written
atomically (a temporary file in the same folder, flushed and fsynced, then renamed over), so a
crash leaves either the whole entry or none. An entry holds a prompt — a cell's public
attributes and public numbers only (:mod:`behaviour.prompts`) — and the model's answer to it:
nothing individual, which an audit can check by reading the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from behaviour.answers import Answer, Sampling

FORMAT_VERSION = 1


class CacheError(RuntimeError):
    """A cache entry is unreadable or is not the entry of its key; the message names the file."""


def answer_key(model: str, prompt: str, sampling: Sampling) -> str:
    """The cache key of (model, prompt, sampling parameters): a SHA-256, hex."""
    text = json.dumps(
        {"model": model, "prompt": prompt, "sampling": sampling.to_json()},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


class AnswerCache:
    """Answers on disk, one JSON file per key (see the module doc); safe across threads and
    processes (writes are atomic renames of whole files)."""

    def __init__(self, directory: str | Path) -> None:
        """Use (and create) ``directory``."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of ``key``."""
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str, prompt: str) -> Answer | None:
        """The answer stored under ``key`` (asked with ``prompt``), or None if there is none.

        Raises:
            CacheError: the file is not a cache entry, or holds another key or prompt.
        """
        path = self.path(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheError(f"{path}: cannot read ({e.strerror})") from None
        try:
            raw = json.loads(text)
            if raw["version"] != FORMAT_VERSION:
                raise ValueError(f"format version {raw['version']}, not {FORMAT_VERSION}")
            answer = Answer.from_json(raw["answer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{path}: not a cache entry ({type(e).__name__}: {e})") from None
        # A file renamed, copied or edited by hand must not answer for another prompt.
        if raw.get("key") != key or raw.get("prompt") != prompt:
            raise CacheError(f"{path}: the entry is not the one of key {key}")
        return answer

    def put(self, key: str, model: str, prompt: str, sampling: Sampling, answer: Answer) -> None:
        """Store ``answer`` under ``key``, atomically."""
        entry: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "key": key,
            "model": model,
            "prompt": prompt,
            "sampling": sampling.to_json(),
            "answer": answer.to_json(),
        }
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            # Gone after a successful rename; left behind only by a failed write.
            Path(tmp).unlink(missing_ok=True)
