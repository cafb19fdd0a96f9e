"""The layering contracts of ``pyproject.toml`` (``make lint`` runs them): they hold on this tree,
and each one fails when an upward import, a server import from the device agent, or a cycle
is planted in a copy of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
PACKAGES = CONFIG["root_packages"]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the packages of ``tree`` (they shadow the installed ones)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--no-logo"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the source packages and pyproject.toml."""
    root = tmp_path_factory.mktemp("tree")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def test_the_contracts_cover_every_package() -> None:
    layers = next(c for c in CONFIG["contracts"] if c["id"] == "layers")["layers"]
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    found = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert layered == set(PACKAGES) == found


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(CONFIG['contracts'])} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    ("files", "broken"),
    [
        # the model importing a server: an upward import across every layer
        ({"sim/_planted.py": "import coordinator.service\n"}, "Layers"),
        # the shared contract importing the transport above it
        ({"contract/_planted.py": "from transport.grpc import gateway\n"}, "Layers"),
        # the aggregator importing the coordinator: siblings must stay independent
        ({"aggregator/_planted.py": "import coordinator.service\n"}, "Layers"),
        # the device agent importing a server module
        ({"device_agent/_planted.py": "import aggregator.service\n"}, "device agent imports"),
        # the device's entry point needing Flower
        ({"device_agent/pool_extra.py": "import flwr\n"}, None),
        # a cycle between two modules of one package
        ({"audit/_a.py": "import audit._b\n", "audit/_b.py": "import audit._a\n"}, "cycles"),
    ],
)
def test_a_planted_import_breaks_its_contract(
    tree: Path, files: dict[str, str], broken: str | None
) -> None:
    for name, source in files.items():
        (tree / name).write_text(source)
    if broken is None:  # reached from the device's entry point: device_agent.pool imports it
        pool = tree / "device_agent" / "pool.py"
        original = pool.read_text()
        pool.write_text(original + "\nimport device_agent.pool_extra  # noqa: E402\n")
        broken = "needs none of the servers"
    try:
        done = lint(tree)
    finally:
        for name in files:
            (tree / name).unlink()
        if broken == "needs none of the servers":
            pool.write_text(original)
    assert done.returncode != 0, done.stdout
    failed = done.stdout.split("Broken contracts", 1)[-1]
    assert broken in failed, done.stdout
