"""Bad input to any ``decentsim`` command is one line on stderr that names the argument or file,
and exit status 2; never a traceback.

The table runs in this process (fast); :func:`test_bad_input_as_a_process` repeats a few cases
through a real ``decentsim`` process to prove there is no traceback end to end. No case may
start a federation or Ray: :func:`nothing_runs` makes those fail loudly instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import federated as bench_federated
from bench import secaggplus as bench_secaggplus
from decentsim.commands import device_agent as device_agent_command
from decentsim.commands import federated as federated_command
from identity.enrolment_uri import EnrolmentURI
from identity.pki import LocalCA
from sim.archetypes import BehaviourTable, population_cells
from sim.populations import from_spec

from .conftest import Outcome

#: placeholders in the table's argv, replaced by each test's files
TARGET = "{target}"  # tiny_target: a good weekly CSV (region X, Y)
BAD_FIELD = "{bad_field}"  # a CSV whose line 3 has a non-numeric count
NO_FILE = "{missing}"  # a path that does not exist
TMP = "{tmp}"  # the test's own directory
UNDER_A_FILE = "{under_a_file}"  # a path whose parent is a file: no directory can be made there
BINARY = "{binary}"  # a file that is not text
TABLE = "{table}"  # a good weekly behaviour table (JSON) of synthetic:50's archetype grid
BAD_TABLE = "{bad_table}"  # that table as CSV, line 3's work probability 1.5
LABOUR = "{labour}"  # a good monthly labour-force CSV, 2020-01 to 2020-04
BAD_LABOUR = "{bad_labour}"  # a labour-force CSV whose line 3 has a non-numeric count
SCHEDULE = "{schedule}"  # a good proximity schedule
BAD_SCHEDULE = "{bad_schedule}"  # a proximity schedule whose line 3 has distance "far"
OVERLAP = "{overlap}"  # a proximity schedule with two overlapping rows of one pair
URI = "{uri}"  # a good enrolment URI (pilot agent 3)
BAD_URI = "{bad_uri}"  # that URI with another CA fingerprint

#: where CUDA is present, --device cuda is good input
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")

SIM = ["simulate", "--population", "synthetic:50", "--days", "2"]
CAL = ["calibrate", "--population", "synthetic:50", "--target", TARGET, "--out", TMP + "/cal"]
CAL += ["--filter", "region=X", "--epochs", "1"]
FED = ["federated", "run", "--population", "synthetic:50", "--days", "2", "--out", TMP + "/fed"]
NO_LLM = ["--llm-url", "http://127.0.0.1:1/v1", "--llm-model", "m", "--llm-retries", "0"]
LLM = [*SIM, "--behaviour", "llm", *NO_LLM, "--llm-cache", TMP + "/llm"]  # nothing listens
CAL_EMP = ["calibrate", "--population", "synthetic:50", "--target-employment", LABOUR]
CAL_EMP += ["--out", TMP + "/cal", "--epochs", "1"]
B_SIM = ["bench", "sim", "--agents", "10", "--degree", "2", "--steps", "1"]
B_SUM = ["bench", "securesum", "--devices", "4", "--dim", "2", "--items-per-device", "1"]
B_BLE = ["bench", "ble", "--contacts", "10"]
B_COH = ["bench", "cohorts", "--population", "synthetic:20", "--days", "1"]
B_FED = ["bench", "federated", "--population", "synthetic:50", "--days", "1", "--pools", "1"]
B_VS = ["bench", "vs-secaggplus", "--clients", "5", "--dim", "2"]
C_TOK = ["coordinator", "tokens", "--state-dir", TMP + "/C"]
C_SERVE = ["coordinator", "serve", "--state-dir", TMP + "/C", "--aggregator", "127.0.0.1:1"]
C_SERVE += ["--aggregator-export", TMP + "/A/export"]
A_SERVE = ["aggregator", "serve", "--state-dir", TMP + "/A", "--coordinator-export", TMP]
AGENT = ["device-agent", "run", "--coordinator", "127.0.0.1:1", "--ca", TARGET]
AGENT += ["--state-dir", TMP + "/P0", "--population", "synthetic:10"]
HUB = ["radio-hub", "--schedule", SCHEDULE]
RADIO = ["device-agent", "radio", "--hci", "tcp-client:127.0.0.1:1", "--state-dir", TMP + "/R"]


def case(argv: list[str], names: str, *marks: pytest.MarkDecorator) -> object:
    """One row of a table: ``decentsim ARGV`` must fail naming ``names``."""
    return pytest.param(argv, names, marks=marks, id=" ".join(argv).replace(TMP, "T"))


#: (argv, what the error line must name)
CASES = [
    # simulate: counts, θ, interventions, the population, devices, the exact sums' budget
    case([*SIM, "--days", "0"], "--days"),
    case([*SIM, "--days", "-3"], "--days"),
    case([*SIM, "--days", "ten"], "--days"),
    case([*SIM, "--seed", "-1"], "--seed"),
    case([*SIM, "--population", "synthetic:0"], "--population"),
    case([*SIM, "--population", "synthetic:abc"], "--population"),
    case([*SIM, "--population", NO_FILE], NO_FILE),
    case([*SIM, "--population", TARGET], "--population"),
    case([*SIM, "--theta", "beta"], "--theta"),
    case([*SIM, "--theta", "beta=-1"], "--theta"),
    case([*SIM, "--theta", "beta=nan"], "--theta"),
    case([*SIM, "--theta", "mortality=abc"], "--theta"),
    case([*SIM, "--theta", "gamma=1"], "--theta"),
    case([*SIM, "--lockdown", "work:3"], "--lockdown"),
    case([*SIM, "--lockdown", "work:x:0.5"], "--lockdown"),
    case([*SIM, "--lockdown", "work:3:-2"], "--lockdown"),
    case([*SIM, "--lockdown", "nosuchlayer:3:0.5"], "--lockdown"),
    case([*SIM, "--vaccinate", "3"], "--vaccinate"),
    case([*SIM, "--vaccinate", "3:1.5"], "--vaccinate"),
    case([*SIM, "--vaccinate=-1:0.5"], "--vaccinate"),  # "=": argparse takes -1… for an option
    case([*SIM, "--vaccinate", "3:0.5:x"], "--vaccinate"),
    case([*SIM, "--vaccinate", "3:0.5:0.9:1"], "--vaccinate"),
    case([*SIM, "--population-seeds"], "--population-seeds"),
    case([*SIM, "--grad", "sideways"], "--grad"),
    case([*SIM, "--dtype", "float16"], "--dtype"),
    case([*SIM, "--theta", "beta=50", "--lockdown", "community:0:100"], "--dtype"),
    case([*SIM, "--out", UNDER_A_FILE], "--out"),
    case([*SIM, "--device", "cuda"], "--device", NO_CUDA),
    # simulate: behaviour (a table, a language model), its period, stimulus, work layer
    case([*SIM, "--behaviour", "bogus"], "--behaviour"),
    case([*SIM, "--behaviour", "table:"], "--behaviour"),
    case([*SIM, "--behaviour", "table:" + NO_FILE], NO_FILE),
    case([*SIM, "--behaviour", "table:" + BAD_TABLE], "bad_table.csv:3: field 'work'"),
    case([*SIM, "--behaviour", "table:" + TABLE, "--period", "month"], "--period"),
    case([*SIM, "--behaviour", "llm"], "--llm-url"),
    case([*SIM, "--behaviour", "llm", "--llm-url", "http://127.0.0.1:1/v1"], "--llm-model"),
    case([*SIM, "--llm-url", "http://127.0.0.1:1/v1"], "--llm-url"),
    case([*SIM, "--llm-model", "m"], "--llm-model"),
    case([*SIM, "--llm-retries", "1"], "--llm-retries"),
    case([*SIM, "--llm-cache", TMP], "--llm-cache"),
    case([*SIM, "--behaviour", "table:" + TABLE, "--llm-model", "m"], "--llm-model"),
    case([*LLM, "--llm-url", "ftp://127.0.0.1/v1"], "--llm-url"),
    case(LLM, "--llm-url: http://127.0.0.1:1/v1/chat/completions: connection failed"),
    case([*LLM, "--llm-cache", UNDER_A_FILE], "--llm-cache"),
    case([*LLM, "--llm-timeout", "0"], "--llm-timeout"),
    case([*LLM, "--llm-retries", "-1"], "--llm-retries"),
    case([*SIM, "--period", "yearly"], "--period"),
    case([*SIM, "--period", "month"], "--period"),
    case([*SIM, "--work-layer", "work"], "--work-layer"),
    case([*SIM, "--behaviour", "table:" + TABLE, "--work-layer", "office"], "--work-layer"),
    case([*SIM, "--stimulus", "0:500"], "--stimulus"),
    case([*SIM, "--behaviour", "table:" + TABLE, "--stimulus", "0:500"], "--stimulus"),
    case([*LLM, "--stimulus", "500"], "--stimulus"),
    case([*LLM, "--stimulus", "x:500"], "--stimulus"),
    case([*LLM, "--stimulus", "0:lots"], "--stimulus"),
    case([*LLM, "--stimulus=-1:500"], "--stimulus"),
    case([*LLM, "--stimulus", "0:-500"], "--stimulus"),
    case([*LLM, "--stimulus", "1:500"], "--stimulus '1:500': month 1 starts on day 30"),
    # calibrate: the target file, its filters and period, the fit
    case(["calibrate", "--population", "synthetic:50"], "--target"),
    case([*CAL, "--target", NO_FILE], NO_FILE),
    case([*CAL, "--target", BAD_FIELD], "bad.csv:3: field 'cases_week'"),
    case([*CAL, "--column", "deaths"], "missing column 'deaths'"),
    case([*CAL, "--filter", "region"], "--filter"),
    case([*CAL, "--filter", "region=Z"], "no rows match"),
    case([*CAL, "--epochs", "0"], "--epochs"),
    case([*CAL, "--lr", "-1"], "--lr"),
    case([*CAL, "--lr", "inf"], "--lr"),
    case([*CAL, "--period", "0"], "--period"),
    case([*CAL, "--days", "3"], "--days"),
    case([*CAL, "--fit", "gamma"], "--fit"),
    case([*CAL, "--fit", ","], "--fit"),
    case([*CAL, "--fit", "mortality", "--theta", "mortality=0"], "--theta"),
    case([*CAL, "--ascertainment", "0"], "--ascertainment"),
    case([*CAL, "--ascertainment", "1.5"], "--ascertainment"),
    case([*CAL, "--mode", "network", "--days", "7"], "--mode network"),
    case([*CAL, "--mode", "guess"], "--mode"),
    case([*CAL, "--lockdown", "work:1"], "--lockdown"),
    case([*CAL, "--out", UNDER_A_FILE], "--out"),
    # calibrate: the employment target, the alignment, the behaviour options
    case([*CAL_EMP, "--target-employment", NO_FILE], NO_FILE),
    case([*CAL_EMP, "--target-employment", BAD_LABOUR], "bad_labour.csv:3: field 'employed'"),
    case([*CAL_EMP, "--employment-column", "jobs"], "missing column 'jobs'"),
    case([*CAL_EMP, "--employment-from", "April"], "--employment-from"),
    case([*CAL_EMP, "--employment-from", "2019-01"], "--employment-from"),
    case([*CAL_EMP, "--employment-from", "2020-04"], "--target-employment"),
    case([*CAL_EMP, "--days", "40"], "--target-employment"),
    case([*CAL_EMP, "--employment-weight", "2"], "--employment-weight"),
    case([*CAL_EMP, "--filter", "region=X"], "--filter"),
    case([*CAL, "--employment-from", "2020-01"], "--employment-from"),
    case([*CAL, "--employment-column", "employed"], "--employment-column"),
    case([*CAL, "--employment-weight", "0"], "--employment-weight"),
    case([*CAL_EMP, "--fit", "shift_U19"], "--fit"),
    case([*CAL_EMP, "--behaviour-period", "month"], "--behaviour-period"),
    case([*CAL_EMP, "--behaviour", "llm", "--llm-model", "m"], "--llm-url"),
    case([*CAL_EMP, "--behaviour", "table:" + BAD_TABLE], "bad_table.csv:3: field 'work'"),
    case([*CAL_EMP, "--behaviour", "table:" + TABLE, "--stimulus", "0:1"], "--stimulus"),
    # federated run: more pools than agents, counts and durations, DP, θ, the target
    case(["federated", "run", "--population", "synthetic:3", "--pools", "5"], "--pools"),
    case([*FED, "--pools", "0"], "--pools"),
    case([*FED, "--days", "0"], "--days"),
    case([*FED, "--epochs", "0"], "--epochs"),
    case([*FED, "--lr", "0"], "--lr"),
    case([*FED, "--step-timeout", "0"], "--step-timeout"),
    case([*FED, "--step-timeout", "nan"], "--step-timeout"),
    case([*FED, "--min-cohort", "-1"], "--min-cohort"),
    case([*FED, "--seed", "-1"], "--seed"),
    case([*FED, "--dp-sigma", "0"], "--dp-sigma"),
    case([*FED, "--dp-sigma", "1e30"], "--dp-sigma"),
    case([*FED, "--dp-sigma", "0.5", "--dp-delta", "2"], "--dp-delta"),
    case([*FED, "--dp-sigma", "0.5", "--dp-sensitivity", "-1"], "--dp-sensitivity"),
    case([*FED, "--theta", "beta=x"], "--theta"),
    case([*FED, "--fit", "gamma"], "--fit"),
    case([*FED, "--population", "synthetic:abc"], "--population"),
    case([*FED, "--target", NO_FILE], NO_FILE),
    case([*FED, "--target", TARGET, "--filter", "region"], "--filter"),
    case([*FED, "--target", TARGET, "--filter", "region=X"], "--days"),
    case([*FED, "--mode", "broadcast"], "--mode"),
    case([*FED, "--transport", "pigeon"], "--transport"),
    case([*FED, "--out", UNDER_A_FILE], "--out"),
    # bench sim
    case([*B_SIM, "--agents", "1"], "--agents"),
    case([*B_SIM, "--degree", "0"], "--degree"),
    case([*B_SIM, "--steps", "0"], "--steps"),
    case([*B_SIM, "--steps", "-1"], "--steps"),
    case([*B_SIM, "--modes", "none,bogus"], "--modes"),
    case([*B_SIM, "--dtype", "float16"], "--dtype"),
    case([*B_SIM, "--device", "cuda"], "--device", NO_CUDA),
    # bench securesum
    case([*B_SUM, "--devices", "0"], "--devices"),
    case([*B_SUM, "--dim", "0"], "--dim"),
    case([*B_SUM, "--items-per-device", "0"], "--items-per-device"),
    case([*B_SUM, "--devices-per-participant", "0"], "--devices-per-participant"),
    case([*B_SUM, "--devices-per-participant", "3"], "--devices-per-participant"),
    case([*B_SUM, "--devices-per-participant", "8"], "--devices-per-participant"),
    case([*B_SUM, "--round", "-1"], "--round"),
    case([*B_SUM, "--round", str(2**64)], "--round"),
    case([*B_SUM, "--mode", "broadcast"], "--mode"),
    # dense: participants × slots × dim past the bench's bound names the option that lowers it
    case(
        ["bench", "securesum", "--devices", "20000", "--mode", "dense"], "--devices-per-participant"
    ),
    # bench ble
    case([*B_BLE, "--contacts", "0"], "--contacts"),
    case([*B_BLE, "--contacts", "-5"], "--contacts"),
    case([*B_BLE, "--contacts", "1e3"], "--contacts"),
    case([*B_BLE, "--degree", "0"], "--degree"),
    case([*B_BLE, "--degree", "nan"], "--degree"),
    case([*B_BLE, "--seed", "-1"], "--seed"),
    case([*B_COH, "--days", "0"], "--days"),
    case([*B_COH, "--min-cohort", "0"], "--min-cohort"),
    case([*B_COH, "--radio", "bluetooth"], "--radio"),
    case(["bench", "cohorts", "--population", "synthetic:x"], "--population"),
    case(["bench", "floor", "--devices", "0"], "--devices"),
    case(["bench", "floor", "--dim", "-1"], "--dim"),
    # bench federated: more pools than agents, counts, the population, the output
    case([*B_FED, "--population", "synthetic:3", "--pools", "5"], "--pools"),
    case([*B_FED, "--pools", "0"], "--pools"),
    case([*B_FED, "--days", "0"], "--days"),
    case([*B_FED, "--seed", "-1"], "--seed"),
    case([*B_FED, "--step-timeout", "-1"], "--step-timeout"),
    case([*B_FED, "--population", NO_FILE], NO_FILE),
    case([*B_FED, "--out", UNDER_A_FILE], "--out"),
    # bench vs-secaggplus (its checks are its own: tests/bench/test_bench_secaggplus.py)
    case(["bench", "vs-secaggplus", "--dim", "2"], "--clients"),
    case([*B_VS, "--clients", "2"], "--clients"),
    case([*B_VS, "--clients", str(2**40)], "--clients"),
    case([*B_VS, "--dim", "0"], "--dim"),
    case([*B_VS, "--rounds", "0"], "--rounds"),
    case([*B_VS, "--warmup", "-1"], "--warmup"),
    case([*B_VS, "--num-shares", "6"], "--num-shares"),
    case([*B_VS, "--client-cpus", "0"], "--client-cpus"),
    case([*B_VS, "--mode", "plaintext"], "--mode"),
    # coordinator, aggregator (cases that stop before a server starts)
    case([*C_TOK, "--count", "0"], "--count"),
    case([*C_TOK, "--count", "-1"], "--count"),
    case([*C_TOK, "--count", "1000001"], "--count"),
    case([*C_TOK, "--count", "many"], "--count"),
    case(["coordinator", "tokens", "--count", "1"], "--state-dir"),
    case(["coordinator", "init", "--state-dir", UNDER_A_FILE], UNDER_A_FILE),
    case(["aggregator", "init", "--state-dir", UNDER_A_FILE], UNDER_A_FILE),
    case([*C_SERVE, "--run", NO_FILE], "--run"),
    case([*C_SERVE, "--run", TARGET], "--run"),
    case(["coordinator", "serve", "--state-dir", TMP], "--aggregator"),
    case([*A_SERVE, "--min-cohort", "-1"], "--min-cohort"),
    case([*A_SERVE, "--mode", "broadcast"], "--mode"),
    case([*A_SERVE, "--dp-sigma", "0"], "--dp-sigma"),
    case([*A_SERVE, "--dp-sigma", "0.5", "--dp-delta", "1"], "--dp-delta"),
    case([*A_SERVE, "--dp-sigma", "0.5", "--dp-sensitivity", "0"], "--dp-sensitivity"),
    # device-agent (cases that stop before it enrols)
    case([*AGENT, "--slice", "4/4"], "--slice"),
    case([*AGENT, "--slice", "half"], "--slice"),
    case([*AGENT, "--population-seed", "-1"], "--population-seed"),
    case([*AGENT, "--ca", NO_FILE], "--ca"),
    case([*AGENT, "--token-file", NO_FILE], "--token-file"),
    case([*AGENT, "--token-file", BINARY], "--token-file"),
    case([*AGENT, "--world-secret", NO_FILE], "--world-secret"),
    case([*AGENT, "--state-dir", UNDER_A_FILE], "--state-dir"),
    case(["device-agent", "run", "--ca", TARGET], "--population"),
    case(AGENT[:2] + AGENT[4:], "--coordinator"),
    case([*AGENT, "--enrolment-uri", NO_FILE], "--enrolment-uri"),
    case([*AGENT, "--enrolment-uri", TARGET], "--enrolment-uri"),
    case(["device-agent", "run", "--enrolment-uri", URI, *AGENT[4:]], "--enrolment-uri"),
    case(["device-agent", "run", "--enrolment-uri", BAD_URI, *AGENT[6:]], "ca_sha256"),
    # a radio that only refused is not offered (pilot radios come with the pilot deployment)
    case([*AGENT, "--radio", "bleak"], "--radio"),
    # pilots: the pilot's own options, its radio, the radio hub's schedule and clock
    case([*AGENT, "--pilot-agent", "3"], "--pilot-agent"),
    case([*AGENT, "--radio", "bumble", "--hci", "usb:0"], "--radio"),
    case([*AGENT, "--pilots", "1,1"], "--pilots"),
    case([*AGENT, "--pilots", "-1"], "--pilots"),
    case([*RADIO, "--hci", "carrier-pigeon:1"], "--hci"),
    case([*RADIO, "--radio", "bluez"], "--hci is bumble's"),
    case(["device-agent", "radio", "--state-dir", TMP + "/R"], "--hci"),
    case([*RADIO, "--radio", "zigbee"], "--radio"),
    case([*RADIO, "--advertising-interval-ms", "5"], "--advertising-interval-ms"),
    case([*RADIO, "--scan-window-s", "0"], "--scan-window-s"),
    case([*RADIO, "--clock-scale", "1440"], "--clock-scale"),
    case([*RADIO, "--sim-epoch", "0"], "--wall-epoch"),
    case([*RADIO, "--state-dir", UNDER_A_FILE], "--state-dir"),
    case(["device-agent", "trace", "--state-dir", NO_FILE, "--day", "1"], "--state-dir"),
    case(["device-agent", "trace", "--state-dir", TMP, "--day", "-1"], "--day"),
    case(["radio-hub", "--schedule", NO_FILE], NO_FILE),
    case(["radio-hub", "--schedule", BAD_SCHEDULE], "bad_schedule.csv:3: field distance_m"),
    case(["radio-hub", "--schedule", TARGET], "header must be"),
    case(["radio-hub", "--schedule", OVERLAP], "overlapping rows"),
    case([*HUB, "--agents", "a,b"], "--agents"),
    case(["bench", "pilot", "--pilots", "20", "--agents", "10"], "--pilots"),
    case(["bench", "pilot", "--scale", "0"], "--scale"),
    case(
        [
            "pilot",
            "init",
            "--population",
            "synthetic:9",
            "--pilots",
            "1",
            "--days",
            "1",
            "--start",
            "1799049600",
            "--round-at",
            "25:00",
            "--out",
            TMP + "/r.json",
        ],
        "--round-at",
    ),
    case([*HUB, "--loss", "1.5"], "--loss"),
    case([*HUB, "--noise-db", "-1"], "--noise-db"),
    case([*HUB, "--clock-scale", "0"], "--clock-scale"),
    case([*HUB, "--clock-scale", "60"], "--clock-scale"),
    # audit: a missing run dir, a missing or unknown role
    case(["audit", NO_FILE, "--role", "coordinator"], NO_FILE),
    case(["audit", NO_FILE], "--role"),
    case(["audit", NO_FILE, "--role", "auditor"], "--role"),
]


@pytest.fixture
def files(tmp_path: Path, tiny_target: Path) -> dict[str, str]:
    """The placeholder -> path of this test's files."""
    bad = tmp_path / "bad.csv"
    bad.write_text("date,region,cases_week\n2020-01-01,X,3\n2020-01-08,X,x\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    grid, _ = population_cells(from_spec("synthetic:50", seed=0))
    table = BehaviourTable(grid, 7, np.full((1, grid.n_cells, 2), 0.5))
    table.save(tmp_path / "table.json")
    table.save(tmp_path / "bad_table.csv")
    lines = (tmp_path / "bad_table.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",1.5"
    (tmp_path / "bad_table.csv").write_text("\n".join(lines) + "\n")
    header = "year,month,labor_force,employed,unemployed,unemployment_rate\n"
    labour = tmp_path / "labour.csv"
    labour.write_text(header + "".join(f"2020,{m},100,{90 + m},{10 - m},1\n" for m in range(1, 5)))
    bad_labour = tmp_path / "bad_labour.csv"
    bad_labour.write_text(header + "2020,1,100,90,10,10\n2020,2,100,n/a,10,10\n")
    head = "start_s,end_s,a,b,distance_m\n"
    (tmp_path / "schedule.csv").write_text(head + "0,600,0,1,1.0\n")
    (tmp_path / "bad_schedule.csv").write_text(head + "0,600,0,1,1.0\n0,600,1,2,far\n")
    (tmp_path / "overlap.csv").write_text(head + "0,600,0,1,1.0\n300,900,1,0,2.0\n")
    ca = LocalCA.load_or_create(tmp_path / "pki", "test CA")
    uri = EnrolmentURI.make("127.0.0.1:1", "127.0.0.1:2", 3, "t" * 43, ca.cert_pem).to_uri()
    (tmp_path / "uri").write_text(uri)
    (tmp_path / "bad_uri").write_text(re.sub(r"ca_sha256=[0-9a-f]{4}", "ca_sha256=0000", uri))
    return {
        URI: str(tmp_path / "uri"),
        BAD_URI: str(tmp_path / "bad_uri"),
        SCHEDULE: str(tmp_path / "schedule.csv"),
        BAD_SCHEDULE: str(tmp_path / "bad_schedule.csv"),
        OVERLAP: str(tmp_path / "overlap.csv"),
        TARGET: str(tiny_target),
        BAD_FIELD: str(bad),
        NO_FILE: str(tmp_path / "no-such-file"),
        UNDER_A_FILE: str(a_file / "sub"),
        BINARY: str(binary),
        TABLE: str(tmp_path / "table.json"),
        BAD_TABLE: str(tmp_path / "bad_table.csv"),
        LABOUR: str(labour),
        BAD_LABOUR: str(bad_labour),
        TMP: str(tmp_path),
    }


def _fill(items: list[str], files: dict[str, str]) -> list[str]:
    filled = []
    for item in items:
        for placeholder, path in files.items():
            item = item.replace(placeholder, path)
        filled.append(item)
    return filled


@pytest.fixture(autouse=True)
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A case that passed validation by mistake fails at once instead of starting a
    federation, Ray or an enrolment."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input was accepted: a run started")

    monkeypatch.setattr(federated_command, "federated_run", must_not_run)
    monkeypatch.setattr(bench_federated, "federated_run", must_not_run)
    monkeypatch.setattr(bench_secaggplus, "secaggplus_rounds", must_not_run)
    monkeypatch.setattr(bench_secaggplus, "decentsim_rounds", must_not_run)
    monkeypatch.setattr(device_agent_command, "run_pool", must_not_run)


@pytest.mark.parametrize(("argv", "names"), CASES)
def test_bad_input_is_one_line_naming_it(
    argv: list[str], names: str, files: dict[str, str], cli: Callable[..., Outcome]
) -> None:
    argv, names = _fill(argv, files), _fill([names], files)[0]
    done = cli(*argv)
    line = done.error_line()
    command = " ".join(argv[:2] if argv[0] in {"bench", "federated"} else argv[:1])
    assert line.startswith(f"decentsim {command}"), line
    assert names in line, line
    assert done.status == 2, line
    assert done.out == ""


#: a few cases end to end, through `python -m decentsim`
PROCESS_CASES = [
    case(["federated", "run", "--population", "synthetic:3", "--pools", "5"], "--pools"),
    case([*SIM, "--lockdown", "work:x:0.5"], "--lockdown"),
    case([*CAL, "--target", BAD_FIELD], "bad.csv:3"),
    case([*B_BLE, "--contacts", "0"], "--contacts"),
    case([*B_SUM, "--devices-per-participant", "3"], "--devices-per-participant"),
    # these two pass the checks before a server or an agent starts logging to its state dir,
    # which in this process would configure the test run's root logger
    case([*A_SERVE, "--coordinator-export", NO_FILE], NO_FILE),
    case([*AGENT, "--population", "synthetic:abc"], "--population"),
]


@pytest.mark.parametrize(("argv", "names"), PROCESS_CASES)
def test_bad_input_as_a_process(
    argv: list[str], names: str, files: dict[str, str], process: Callable[..., Outcome]
) -> None:
    done = process(*_fill(argv, files))
    line = done.error_line()
    assert _fill([names], files)[0] in line, line
    assert done.status == 2, done.err
    assert done.out == ""


@pytest.mark.parametrize(
    ("path", "model", "status", "names"),
    [
        # a base URL without /v1: HTTP 404, no chat-completions endpoint there
        ("", "rule", 2, "--llm-url: {url}/chat/completions: HTTP 404"),
        # an answer that is not a chat completion's
        ("/v1", "rule-malformed", 2, "--llm-url: {url}/chat/completions: choice 0"),
        ("/v1", "rule-html", 2, "--llm-url: {url}/chat/completions: HTTP 200 answer is not JSON"),
        # HTTP 500 after the retries: the run failed (exit 1), the URL named
        ("/v1", "rule-500", 1, "{url}/chat/completions: HTTP 500"),
    ],
)
def test_an_endpoint_that_is_not_compliant_is_named(
    path: str,
    model: str,
    status: int,
    names: str,
    cli: Callable[..., Outcome],
    rule_backend,
    tmp_path: Path,
) -> None:
    """Against the rule backend (a deterministic OpenAI-compatible server, not a language
    model) made to misbehave."""
    url = rule_backend.base_url.removesuffix("/v1") + path
    done = cli(
        *SIM, "--behaviour", "llm", "--llm-url", url, "--llm-model", model,
        "--llm-retries", "1", "--llm-cache", str(tmp_path / "cache"),
    )  # fmt: skip
    line = done.error_line()
    assert line.startswith("decentsim simulate: ") and names.format(url=url) in line, line
    assert done.status == status and done.out == ""
