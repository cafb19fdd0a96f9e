"""``decentsim bench floor``: the mailbox protocol's own cost for one day, part by part.

What no implementation of a mailbox day can avoid, each part timed alone on this machine
(median of ``--repeats``), for ``--devices`` devices in ``--participants`` participants (pools)
posting ``--items-per-device`` items of ``--dim`` words and registering ``--beacons`` slots each:

- ``aes_ctr_expand_s``: A expands each participant's sealed seed into its share words;
- ``slot_sums_s``: one server's per-slot share sums (each server does it once);
- ``slot_lookup_s``: one server's lookup of every item's slot id in the registered slots;
- ``x25519_s``: sealing and opening one envelope per participant (A's seeds);
- ``loopback_s``: the day's device → server bytes through a loopback TCP socket.

``floor_per_day_s`` adds them up (sums and lookups twice, once per server); ``day_bytes`` is
the day's device → server traffic (registration and padded posts, as in
``docs/decentralized.md``). Compare with ``bench federated``'s seconds per day. One JSON line::

    {"devices", "participants", "items", "dim", "day_bytes", "aes_ctr_expand_s", "slot_sums_s",
     "slot_lookup_s", "x25519_s", "loopback_s", "floor_per_day_s"}
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from decentsim.usage import positive_int
from protocols.secure_sum.accumulator import group_sum
from protocols.secure_sum.envelope import KeyPair, open_envelope, seal
from protocols.secure_sum.sharing import SEED_BYTES, expand_seed_runs
from protocols.secure_sum.slots import SLOT_ID_BYTES, SlotTable


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bench floor`` (defaults: an Astoria day, ideal radio, 2 pools)."""
    p.add_argument("--devices", type=positive_int, default=37_518)
    p.add_argument("--participants", type=positive_int, default=38)
    p.add_argument("--items-per-device", type=positive_int, default=27)
    p.add_argument("--dim", type=positive_int, default=4, help="words per item")
    p.add_argument("--beacons", type=positive_int, default=4, help="slots per device a day")
    p.add_argument("--repeats", type=positive_int, default=5)


def _median(f: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def _loopback(payload: bytes) -> None:
    """Send ``payload`` through a fresh loopback TCP connection and wait until it arrived."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        received = [0]

        def drain() -> None:
            conn, _ = server.accept()
            with conn:
                while received[0] < len(payload):
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    received[0] += len(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        with socket.create_connection(server.getsockname()) as conn:
            conn.sendall(payload)
        reader.join()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time each part; see the module docstring."""
    n, parts, dim = args.devices, min(args.participants, args.devices), args.dim
    items, slots = n * args.items_per_device, n * args.beacons
    # benchmark data: uniform ids and words, as the protocol's pseudorandom slots and shares are
    gen = np.random.default_rng(1)
    seeds = [os.urandom(SEED_BYTES) for _ in range(parts)]
    runs = [len(r) * dim for r in np.array_split(np.arange(items), parts)]
    slot_of = gen.integers(0, slots, items)
    words = gen.integers(-(2**63), 2**63 - 1, (items, dim), dtype=np.int64)
    ids = np.frombuffer(os.urandom(SLOT_ID_BYTES * slots), np.uint8).reshape(-1, SLOT_ID_BYTES)
    table = SlotTable(ids.tobytes())
    queries = ids[slot_of]
    keys = KeyPair.generate()

    def envelopes() -> None:
        for s in seeds:
            open_envelope(keys, seal(keys.public, s + bytes(32), b"floor", b""), b"floor", b"")

    day_bytes = n * (args.beacons + args.items_per_device) * SLOT_ID_BYTES + items * 8 * dim
    payload = os.urandom(day_bytes)
    out = {
        "devices": n,
        "participants": parts,
        "items": items,
        "dim": dim,
        "day_bytes": day_bytes,
        "aes_ctr_expand_s": _median(lambda: expand_seed_runs(seeds, runs), args.repeats),
        "slot_sums_s": _median(lambda: group_sum(slot_of, words, slots), args.repeats),
        "slot_lookup_s": _median(lambda: table.find(queries), args.repeats),
        "x25519_s": _median(envelopes, args.repeats),
        "loopback_s": _median(lambda: _loopback(payload), args.repeats),
    }
    out["floor_per_day_s"] = round(
        out["aes_ctr_expand_s"]
        + 2 * out["slot_sums_s"]
        + 2 * out["slot_lookup_s"]
        + out["x25519_s"]
        + out["loopback_s"],
        4,
    )
    return out
