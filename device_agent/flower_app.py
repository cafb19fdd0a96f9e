"""The device pool as the ClientApp of a Flower deployment (``flower-supernode`` processes).

Every setting comes from the SuperNode's ``--node-config`` (``state-dir``, ``population``,
``population-seed``, ``slice``, ``world-secret``: see :mod:`device_agent.flower_client`).
Loaded by Flower's own ``flwr-clientapp`` process; it imports no server code.
"""

from __future__ import annotations

from device_agent.flower_client import make_client_app

#: a device pool; every setting comes from its SuperNode's ``--node-config``
client_app = make_client_app()
