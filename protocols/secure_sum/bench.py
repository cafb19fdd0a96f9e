"""``decentsim bench securesum``: end-to-end throughput of two-server slot sums.

Simulates ``--devices`` devices in this process, each posting ``--items-per-device`` vectors of
``--dim`` values to random registered pseudonym slots. Timed: every device building its post
(encode, PRG sharing, sealing), C validating and accumulating it, the relay to A, A opening and
accumulating, (shuffled) both shuffles and the return trip, and the surviving-set agreement
that releases the per-slot sums at both servers. Registration is set-up and not timed. The
result is checked exactly against the plaintext ring sums before it is reported.
``plaintext_seconds`` times the same per-slot sum done centrally in the clear (one group-sum).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from .accumulator import group_sum
from .config import Mode, PhaseSpec, RoundSpec, SlotKind
from .protocol import InMemoryNetwork, InsecurePlaintextWarning

PHASE = "messages"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--devices", type=int, default=10_000, help="simulated devices")
    parser.add_argument("--dim", type=int, default=16, help="values per contributed vector")
    parser.add_argument(
        "--mode", choices=[m.value for m in Mode], default=Mode.MAILBOX.value, help="posting mode"
    )
    parser.add_argument(
        "--items-per-device", type=int, default=32, help="items each device posts (padded count)"
    )
    parser.add_argument("--round", type=int, default=1, help="round id")


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark; returns the JSON-able result line."""
    mode = Mode(args.mode)
    n, d, k = args.devices, args.dim, args.items_per_device
    with warnings.catch_warnings():
        # the plaintext baseline is requested explicitly here; one warning on stderr suffices
        warnings.simplefilter("once", InsecurePlaintextWarning)
        net = InMemoryNetwork(mode)
        spec = RoundSpec(args.round, (PhaseSpec(PHASE, d, SlotKind.PSEUDONYM, k),))
        net.open_round(spec)
        devices = [net.device() for _ in range(n)]
    slots = [dev.register(spec.round_id, [os.urandom(16)])[0] for dev in devices]
    net.coordinator.close_registration(spec.round_id)
    for dev in devices:
        dev.directory(spec.round_id)  # fetched once per device at the start of posting
    # benchmark data, not secrets: a seeded numpy generator keeps runs comparable
    gen = np.random.default_rng(args.round)
    values = gen.uniform(-1.0, 1.0, size=(n, k, d))
    targets = gen.integers(0, n, size=(n, k))

    device_s = server_s = 0.0
    total_bytes = 0
    coordinator = net.coordinator
    t_start = time.perf_counter()
    for i, dev in enumerate(devices):
        t0 = time.perf_counter()
        raw = dev.build_post(spec, PHASE, [slots[j] for j in targets[i].tolist()], values[i])
        t1 = time.perf_counter()
        coordinator.handle_device(raw, dev.device_id)
        server_s += time.perf_counter() - t1
        device_s += t1 - t0
        total_bytes += len(raw)
    t0 = time.perf_counter()
    report = coordinator.close_phase(spec.round_id, PHASE)
    server_s += time.perf_counter() - t0
    seconds = time.perf_counter() - t_start

    # plaintext control: the same per-slot sums computed centrally in the clear
    codec = net.deployment.codec
    encoded = codec.encode(values.reshape(-1, d))
    t0 = time.perf_counter()
    truth, _ = group_sum(targets.reshape(-1).astype(np.int64), encoded, n)
    plaintext_seconds = time.perf_counter() - t0

    c_sums, _ = net.coordinator.rounds[spec.round_id].accumulators[PHASE].sums()
    a_sums, _ = net.aggregator.rounds[spec.round_id].accumulators[PHASE].sums()
    exact = bool(np.array_equal(c_sums + a_sums, truth))
    if not exact or report.surviving != report.accepted_by_coordinator:
        raise RuntimeError("benchmark sums do not match the plaintext sums")
    items = n * k
    # public-key envelopes sealed and opened per post: one per device (mailbox A-part), or an
    # outer envelope per device plus two inner envelopes per item (shuffled); none in plaintext
    sealed = {Mode.MAILBOX: n, Mode.SHUFFLED: n + 2 * items, Mode.PLAINTEXT: 0}[mode]
    return {
        "devices": n,
        "dim": d,
        "mode": mode.value,
        "items": items,
        "seconds": round(seconds, 4),
        "contributions_per_s": round(items / seconds, 1),
        "bytes_per_device": round(total_bytes / n, 1),
        "plaintext_seconds": round(plaintext_seconds, 6),
        "device_seconds": round(device_s, 4),
        "server_seconds": round(server_s, 4),
        "sealed_envelopes": sealed,
        "sealed_envelopes_per_s": round(sealed / seconds, 1),
        "exact": exact,
    }
