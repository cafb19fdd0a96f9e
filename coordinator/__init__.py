"""decentsim's server side: the coordinator and the aggregator, and ``decentralize``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # lazy: importing a coordinator module must not pull in the simulator's environment
    if name in ("decentralize", "Decentralized"):
        from coordinator import decentralized as module

        return getattr(module, name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
