"""decentsim: the ``decentsim`` command (:mod:`decentsim.cli`) and the Python API's entry point
to a decentralized run::

    from decentsim import decentralize
    real_sim = decentralize(simulation, protocol="ble_contact_tracing")
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy on purpose: `decentsim device-agent` imports this package on a pilot device, which
    # must not load the launcher (and through it the servers' code).
    if name in ("decentralize", "Decentralized"):
        from launcher import decentralized

        return getattr(decentralized, name)
    raise AttributeError(f"module 'decentsim' has no attribute {name!r}")
