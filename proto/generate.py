"""Regenerate (or check) the Python code of the wire protocol from the ``.proto`` sources.

    python -m proto.generate            # rewrite the committed *_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python -m proto.generate --check    # exit 1 and name the files that differ (CI, drift test)

protoc runs with the project root as its only source root (``-I .``), so a source at
``proto/decentsim/v1/device.proto`` imports ``"proto/decentsim/v1/common.proto"`` and the
generated code imports ``from proto.decentsim.v1 import common_pb2`` — an absolute import that
works from an installed package and from a checkout, with no post-processing of the output.
The output is a pure function of the sources and the grpcio-tools version, which is pinned
(``GRPC_TOOLS_VERSION``) because its bundled protoc writes its version into the files.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

#: the project root (protoc's -I root and default output directory)
ROOT = Path(__file__).resolve().parent.parent
#: where the sources of package decentsim.v1 live, relative to ROOT
SOURCE_DIR = Path("proto/decentsim/v1")
#: the grpcio-tools release the committed code was generated with
GRPC_TOOLS_VERSION = "1.81.1"
#: what protoc writes for each source ``X.proto``
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtoGenerationError(RuntimeError):
    """protoc failed, or the installed grpcio-tools is not the pinned version."""


def sources(root: Path = ROOT) -> list[Path]:
    """The ``.proto`` sources, relative to ``root``, in a fixed (sorted) order."""
    return sorted(p.relative_to(root) for p in (root / SOURCE_DIR).glob("*.proto"))


def generated_files(root: Path = ROOT) -> list[Path]:
    """The generated files the sources produce, relative to ``root``, sorted."""
    return sorted(
        src.with_name(src.stem + suffix) for src in sources(root) for suffix in GENERATED_SUFFIXES
    )


def committed_generated_files(root: Path = ROOT) -> list[Path]:
    """Generated-looking files present in the source directory (including stale ones)."""
    found = {
        p.relative_to(root)
        for suffix in GENERATED_SUFFIXES
        for p in (root / SOURCE_DIR).glob("*" + suffix)
    }
    return sorted(found)


def _check_tools_version() -> None:
    try:
        installed = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError as err:
        raise ProtoGenerationError(
            f"grpcio-tools is not installed; install grpcio-tools=={GRPC_TOOLS_VERSION}"
        ) from err
    if installed != GRPC_TOOLS_VERSION:
        raise ProtoGenerationError(
            f"grpcio-tools {installed} is installed but the committed code is generated with "
            f"{GRPC_TOOLS_VERSION}; install grpcio-tools=={GRPC_TOOLS_VERSION}"
        )


def generate(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Run protoc on every source of ``root``, writing under ``out_dir``.

    Returns the generated files, relative to ``out_dir``.

    Raises:
        ProtoGenerationError: wrong grpcio-tools version, no sources, or protoc failed.
    """
    _check_tools_version()
    srcs = sources(root)
    if not srcs:
        raise ProtoGenerationError(f"no .proto sources under {root / SOURCE_DIR}")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = str(out_dir.resolve())
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(s.as_posix() for s in srcs),
    ]
    # cwd=root with relative paths: file names recorded in the descriptors never depend on
    # where the checkout lives
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ProtoGenerationError(f"protoc failed ({proc.returncode}): {proc.stderr.strip()}")
    made = generated_files(root)
    missing = [p for p in made if not (out_dir / p).is_file()]
    if missing:
        raise ProtoGenerationError(f"protoc did not write {', '.join(map(str, missing))}")
    return made


def drift(root: Path = ROOT) -> list[str]:
    """Regenerate into a temporary directory and compare with the committed files.

    Returns one line per problem (a generated file missing, different, or stale); empty when
    the committed code is exactly what the sources generate.
    """
    with tempfile.TemporaryDirectory(prefix="decentsim-proto-") as tmp:
        fresh_dir = Path(tmp)
        expected = generate(fresh_dir, root)
        problems = []
        for rel in expected:
            committed = root / rel
            if not committed.is_file():
                problems.append(f"missing: {rel} (run `make proto`)")
            elif not filecmp.cmp(committed, fresh_dir / rel, shallow=False):
                problems.append(f"differs: {rel} (run `make proto`)")
        for rel in committed_generated_files(root):
            if rel not in expected:
                problems.append(f"stale: {rel} has no .proto source (delete it)")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate in place, or ``--check`` for drift (exit status 1)."""
    parser = argparse.ArgumentParser(prog="python -m proto.generate", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed generated code differs from the sources",
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    for rel in generate(ROOT):
        print(f"wrote {rel}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
