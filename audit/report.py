"""The report of one server's audit: ``audit.json`` (a verdict per check), ``report.md``,
``report.html`` and PNGs.

The JSON is the machine-readable verdict (``{"role": …, "verdict": "pass"|"fail", "checks":
[...], "unused": {stage: {reason: count}}}``); the Markdown and HTML hold the same tables plus
plots — the server's share top-byte histogram against the plaintext control, attack success
against chance, linkage recall against chance, the distribution of contributors per slot — and
the table of every record, item or truth row the audit could not use, by reason.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from audit.checks import AuditResult, CheckResult
from audit.views import AuditInput


def threat_model(role: str) -> str:
    """The report's statement of what this audit holds and attacks."""
    return (
        "Two non-colluding, honest-but-curious servers: the coordinator C and the aggregator A. "
        f"This audit is the {role}'s: its attacks use only what the {role} received and sent "
        f"(its transcript, sealed to the {role}'s own auditor) and the {role}'s own private "
        "keys, read from its state dir to open what was sealed to it, scored against the "
        "ground truth (the pools' own stores): it reconstructs exactly what that server could "
        "learn. The other server's transcript and keys are not read: both views together are "
        "the C + A collusion, outside the threat model (they add their shares); the test suite, "
        "which holds both in-memory views, shows that boundary."
    )


def unused_rows(audit: AuditResult) -> list[list[str]]:
    """The table of what the audit could not use (first row = header): stage, reason, count."""
    rows = [["stage", "not used", "count"]]
    for stage, reasons in audit.unused.items():
        rows += [[stage, reason, str(n)] for reason, n in reasons.items()]
    return rows


def to_json(inp: AuditInput, audit: AuditResult) -> dict[str, Any]:
    """The machine-readable verdict."""
    return {
        "source": inp.source,
        "role": audit.role,
        "mode": inp.mode.value,
        "verdict": audit.verdict,
        "checks": [
            {
                "key": r.key,
                "title": r.title,
                "status": r.status.value,
                "summary": r.summary,
                "details": r.details,
                "unused": r.unused,
            }
            for r in audit.checks
        ],
        "unused": audit.unused,
        "truth_notes": inp.truth.notes if inp.truth is not None else ["no ground truth"],
    }


