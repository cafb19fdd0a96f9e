"""Plot the simulated radio's contact weight against distance (for docs/ble.md).

Run: ``PYTHONPATH=. python -m protocols.ble.plot --out docs/img/ble_weight_vs_distance.png``.
Every contact has simulator weight 1.0 (15 min at ~1 m); the plot shows the weight the
simulated radio + scoring recover, per distance bin, against the ideal radio's exact 1.0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from protocols.ble.radio import DayContacts, RadioModel, SimulatedRadio
from protocols.ble.scoring import score
from protocols.ble.simkeys import SimulatedKeyring


def weight_vs_distance(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(distance, recovered weight) of ``n`` one-directional weight-1 contacts, distinct pairs."""
    src = np.arange(n, dtype=np.int64) * 2
    contacts = DayContacts(src, src + 1, np.ones(n), day=0)
    model = RadioModel(distance_median_m=2.0, distance_sigma=0.9, distance_range_m=(0.3, 12.0))
    radio = SimulatedRadio(SimulatedKeyring(bytes(16)), seed=seed, model=model)
    day = radio.transmit(contacts)
    trace = score(day.sightings)
    # Ground truth: observer 2i heard device 2i+1; sum its RPIs' weights.
    got = np.bincount(trace.observer // 2, weights=trace.weight, minlength=n)
    return radio.draw(contacts).distance, got


def main(argv: list[str] | None = None) -> int:
    """Draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/ble_weight_vs_distance.png"))
    parser.add_argument("--contacts", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    distance, weight = weight_vs_distance(args.contacts, args.seed)
    edges = np.geomspace(0.3, 12.0, 16)
    idx = np.digitize(distance, edges) - 1
    centers = np.sqrt(edges[:-1] * edges[1:])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter(distance, weight, s=2, alpha=0.15, color="tab:blue", label="contacts")
    stats = [weight[idx == b] for b in range(centers.size)]
    ok = [i for i, s in enumerate(stats) if s.size >= 20]
    q = np.array([np.percentile(stats[i], [10, 50, 90]) for i in ok])
    ax.plot(centers[ok], q[:, 1], color="tab:red", lw=2, label="median")
    ax.fill_between(centers[ok], q[:, 0], q[:, 2], color="tab:red", alpha=0.2, label="10-90 %")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="simulator weight (IdealRadio)")
    ax.set_xscale("log")
    ax.set_xlabel("distance (m)")
    ax.set_ylabel("recovered contact weight")
    ax.set_title("SimulatedRadio: weight-1 contacts (15 min) vs distance")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
