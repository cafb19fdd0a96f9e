"""A pilot device runs ``decentsim device-agent run`` without any server code or the servers'
dependencies: device-agent processes started with those packages made unimportable (a
``sitecustomize`` that refuses them, as on a device where ``pip install decentsim[device]`` never
installed them) take part in a real federation to its end. ``make lint`` checks the same
statically (the ``device`` and ``device-install`` contracts of pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.federation import Federation, make_spec
from sim.populations import from_spec
from sim.runner import CentralSimulator

#: what a device never imports: the servers, the launcher, the audit, the benchmarks, and
#: the dependencies only those need
NOT_ON_A_DEVICE = (
    "coordinator",
    "aggregator",
    "launcher",
    "audit",
    "bench",
    "flwr",
    "ray",
    "dp_accounting",
    "scipy",
    "matplotlib",
)
SITECUSTOMIZE = f"""
import importlib.abc
import sys

NOT_ON_A_DEVICE = {NOT_ON_A_DEVICE!r}


class NotOnADevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in NOT_ON_A_DEVICE:
            raise ImportError(f"{{name}} is not installed on a pilot device")
        return None


sys.meta_path.insert(0, NotOnADevice())
"""


@pytest.fixture
def device_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that cannot import what a device lacks."""
    site = tmp_path / "device-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }


def test_the_blocker_blocks(device_env: dict[str, str]) -> None:
    """The control: in that environment a server module does not import."""
    done = subprocess.run(
        [sys.executable, "-c", "import coordinator.service"],
        env=device_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "not installed on a pilot device" in done.stderr


def test_device_agent_help_needs_no_server_code(device_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", "device-agent", "run", "--help"],
        env=device_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--coordinator" in done.stdout


@pytest.mark.slow
def test_devices_without_server_code_complete_a_federation(
    tmp_path: Path, device_env: dict[str, str]
) -> None:
    theta = {"beta": 0.6, "mortality": 0.01, "init_frac": 0.05}
    spec = make_spec(
        "synthetic:300", 3, population_seed=8, pools=2, seed=8, theta=theta, step_timeout_s=60
    )
    fed = Federation(tmp_path / "state", spec, 8)
    try:
        fed.start_servers()
        fed.env = device_env  # only the pools run as devices
        for i in range(spec.pools):
            fed.start_pool(i)
        fed.wait(timeout_s=240)
        results = fed.results()
    finally:
        fed.stop()
    for i in range(spec.pools):
        log = (fed.pool_dirs[i] / "stderr.log").read_text()
        assert "not installed on a pilot device" not in log, log[-2000:]
    central = CentralSimulator(
        from_spec(spec.population, seed=8), spec.model_config(), 8, dtype=torch.float64
    ).run(spec.theta_object(), spec.days, "forward")
    np.testing.assert_array_equal(
        results["y"][..., 0].sum(-1)[:, 0], central.new_infections.numpy()
    )
