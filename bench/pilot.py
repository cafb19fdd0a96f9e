"""``decentsim bench pilot``: a hybrid run of pilot processes over the radio hub, measured.

It starts the radio hub, the coordinator, the aggregator, one simulated pool and ``--pilots``
pilot processes (``device-agent run --radio bumble --hci tcp-client:…``) on this machine, and
runs ``--days`` days at ``--scale`` (a day in 86400/scale wall seconds). The proximity schedule
is random but seeded. Each day every pilot meets ``--contacts-per-pilot`` others, 15-60 min at
0.5-3 m (the closest bucket) or 6-9 m (the 0.5 bucket).

It then reads the pilots' private stores, as the test harness does, and compares each
scheduled directed contact of a day with the weight the pilot's radio recovered. One JSON line:

    {"pilots", "days", "scale", "contacts_scheduled", "contacts_recovered",
     "weight_rel_error_median", "cpu_s_per_pilot_day", "rss_mb_per_pilot",
     "rss_mb_torch_import", "wall_s"}

* ``cpu_s_per_pilot_day``: the pilot processes' user + system CPU seconds, per pilot and day.
* ``rss_mb_per_pilot``: the largest peak RSS (``VmHWM``) of any pilot.
* ``rss_mb_torch_import``: the peak RSS of a bare ``import torch, numpy`` on the same
  interpreter. That much of a pilot's memory is the model library, not the pilot.

Processes are sampled from ``/proc`` every half second while they live (Linux).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from decentsim.usage import UsageError, positive_float, positive_int
from device_agent.radio import RadioStore
from launcher.decentralized import decentralize
from protocols.ble.proximity import ProximitySchedule
from protocols.ble.radio import DAY_SECONDS, DEFAULT_EPOCH
from protocols.ble.scoring import match_keys, score
from sim import env, models, populations
from sim.model import W_BITS, quantize
from sim.params import Theta


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bench pilot``."""
    p.add_argument("--pilots", type=positive_int, default=12)
    p.add_argument("--days", type=positive_int, default=2)
    p.add_argument("--scale", type=positive_float, default=1440.0, help="the run clock's scale")
    p.add_argument("--agents", type=positive_int, default=200, help="the population's size")
    p.add_argument("--contacts-per-pilot", type=positive_int, default=2, help="a day")
    p.add_argument("--seed", type=int, default=0)


def schedule_text(pilots: list[int], days: int, per_pilot: int, seed: int) -> str:
    """A random proximity schedule: each day, each pilot in ``per_pilot`` meetings."""
    rng = np.random.default_rng(seed)
    rows = ["start_s,end_s,a,b,distance_m"]
    for day in range(days):
        busy: dict[tuple[int, int], float] = {}
        for a in pilots:
            for _ in range(per_pilot):
                b = int(rng.choice([p for p in pilots if p != a]))
                pair = (min(a, b), max(a, b))
                # meetings of one pair one after another, never overlapping
                start = max(busy.get(pair, 0.0), float(rng.uniform(3600, 20 * 3600)))
                end = start + float(rng.uniform(15, 60)) * 60
                busy[pair] = end + 600
                far = rng.random() < 0.3
                distance = float(rng.uniform(6, 9) if far else rng.uniform(0.5, 3))
                base = day * DAY_SECONDS
                rows.append(
                    f"{base + start:.0f},{base + end:.0f},{pair[0]},{pair[1]},{distance:.2f}"
                )
    return "\n".join(rows) + "\n"