def _plots(results: list[CheckResult], out: Path) -> dict[str, str]:
    """PNG per check that has plot data; returns check key → file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    for r in results:
        fig = None
        if "top_byte_histograms" in r.plot:
            hists = r.plot["top_byte_histograms"]
            fig, ax = plt.subplots(figsize=(8, 3.6), constrained_layout=True)
            for name, counts in hists.items():
                c = np.asarray(counts, dtype=np.float64)
                ax.step(np.arange(256), c / max(c.sum(), 1), where="mid", label=name, lw=1)
            ax.axhline(1 / 256, color="k", ls=":", lw=1, label="uniform")
            ax.set_yscale("log")
            ax.set_xlabel("top byte of the ring element")
            ax.set_ylabel("fraction")
            ax.set_title("shares vs the plaintext control")
            ax.legend(fontsize=7)
        elif "rates" in r.plot:
            names = list(r.plot["rates"])
            rates = np.asarray([r.plot["rates"][n] for n in names])
            fig, ax = plt.subplots(figsize=(8, 3.6), constrained_layout=True)
            x = np.arange(len(names))
            ax.bar(x - 0.27, rates[:, 0], 0.27, label="recovered (all values)")
            ax.bar(x, rates[:, 1], 0.27, label="chance: guess 0 (all values)")
            ax.bar(x + 0.27, rates[:, 2], 0.27, label="recovered non-zero values (chance ≈ 0)")
            ax.set_xticks(x, [n.replace(" + ", "\n+ ") for n in names], fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("fraction of honest contributions")
            ax.legend(fontsize=7)
        elif "linkage" in r.plot:
            names = list(r.plot["linkage"])
            fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
            x = np.arange(len(names))
            vals = r.plot["linkage"]
            ax.bar(x - 0.2, [vals[n]["recall"] for n in names], 0.4, label="recall")
            ax.bar(x + 0.2, [vals[n]["chance_recall"] for n in names], 0.4, label="chance")
            ax.set_xticks(x, names)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("true sender→slot edges recovered")
            ax.legend(fontsize=7)
        elif "cohort_histogram" in r.plot:
            h = r.plot["cohort_histogram"]
            fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
            ax.bar(np.arange(len(h)), h)
            unit = r.details.get("unit", "slots")
            ax.set_xlabel(f"contacts summed, per one of the {unit} (20 = 20 or more)")
            ax.set_ylabel(unit)
            k = r.details.get("k", 2)
            ax.axvline(k - 0.5, color="r", ls="--", lw=1, label=f"k = {k}")
            ax.legend(fontsize=7)
        elif "dp_errors" in r.plot:
            err = np.asarray(r.plot["dp_errors"]["errors"], dtype=np.float64)
            sigma = float(r.plot["dp_errors"]["sigma"])
            fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
            ax.hist(err / sigma, bins=40, density=True, label="opened − truth (per coordinate)")
            x = np.linspace(-4.5, 4.5, 200)
            ax.plot(x, np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, σ²)")
            ax.set_xlabel(f"error of the opened aggregates / configured σ (σ = {sigma:.3g})")
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
        if fig is not None:
            fig.suptitle(r.title)
            name = f"{r.key}.png"
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            files[r.key] = name
    return files


def _md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(inp: AuditInput, audit: AuditResult, out: Path) -> dict[str, Any]:
    """Write ``audit.json``, ``report.md``, ``report.html`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results = audit.checks
    data = to_json(inp, audit)
    (out / "audit.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    plots = _plots(results, out)
    unused = unused_rows(audit)
    unused_text = (
        "Every record, item and truth row was used."
        if len(unused) == 1
        else "Records, items and truth rows the audit could not use, by stage and reason "
        "(each is left out of the checks' counts):"
    )
    threat = threat_model(audit.role)
    summary = [["check", "verdict", "why"]] + [
        [r.title, r.status.value.upper(), r.summary] for r in results
    ]
    md = [
        f"# Privacy audit of the {audit.role} — {data['verdict'].upper()}",
        "",
        f"Run: `{inp.source}` — mode **{inp.mode.value}** — the {audit.role}'s view.",
        "",
        f"**Threat model.** {threat}",
        "",
        _md_table(summary),
        "",
    ]
    md += [f"- {n}" for n in data["truth_notes"]]
    md += ["", "## Not used", "", unused_text, "", _md_table(unused) if len(unused) > 1 else ""]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>decentsim privacy audit</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "font-size:90%}.pass{color:#070}.fail{color:#b00}.leak{color:#a60}.skip{color:#777}"
        "</style>",
        f"<h1>Privacy audit of the {audit.role} — {html.escape(data['verdict'].upper())}</h1>",
        f"<p>Run: <code>{html.escape(inp.source)}</code> — mode <b>{inp.mode.value}</b> — "
        f"the {audit.role}'s view.</p>",
        f"<p><b>Threat model.</b> {html.escape(threat)}</p>",
        _html_table(summary),
        f"<h2>Not used</h2><p>{html.escape(unused_text)}</p>",
        _html_table(unused) if len(unused) > 1 else "",
    ]
    for r in results:
        md += ["", f"## {r.title} — {r.status.value.upper()}", "", r.summary, ""]
        md.append(_md_table(r.table))
        parts.append(
            f"<h2>{html.escape(r.title)} — <span class='{r.status.value}'>"
            f"{r.status.value.upper()}</span></h2><p>{html.escape(r.summary)}</p>"
        )
        parts.append(_html_table(r.table))
        if r.key in plots:
            md += ["", f"![{r.title}]({plots[r.key]})"]
            parts.append(f"<img src='{plots[r.key]}' alt='{html.escape(r.title)}'>")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text("\n".join(parts) + "\n")
    return data
