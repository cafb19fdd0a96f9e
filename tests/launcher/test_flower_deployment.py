"""The Flower deployment path on loopback (docs/flower.md): ``flower-superlink`` serving TLS
with SuperNode authentication, two ``flower-supernode`` device pools, the aggregator, and the
coordinator's ServerApp started by ``flwr run deploy/flower`` — its aggregates must equal a
gRPC federation's exactly.

Flower 1.41's SuperNode polls every 3 s and starts a fresh ``flwr-clientapp`` process per
message, so each tunnel exchange takes ~6 s whatever the machine: the run is kept to
:data:`DAYS` days, and the gRPC reference runs alongside it.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contract.runspec import RunSpec, RunSpecError
from launcher.federation import Federation, items_budget
from sim.populations import from_spec

if importlib.util.find_spec("flwr") is None:  # the decentsim[flower] extra
    pytest.skip("Flower is not installed", allow_module_level=True)

from coordinator.flower_app import FlowerAppConfigError, PromptGrid, server_config
from launcher.flower_deploy import write_loopback_tls, write_node_key
from transport.flower.env import quiet_flower_env

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
POPULATION = "synthetic:400"
POOLS = 2
SEED = 11
DAYS = 1
THETA = {"beta": 0.6, "mortality": 0.5, "init_frac": 0.05}
#: seconds for the whole Flower run (≈ 10 exchanges per day at ~6 s each, plus enrolment)
RUN_TIMEOUT_S = 240.0


def make_spec(seed: int, days: int) -> RunSpec:
    """A small run: ideal radio, two pools (as tests/device_agent/test_flower.py)."""
    return RunSpec(
        population=POPULATION,
        days=days,
        seed=seed,
        mode="mailbox",
        theta=dict(THETA),
        items_per_device=items_budget(from_spec(POPULATION, seed=seed), POOLS),
        advertising_intervals=4,
        radio="ideal",
        pools=POOLS,
        step_timeout_s=60.0,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (``None``: gone), to tell it from a reused pid."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


def _descendants(pid: int) -> list[tuple[int, int]]:
    """``(pid, start time)`` of every living descendant of ``pid`` (Flower's SuperExec,
    flwr-serverapp, flwr-clientapp)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            start = _start_time(child)
            if start is not None:
                out.append((child, start))
            todo.append(child)
    return out


def _signal(processes: list[tuple[int, int]], sig: signal.Signals) -> None:
    for pid, start in processes:
        if _start_time(pid) == start:  # still the process we started, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


class _Processes:
    """The Flower processes this test starts, each logging to ``logs/<name>.log``."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def check_alive(self, *names: str) -> None:
        for name in names:
            code = self.procs[name].poll()
            assert code is None, f"{name} exited with {code}: {self.log(name)[-1500:]}"

    def stop(self) -> None:
        """SIGTERM every process and its descendants; SIGKILL what outlives 10 s."""
        # Flower's own children first: a SuperExec outlives its parent by up to a poll
        descendants = [d for p in self.procs.values() for d in _descendants(p.pid)]
        _signal(descendants, signal.SIGTERM)
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _signal(descendants, signal.SIGKILL)


def _flwr(env: dict[str, str], *args: str) -> dict:
    """Run the ``flwr`` CLI with ``--format json``; its JSON answer."""
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"flwr {args[:2]} failed: {done.stdout}{done.stderr}"
    return json.loads(done.stdout)


def _wait_listening(port: int, procs: _Processes, name: str) -> None:
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            procs.check_alive(name)
            assert time.time() < deadline, f"{name} not listening on {port} after 60 s"
            time.sleep(0.1)


def _assert_tls_only(port: int, ca: Path) -> None:
    """The SuperLink speaks TLS only, with the loopback CA's certificate for 127.0.0.1."""
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((ConnectionError, http.client.BadStatusLine)):
        plain.request("GET", "/")
        plain.getresponse()
    plain.close()
    trusted = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        trusted.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        subject = dict(item for rdn in tls.getpeercert()["subject"] for item in rdn)
        assert subject["commonName"] == "flower-superlink"
    # a client that does not trust the loopback CA refuses the certificate
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


