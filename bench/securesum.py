"""``decentsim bench securesum``: end-to-end throughput of two-server slot sums.

Simulates ``--devices`` devices in this process, each posting ``--items-per-device`` vectors of
``--dim`` values to random registered pseudonym slots (one slot per device). With
``--devices-per-participant m`` the devices are grouped into pools of ``m`` that act as one
participant: one registration, one post of ``m × items_per_device`` items and one sealed
A-part per pool; ``--deterministic`` gives each participant a secret from which its random
choices are derived (the crash-safe client). Timed: every participant building its post
(encode, PRG sharing, sealing), C validating and accumulating it, the relay to A, A opening
and accumulating, (shuffled) both shuffles and the return trip, and the surviving-set
agreement that releases the per-slot sums at both servers. Registration is set-up and not
timed. The result is checked exactly against the plaintext ring sums before it is reported.
``plaintext_seconds`` times the same per-slot sums done centrally in the clear (added up post by
post, not counted in ``seconds``). Only one participant's client exists at a time (as on a
phone), so a million devices fit in memory: the servers' state is what grows.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from decentsim.usage import CommandFailed, UsageError, int_in, positive_int
from protocols.secure_sum.config import Mode, PhaseSpec, RoundSpec, SlotKind
from protocols.secure_sum.protocol import DeviceClient, InMemoryNetwork, InsecurePlaintextWarning
from protocols.secure_sum.slots import SLOT_ID_BYTES

PHASE = "messages"
#: most ring words a dense-mode run may post in all (participants × slots × dim): 2.4 GB at
#: each server
DENSE_WORDS = 300_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--devices", type=positive_int, default=10_000, help="simulated devices")
    parser.add_argument(
        "--dim", type=positive_int, default=16, help="values per contributed vector"
    )
    parser.add_argument(
        "--mode", choices=[m.value for m in Mode], default=Mode.MAILBOX.value, help="posting mode"
    )
    parser.add_argument(
        "--items-per-device",
        type=positive_int,
        default=32,
        help="items each device posts (padded count)",
    )
    parser.add_argument(
        "--devices-per-participant",
        type=positive_int,
        default=1,
        help="devices per participant (a pool posting as one; must divide --devices)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="participants hold a secret and derive every random choice from it (crash-safe)",
    )
    parser.add_argument(
        "--round", type=int_in(0, 2**64 - 1), default=1, help="round id (64 unsigned bits)"
    )


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark; returns the JSON-able result line."""
    mode = Mode(args.mode)
    n, d, k, m = args.devices, args.dim, args.items_per_device, args.devices_per_participant
    if n % m:
        raise UsageError(f"--devices-per-participant {m} must divide --devices {n}")
    n_part = n // m
    if mode is Mode.DENSE and n_part * n * d > DENSE_WORDS:
        # every participant posts a share of every slot (one per device): the work is
        # participants × slots × dim words, quadratic in devices at a fixed pool size
        raise UsageError(
            f"dense mode posts {n_part} participants × {n} slots × dim {d} = {n_part * n * d:,} "
            f"words, more than this bench's {DENSE_WORDS:,}: raise --devices-per-participant"
        )
    with warnings.catch_warnings():
        # the plaintext baseline is requested explicitly here; one warning on stderr suffices
        warnings.simplefilter("once", InsecurePlaintextWarning)
        net = InMemoryNetwork(mode)
        spec = RoundSpec(args.round, (PhaseSpec(PHASE, d, SlotKind.PSEUDONYM, k),))
        net.open_round(spec)
        # a participant's id and secret; its client object lives only while it acts, as a
        # phone's process would (10⁶ clients at once would not fit in memory)
        ids = [os.urandom(16) for _ in range(n_part)]
        secrets = [os.urandom(32) if args.deterministic else None for _ in range(n_part)]

        def client(i: int) -> DeviceClient:
            return net.device(ids[i], devices=m, secret=secrets[i])

        # one beacon (slot) per device; a participant registers its devices' slots together
        slots = b"".join(
            client(i).register_ids(spec.round_id, os.urandom(16 * m)) for i in range(n_part)
        )
    net.coordinator.close_registration(spec.round_id)
    slot_ids = np.frombuffer(slots, np.uint8).reshape(-1, SLOT_ID_BYTES)
    client(0).directory(spec.round_id)  # public; shared by this process's clients
    codec = net.deployment.codec
    truth = np.zeros((n, d), dtype=np.int64)  # the plaintext control, summed as posts go

    device_s = server_s = plaintext_s = 0.0
    total_bytes = 0
    coordinator = net.coordinator
    for i in range(n_part):
        # benchmark data, not secrets: a seeded generator per participant keeps runs
        # comparable without holding every value at once
        gen = np.random.default_rng((args.round, i))
        values = gen.uniform(-1.0, 1.0, size=(m * k, d))
        targets = gen.integers(0, n, size=m * k)
        part, to = client(i), slot_ids[targets].tobytes()
        t0 = time.perf_counter()
        raw = part.build_post(spec, PHASE, to, values)
        t1 = time.perf_counter()
        coordinator.handle_device(raw, part.device_id)
        t2 = time.perf_counter()
        np.add.at(truth, targets, codec.encode(values).astype(np.int64))
        plaintext_s += time.perf_counter() - t2
        server_s += t2 - t1
        device_s += t1 - t0
        total_bytes += len(raw)
    t0 = time.perf_counter()
    report = coordinator.close_phase(spec.round_id, PHASE)
    server_s += time.perf_counter() - t0
    seconds = device_s + server_s  # the protocol's work only: not the data generation

    c_sums, _ = net.coordinator.rounds[spec.round_id].accumulators[PHASE].sums()
    a_sums, _ = net.aggregator.rounds[spec.round_id].accumulators[PHASE].sums()
    exact = bool(np.array_equal(c_sums + a_sums, truth))
    if not exact or report.surviving != report.accepted_by_coordinator:
        raise CommandFailed("benchmark sums do not match the plaintext sums")
    items = n * k
    # public-key envelopes sealed and opened per post: one per participant (mailbox A-part), or
    # an outer envelope per participant plus two inner envelopes per item (shuffled); none in
    # plaintext
    sealed = {
        Mode.MAILBOX: n_part,
        Mode.DENSE: n_part,
        Mode.SHUFFLED: n_part + 2 * items,
        Mode.PLAINTEXT: 0,
    }[mode]
    return {
        "devices": n,
        "devices_per_participant": m,
        "deterministic": bool(args.deterministic),
        "participants": n_part,
        "dim": d,
        "mode": mode.value,
        "items": items,
        "seconds": round(seconds, 4),
        "contributions_per_s": round(items / seconds, 1),
        "bytes_per_device": round(total_bytes / n, 1),
        "bytes_per_participant": round(total_bytes / n_part, 1),
        "plaintext_seconds": round(plaintext_s, 6),
        "device_seconds": round(device_s, 4),
        "server_seconds": round(server_s, 4),
        "sealed_envelopes": sealed,
        "sealed_envelopes_per_s": round(sealed / seconds, 1),
        "exact": exact,
    }