def _proc_sample(pid: int) -> tuple[float, float] | None:
    """(user + system CPU seconds, peak RSS in MB) of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has exited
        return None
    ticks = 100.0  # USER_HZ on Linux
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    hwm = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0
    )
    return cpu, hwm / 1024


def _torch_import_mb() -> float:
    code = (
        "import torch, numpy, pathlib;"
        "print(next(l for l in pathlib.Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmHWM')).split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip()) / 1024, 1)


def recovered_vs_scheduled(
    state: Path, pilots: list[int], days: int, schedule: ProximitySchedule
) -> tuple[int, int, float]:
    """(scheduled directed pilot-days, those recovered, median relative weight error)."""
    stores = {a: RadioStore(state / f"pilot-{a}") for a in pilots}
    teks = {a: stores[a].teks() for a in pilots}
    scheduled = recovered = 0
    errors = []
    for day in range(days):
        start = float(DEFAULT_EPOCH + day * DAY_SECONDS)
        for a in pilots:
            trace = score(stores[a].sightings(start, start + DAY_SECONDS))
            weight = quantize_np(trace.weight)
            for b in pilots:
                expected = schedule.expected_weight(
                    a, b, day * DAY_SECONDS, (day + 1) * DAY_SECONDS
                )
                if b == a or expected == 0:
                    continue
                got = float(weight[match_keys(trace.rpi, trace.interval, teks[b]) >= 0].sum())
                scheduled += 1
                recovered += got > 0
                errors.append(abs(got - expected) / expected)
    return scheduled, recovered, float(np.median(errors)) if errors else 0.0


def quantize_np(weight: np.ndarray) -> np.ndarray:
    """Weights on the model's grid, as a pilot posts them."""
    return quantize(torch.from_numpy(weight), W_BITS).numpy()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the hybrid run and measure it."""
    pilots = list(range(args.pilots))
    if args.pilots >= args.agents:
        raise UsageError(f"--pilots {args.pilots}: need fewer pilots than --agents {args.agents}")
    root = Path(tempfile.mkdtemp(prefix="decentsim-bench-pilot-"))
    (root / "schedule.csv").write_text(
        schedule_text(pilots, args.days, args.contacts_per_pilot, args.seed)
    )
    schedule = ProximitySchedule.read(root / "schedule.csv")
    wall_epoch = time.time() + 15.0 + 1.5 * args.pilots  # every process started and enrolled
    clock = ["--clock-scale", str(args.scale), "--sim-epoch", str(DEFAULT_EPOCH),
             "--wall-epoch", str(wall_epoch)]  # fmt: skip
    hub = subprocess.Popen(
        [sys.executable, "-m", "decentsim", "radio-hub", "--schedule", str(root / "schedule.csv"),
         "--agents", ",".join(map(str, pilots)), *clock],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert hub.stdout is not None
    ports = json.loads(hub.stdout.readline())["ports"]
    simulation = env.create_from_template(
        models.epidemiology, populations.synthetic(args.agents, seed=args.seed),
        theta=Theta(beta=0.3, init_frac=0.05), seed=args.seed, days=args.days,
    )  # fmt: skip
    # a scan window long next to the HCI round trips, an advert or two per window
    interval = 240.0 / args.scale
    radio = ["--advertising-interval-ms", "40", "--scan-window-s", f"{0.6 * interval:.4f}",
             "--scan-interval-s", f"{interval:.4f}"]  # fmt: skip
    hci = {a: ["--hci", f"tcp-client:127.0.0.1:{ports[str(a)]}", *radio] for a in pilots}
    real = decentralize(
        simulation, root=root / "run", pools=1, radio="ideal", step_timeout_s=120.0,
        pilots=pilots, start=wall_epoch, clock_scale=args.scale, pilot_radios=hci,
    )  # fmt: skip
    samples: dict[int, tuple[float, float]] = {}
    started = time.perf_counter()
    try:
        real.deploy(timeout_s=300.0)
        fed = real.federation
        pids = {a: fed.procs[f"pilot-{a}"].pid for a in pilots}
        with tqdm(total=args.days, unit="day", file=sys.stderr) as bar:
            while not fed.finished():
                for a, pid in pids.items():
                    sample = _proc_sample(pid)
                    if sample is not None:
                        samples[a] = sample
                bar.update(fed.committed() - bar.n)
                fed.check_alive()
                time.sleep(0.5)
        wall_s = time.perf_counter() - started
    finally:
        real.close()
        hub.send_signal(signal.SIGTERM)
        hub.communicate(timeout=30)
    scheduled, recovered, error = recovered_vs_scheduled(
        root / "run" / "state", pilots, args.days, schedule
    )
    cpu = sum(cpu for cpu, _ in samples.values())
    return {
        "pilots": args.pilots,
        "days": args.days,
        "scale": args.scale,
        "contacts_scheduled": scheduled,
        "contacts_recovered": recovered,
        "weight_rel_error_median": round(error, 4),
        "cpu_s_per_pilot_day": round(cpu / (args.pilots * args.days), 2),
        "rss_mb_per_pilot": round(max(rss for _, rss in samples.values()), 1),
        "rss_mb_torch_import": _torch_import_mb(),
        "wall_s": round(wall_s, 1),
    }