# -- deployment material and the ServerApp's run config (no Flower processes) -----------------
def test_loopback_tls_certificate_is_issued_by_its_ca_for_loopback(tmp_path: Path) -> None:
    paths = write_loopback_tls(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    key = serialization.load_pem_private_key(paths["key"].read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert paths["key"].stat().st_mode & 0o077 == 0


def test_node_key_is_an_openssh_p256_pair(tmp_path: Path) -> None:
    private, public = write_node_key(tmp_path, "pool-0")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert private.stat().st_mode & 0o077 == 0
    other, _ = write_node_key(tmp_path, "pool-1")
    assert other.read_bytes() != private.read_bytes()


def test_run_config_becomes_the_server_config_and_bad_keys_are_named(tmp_path: Path) -> None:
    spec = make_spec(3, 2)
    run_json = tmp_path / "run.json"
    run_json.write_text(spec.to_json())
    good = {
        "state-dir": str(tmp_path),
        "aggregator": "127.0.0.1:5000",
        "aggregator-export": str(tmp_path / "export"),
        "run-json": str(run_json),
        "node-wait-s": 30.0,
    }
    config = server_config(good)
    assert (config.state_dir, config.aggregator, config.node_wait_s) == (
        tmp_path,
        "127.0.0.1:5000",
        30.0,
    )
    assert config.spec == spec and config.aggregator_export == tmp_path / "export"
    assert server_config({**good, "run-json": ""}).spec is None  # resume the stored run
    bad = [
        ({"state-dir": ""}, "'state-dir' is not set"),
        ({"state-dir": "coordinator"}, "'state-dir' must be an absolute path"),
        ({"state-dir": str(tmp_path / "missing")}, "does not exist"),
        ({"aggregator": "5000"}, "'aggregator' must be HOST:PORT"),
        ({"run-json": str(tmp_path / "none.json")}, "is not a file"),
        ({"node-wait-s": 0.0}, "'node-wait-s' must be > 0"),
        ({"node-wait-s": True}, "'node-wait-s' must be > 0"),
        ({"state_dir": str(tmp_path)}, r"unknown key\(s\) \['state_dir'\]"),
    ]
    for change, message in bad:
        with pytest.raises(FlowerAppConfigError, match=message):
            server_config({**good, **change})
    run_json.write_text('{"days": 2, "colour": "red"}')
    with pytest.raises(RunSpecError, match="unknown field"):
        server_config(good)


class _FakeGrid:
    """Replies to message ``i`` on the ``i``-th pull (message ``"lost"`` never)."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages: list[str]) -> list[str]:
        return list(messages)

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        due = [i for i in sorted(ids) if i != "lost" and int(i) <= self.pulls]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in due]


def test_prompt_grid_collects_replies_as_they_come_and_stops_at_the_timeout() -> None:
    grid = _FakeGrid()
    replies = PromptGrid(grid, poll_s=0.01).send_and_receive(["1", "3"], timeout=None)
    assert [r.metadata.reply_to_message_id for r in replies] == ["1", "3"]
    assert grid.pulls == 3  # no pull after the last reply
    grid = _FakeGrid()
    start = time.monotonic()
    replies = PromptGrid(grid, poll_s=0.01).send_and_receive(["1", "lost"], timeout=0.2)
    waited = time.monotonic() - start
    assert [r.metadata.reply_to_message_id for r in replies] == ["1"]
    assert grid.pulls >= 2 and 0.2 <= waited < 5.0  # kept pulling until the timeout, then gave up


# -- the deployment ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_flower_deployment_with_tls_and_node_auth_equals_grpc(tmp_path: Path) -> None:
    spec = make_spec(SEED, DAYS)
    fed = Federation(tmp_path / "flower" / "state", spec, SEED)
    ref = Federation(tmp_path / "grpc" / "state", spec, SEED)
    env = quiet_flower_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # Flower starts flower-superexec & co.
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")  # the CLI's connections and installed apps
    env["OMP_NUM_THREADS"] = "1"
    procs = _Processes(tmp_path / "logs", env)
    try:
        ref.start()  # the gRPC reference runs while the Flower processes start and poll
        fed.prepare()
        fed.start_aggregator()
        tls = write_loopback_tls(tmp_path / "tls")
        port = _free_port()
        procs.spawn(
            "superlink",
            [str(BIN / "flower-superlink"),
             "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
             "--ssl-keyfile", str(tls["key"]), "--host", "127.0.0.1", "--port", str(port),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        _wait_listening(port, procs, "superlink")
        _assert_tls_only(port, tls["ca"])
        home = Path(env["FLWR_HOME"])
        home.mkdir(exist_ok=True)  # the SuperLink may have created it
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{tls["ca"]}"\n'
        )
        keys = [write_node_key(tmp_path / "keys", f"pool-{i}") for i in range(POOLS)]
        for _, public in keys:
            assert _flwr(env, "supernode", "register", str(public))["success"]
        rogue_key, _ = write_node_key(tmp_path / "keys", "rogue")  # never registered
        for i, (private, _) in enumerate([*keys, (rogue_key, None)]):
            name = f"supernode-{i}" if i < POOLS else "rogue"
            node_config = (
                f'state-dir="{fed.root / f"pool-{i}"}" population="{spec.population}" '
                f'population-seed={SEED} slice="{min(i, POOLS - 1)}/{POOLS}" '
                f'world-secret="{fed.world_secret}"'
            )
            procs.spawn(
                name,
                [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                 "--root-certificates", str(tls["ca"]), "--port", str(_free_port()),
                 "--auth-supernode-private-key", str(private), "--node-config", node_config,
                 # the rogue gives up soon, and starts no SuperExec that would outlive it
                 *(["--max-retries", "2", "--isolation", "process"] if name == "rogue" else [])],
            )  # fmt: skip
        run_config = (
            f'state-dir="{fed.c_dir}" aggregator="127.0.0.1:{fed.a_port}" '
            f'aggregator-export="{fed.a_dir / "export"}" run-json="{fed.root / "run.json"}" '
            "node-wait-s=60.0"
        )
        started = _flwr(env, "run", str(REPO / "deploy" / "flower"), "--run-config", run_config)
        assert started["success"] and started["fab-id"] == "decentsim/decentsim-flower"
        run_id = started["run-id"]

        deadline = time.time() + RUN_TIMEOUT_S
        while not fed.finished():
            procs.check_alive("superlink", "supernode-0", "supernode-1")
            fed.check_alive()
            assert time.time() < deadline, f"{fed.committed()} of {DAYS} days in time"
            time.sleep(0.5)
        # the ServerApp itself ends cleanly after telling the nodes the run is over
        while (status := _flwr(env, "list", "--run-id", run_id)["runs"][0]["status"]) in (
            "pending",
            "starting",
            "running",
        ):
            assert time.time() < deadline, f"run {run_id} still {status}"
            time.sleep(1.0)
        assert status == "finished:completed", procs.log("superlink")[-2000:]
        ref.wait(timeout_s=RUN_TIMEOUT_S)
    finally:
        procs.stop()
        fed.stop()
        ref.stop()

    flower, grpc_run = fed.results(), ref.results()
    assert flower["y"].shape[0] == DAYS
    assert flower["y"][..., 0].sum() > 0, "a run without infections proves little"
    np.testing.assert_array_equal(flower["y"], grpc_run["y"])
    for key in ("loss", "grad", "bytes_device_to_servers"):
        assert flower[key] == grpc_run[key], key
    # a SuperNode whose key was never registered is refused by the SuperLink
    assert procs.procs["rogue"].returncode not in (None, 0)
    assert "Failed to activate SuperNode" in procs.log("rogue")
