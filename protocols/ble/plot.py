"""Plot the simulated radio's recovered contact weight against distance (for docs/ble.md).

Run: ``python -m protocols.ble.plot --out docs/img/ble_weight_vs_distance.png``; it also prints
the per-distance table quoted in the docs. Every contact has simulator weight 1.0 (15 min); the
left panel shows the weight that :class:`SimulatedRadio` + scoring recover per distance bin (the
conditional distribution does not depend on how distances are drawn, so distances are spread
wider than the default model's to cover 0.3-12 m); the right panel shows the recovered weights
under the *default* :class:`RadioModel`, i.e. what a simulated run sees.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from protocols.ble.radio import DayContacts, RadioModel, SimulatedRadio
from protocols.ble.scoring import score
from protocols.ble.simkeys import SimulatedKeyring

#: Distance spread of the left panel: wide, to cover 0.3-12 m with enough contacts per bin.
WIDE = RadioModel(distance_median_m=2.0, distance_sigma=0.9, distance_range_m=(0.3, 12.0))
BIN_EDGES_M = (0.3, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0)


def weight_vs_distance(
    n: int, seed: int, model: RadioModel | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, recovered weight) of ``n`` one-directional weight-1 contacts, distinct pairs."""
    src = np.arange(n, dtype=np.int64) * 2
    contacts = DayContacts(src, src + 1, np.ones(n), day=0)
    radio = SimulatedRadio(SimulatedKeyring(bytes(16)), seed=seed, model=model)
    trace = score(radio.transmit(contacts).sightings)
    # Ground truth: observer 2i heard only device 2i+1; sum its RPIs' weights.
    got = np.bincount(trace.observer // 2, weights=trace.weight, minlength=n)
    return radio.draw(contacts).distance, got


def table(distance: np.ndarray, weight: np.ndarray) -> str:
    """Markdown table of mean / median / 10-90 % of the recovered weight per distance bin."""
    rows = [
        "| distance (m) | contacts | mean | median | 10 % | 90 % |",
        "|---|---|---|---|---|---|",
    ]
    for lo, hi in itertools.pairwise(BIN_EDGES_M):
        w = weight[(distance >= lo) & (distance < hi)]
        if w.size:
            p10, p50, p90 = np.percentile(w, [10, 50, 90])
            rows.append(
                f"| {lo}-{hi} | {w.size} | {w.mean():.2f} | {p50:.2f} | {p10:.2f} | {p90:.2f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Draw the figure and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/ble_weight_vs_distance.png"))
    parser.add_argument("--contacts", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    distance, weight = weight_vs_distance(args.contacts, args.seed, WIDE)
    d_def, w_def = weight_vs_distance(args.contacts, args.seed + 1)
    edges = np.geomspace(0.3, 12.0, 16)
    idx = np.digitize(distance, edges) - 1
    centers = np.sqrt(edges[:-1] * edges[1:])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=(3, 2))
    ax.scatter(distance, weight, s=2, alpha=0.1, color="tab:blue", label="contacts")
    stats = [weight[idx == b] for b in range(centers.size)]
    ok = [i for i, s in enumerate(stats) if s.size >= 20]
    q = np.array([np.percentile(stats[i], [10, 50, 90]) for i in ok])
    mean = np.array([stats[i].mean() for i in ok])
    ax.plot(centers[ok], mean, color="k", lw=2, label="mean")
    ax.plot(centers[ok], q[:, 1], color="tab:red", lw=2, label="median")
    ax.fill_between(centers[ok], q[:, 0], q[:, 2], color="tab:red", alpha=0.2, label="10-90 %")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="simulator weight = IdealRadio")
    ax.set_xscale("log")
    ax.set_ylim(0, 2.5)
    ax.set_xlabel("distance (m)")
    ax.set_ylabel("recovered contact weight")
    ax.set_title("SimulatedRadio: weight-1 contacts (15 min) vs distance", fontsize=10)
    ax.legend(loc="upper right", fontsize=7)
    bins = np.arange(0, 2.6, 240 / 900 / 2)
    bx.hist(w_def, bins=bins, color="tab:blue", alpha=0.7)
    bx.axvline(w_def.mean(), color="k", lw=2, label=f"mean {w_def.mean():.2f}")
    bx.axvline(np.median(w_def), color="tab:red", lw=2, label=f"median {np.median(w_def):.2f}")
    bx.axvline(1.0, color="k", ls="--", lw=1, label="simulator weight 1.0")
    bx.set_xlabel("recovered contact weight")
    bx.set_ylabel("contacts")
    bx.set_title("default RadioModel (distance median 1.5 m)", fontsize=10)
    bx.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("wide distances (left panel):\n" + table(distance, weight))
    print(
        f"\ndefault model: mean {w_def.mean():.3f}, median {np.median(w_def):.3f}, "
        f"zero {np.mean(w_def == 0):.3f}\n" + table(d_def, w_def)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
