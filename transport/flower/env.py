"""Flower runs here with telemetry and its update check off (a privacy product phones nobody),
and so does Ray under Flower's simulation engine.

Flower reads ``FLWR_TELEMETRY_ENABLED`` once, when ``flwr`` is first imported, so every module
of this project that uses Flower imports it through :func:`import_flwr`, which sets the
environment first (child processes — Ray workers, ``flower-superlink``/``flower-supernode`` —
inherit it). ``make`` exports the same variables.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

#: what every Flower process of this project runs with
FLOWER_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Flower's simulation engine runs on Ray, which has usage statistics of its own
    "RAY_USAGE_STATS_ENABLED": "0",
    # keep Ray's behaviour with num_gpus=0 and silence its warning about changing it
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


log = logging.getLogger(__name__)


class FlowerUnavailable(RuntimeError):
    """Flower is not installed (the ``decentsim[flower]`` extra) or was imported too early."""


def quiet_flower_env() -> dict[str, str]:
    """Set :data:`FLOWER_ENV` in this process's environment; return a copy of the environment
    for child processes."""
    os.environ.update(FLOWER_ENV)
    return dict(os.environ)


def import_flwr() -> ModuleType:
    """Import ``flwr`` with telemetry off.

    Raises:
        FlowerUnavailable: ``flwr`` is missing, or something imported it before with
            telemetry on (its setting is frozen at first import).
    """
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None and getattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0") != "0":
        raise FlowerUnavailable(
            "flwr was imported before decentsim could turn its telemetry off; import Flower "
            "through transport.flower.env.import_flwr() or set FLWR_TELEMETRY_ENABLED=0"
        )
    quiet_flower_env()
    try:
        return importlib.import_module("flwr")
    except ImportError as err:
        raise FlowerUnavailable(
            "Flower is not installed: pip install 'decentsim[flower]' (flwr[simulation]==1.41.0)"
        ) from err


#: attempts at starting Ray: its raylet must register within a hard-coded 30 s, which a loaded
#: 2-core machine can miss
RAY_START_ATTEMPTS = 3


def start_ray(cpus: int) -> None:
    """Start a local Ray for Flower's simulation engine (which uses a running one as is).

    Flower would start Ray itself, once; starting it here retries a start that timed out.
    Workers get this process's ``sys.path`` (as Flower gives them) so they import the project.
    """
    quiet_flower_env()
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(
                num_cpus=cpus,
                num_gpus=0,
                include_dashboard=False,
                logging_level=logging.ERROR,
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            )
            return
        except Exception as err:
            ray.shutdown()
            if attempt == RAY_START_ATTEMPTS:
                raise FlowerUnavailable(f"Ray did not start ({attempt} attempts): {err}") from err
            log.warning("Ray did not start (%s); retrying", err)
