"""The CLI (``decentsim simulate``/``calibrate``/``bench sim``) and the Python API."""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decentsim.cli import main
from sim import env, models, populations
from sim.params import BASE_PARAMS, ParameterError, Theta


def test_python_api_as_in_the_design(tmp_path: Path) -> None:
    simulation = env.create_from_template(
        models.epidemiology, populations.synthetic(2_000), days=30, seed=3
    )
    result = simulation.execute()
    assert result.new_infections.sum() > 0
    predicted = simulation.predict()
    assert torch.equal(predicted.new_infections, result.new_infections)
    assert torch.equal(predicted.employment, result.employment)
    assert predicted.employment.min() > 0  # the heuristic: the labour force works
    paths = simulation.visualize(tmp_path)
    assert {p.name for p in paths} == {"stages.png", "daily.png", "by_age.png", "employment.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_api_requires_execute_before_results() -> None:
    simulation = env.create_from_template(models.epidemiology, populations.synthetic(100))
    with pytest.raises(RuntimeError, match="execute"):
        simulation.summary()


def test_simulate_json_prints_exactly_one_object(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc = main(
        [
            "simulate",
            "--population",
            "synthetic:1500",
            "--days",
            "20",
            "--seed",
            "2",
            "--grad",
            "forward",
            "--theta",
            "beta=0.4",
            "--json",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    summary = json.loads(out)
    assert summary["days"] == 20 and summary["agents"] == 1500
    assert len(summary["daily"]["new_infections"]) == 20
    assert summary["loss"] == sum(summary["daily"]["new_infections"])
    assert set(summary["grad"]) == set(BASE_PARAMS) and summary["grad"]["beta"] != 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    rows = list(csv.DictReader((tmp_path / "trajectory.csv").open()))
    assert len(rows) == 21
    assert [int(r["new_infections"]) for r in rows[1:]] == summary["daily"]["new_infections"]
    for r in rows:  # every agent is in exactly one stage every day
        assert sum(int(r[k]) for k in "SEIRD") == 1500
    assert all((tmp_path / n).is_file() for n in ("stages.png", "daily.png", "by_age.png"))


def test_simulate_reverse_and_forward_print_the_same_gradient(
    capsys: pytest.CaptureFixture[str],
) -> None:
    grads = []
    for mode in ("forward", "reverse"):
        main(
            [
                "simulate",
                "--population",
                "synthetic:800",
                "--days",
                "15",
                "--dtype",
                "float64",
                "--grad",
                mode,
                "--json",
                "--theta",
                "beta=0.5",
            ]
        )
        grads.append(json.loads(capsys.readouterr().out)["grad"])
    for name in BASE_PARAMS:
        assert grads[0][name] == pytest.approx(grads[1][name], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    ("theta", "message"),
    [
        ("beta=-1", "'beta' = -1.0 is outside"),
        ("beta=nan", "'beta' is NaN"),
        ("mortality=abc", "'abc' is not a number"),
        ("gamma=1", "unknown parameter"),
        ("beta", "not of the form name=value"),
    ],
)
def test_simulate_rejects_bad_theta(
    theta: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--population", "synthetic:100", "--theta", theta]) == 2
    assert message in capsys.readouterr().err


def test_theta_validation_in_the_api() -> None:
    with pytest.raises(ParameterError, match="init_frac"):
        Theta(init_frac=1.5)
    with pytest.raises(ParameterError, match=r"mortality.*NaN"):
        Theta(mortality=float("nan"))
    with pytest.raises(ParameterError, match="must be a number"):
        Theta(beta="0.3")  # type: ignore[arg-type]


def test_interventions_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    base = [
        "simulate",
        "--population",
        "synthetic:3000",
        "--days",
        "40",
        "--seed",
        "5",
        "--theta",
        "beta=0.5",
        "--json",
    ]
    totals = []
    for extra in (
        [],
        [
            "--lockdown",
            "community:0:0.0",
            "--lockdown",
            "work:0:0.0",
            "--lockdown",
            "school:0:0.0",
            "--vaccinate",
            "0:0.5:1.0",
        ],
    ):
        main(base + extra)
        totals.append(sum(json.loads(capsys.readouterr().out)["daily"]["new_infections"]))
    assert totals[1] < 0.5 * totals[0]
    assert main([*base, "--lockdown", "work:3"]) == 2
    assert "--lockdown" in capsys.readouterr().err


def test_calibrate_cli_writes_theta_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pop = populations.synthetic(1500, seed=0)
    sim = env.create_from_template(models.epidemiology, pop, theta=Theta(beta=0.35), seed=0)
    weekly = sim.execute(days=28).new_infections.reshape(4, 7).sum(-1).tolist()
    target = tmp_path / "target.csv"
    target.write_text(
        "date,region,cases_week\n"
        + "".join(
            f"2020-01-{7 * i + 1:02d},X,{v}\n2020-01-{7 * i + 1:02d},Y,0\n"
            for i, v in enumerate(weekly)
        )
    )
    rc = main(
        [
            "calibrate",
            "--population",
            "synthetic:1500",
            "--target",
            str(target),
            "--filter",
            "region=X",
            "--epochs",
            "25",
            "--fit",
            "beta",
            "--theta",
            "beta=0.2",
            "--dtype",
            "float64",
            "--out",
            str(tmp_path / "cal"),
            "--json",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["periods"] == 4 and result["days"] == 28
    assert result["loss_best"] < result["loss_first"]
    assert result["theta"]["beta"] == pytest.approx(0.35, rel=0.1)
    assert json.loads((tmp_path / "cal" / "theta.json").read_text())["theta"] == result["theta"]
    assert (tmp_path / "cal" / "loss.png").is_file() and (tmp_path / "cal" / "fit.png").is_file()


def test_bench_sim_prints_one_json_line() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "decentsim",
            "bench",
            "sim",
            "--agents",
            "20000",
            "--degree",
            "5",
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["agents"] == 20000 and r["edges"] == 100_000 and r["steps"] == 3
    for key in (
        "interactions_per_s_forward",
        "interactions_per_s_tangent",
        "interactions_per_s_reverse",
        "peak_mem_mb",
    ):
        assert r[key] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_run_equals_cpu_run() -> None:
    pop = populations.synthetic(3000, seed=1)
    runs = [
        env.create_from_template(
            models.epidemiology, pop, seed=1, device=d, dtype=torch.float64
        ).execute(days=30, grad="forward")
        for d in ("cpu", "cuda")
    ]
    assert torch.equal(runs[0].new_infections.cpu(), runs[1].new_infections.cpu())
    torch.testing.assert_close(runs[0].loss_and_grad()[1], runs[1].loss_and_grad()[1].cpu())


def test_calibrate_network_mode_needs_positive_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "t.csv"
    target.write_text("date,cases_week\n2020-01-01,3\n2020-01-08,5\n")
    assert (
        main(
            [
                "calibrate",
                "--population",
                "synthetic:100",
                "--target",
                str(target),
                "--mode",
                "network",
                "--fit",
                "mortality",
                "--theta",
                "mortality=0",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "['mortality'] need a positive start value" in capsys.readouterr().err


def test_calibrate_reports_bad_target_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "t.csv"
    target.write_text("date,cases_week\n2020-01-01,3\n2020-01-08,x\n")
    assert (
        main(
            [
                "calibrate",
                "--population",
                "synthetic:100",
                "--target",
                str(target),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "t.csv:3: field 'cases_week': 'x'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--population", "synthetic:abc"], "synthetic"),
        (["--population", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--lockdown", "nosuchlayer:3:0.5"], "layer 'nosuchlayer'"),
        (["--lockdown", "work:3:-2"], "scale must be >= 0"),
        (["--vaccinate", "3:1.5"], "fraction must be in"),
        (["--population-seeds"], "no initially_infected column"),
    ],
)
def test_simulate_reports_bad_input_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--population", "synthetic:200", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("decentsim simulate: ") and err.count("\n") == 1


def test_allocator_tuning_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from sim.allocator import keep_freed_memory

    monkeypatch.setenv("DECENTSIM_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
    monkeypatch.setenv("DECENTSIM_MALLOC_TUNING", "1")
    if sys.platform == "linux" and "glibc" in " ".join(platform.libc_ver()):
        assert keep_freed_memory() is True
