"""The committed generated code is exactly what the .proto sources generate (`make proto`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proto import generate


def test_committed_generated_code_matches_the_sources() -> None:
    problems = generate.drift()
    assert problems == [], "generated code drifted from the .proto sources:\n" + "\n".join(problems)


def test_every_source_has_its_generated_files_committed() -> None:
    names = {p.name for p in generate.committed_generated_files()}
    for src in generate.sources():
        for suffix in generate.GENERATED_SUFFIXES:
            assert src.stem + suffix in names
    assert {s.name for s in generate.sources()} == {
        "aggregator.proto",
        "common.proto",
        "device.proto",
    }


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the proto tree (sources and committed code) under a temporary root."""
    shutil.copytree(generate.ROOT / generate.SOURCE_DIR, tmp_path / generate.SOURCE_DIR)
    return tmp_path


def test_drift_detects_an_edited_source_a_hand_edit_and_a_stale_file(checkout: Path) -> None:
    src_dir = checkout / generate.SOURCE_DIR
    assert generate.drift(checkout) == []
    # a source change without regenerating
    common = src_dir / "common.proto"
    common.write_text(
        common.read_text().replace("message DeviceId {", "message DeviceId {\n  uint32 x = 9;")
    )
    # a hand edit of generated code
    grpc_file = src_dir / "device_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text() + "\n# edited\n")
    # generated code whose source is gone
    (src_dir / "old_pb2.py").write_text("# stale\n")
    assert generate.drift(checkout) == [
        "differs: proto/decentsim/v1/common_pb2.py (run `make proto`)",
        "differs: proto/decentsim/v1/common_pb2.pyi (run `make proto`)",
        "differs: proto/decentsim/v1/device_pb2_grpc.py (run `make proto`)",
        "stale: proto/decentsim/v1/old_pb2.py has no .proto source (delete it)",
    ]


def test_generate_rewrites_what_drift_reports(checkout: Path) -> None:
    src_dir = checkout / generate.SOURCE_DIR
    (src_dir / "aggregator_pb2.py").unlink()
    assert generate.drift(checkout) == [
        "missing: proto/decentsim/v1/aggregator_pb2.py (run `make proto`)"
    ]
    written = generate.generate(checkout, checkout)
    assert Path("proto/decentsim/v1/aggregator_pb2.py") in written
    assert generate.drift(checkout) == []


def test_protoc_errors_are_reported(checkout: Path) -> None:
    bad = checkout / generate.SOURCE_DIR / "broken.proto"
    bad.write_text('syntax = "proto3";\npackage decentsim.v1;\nmessage Broken { nope x = 1; }\n')
    with pytest.raises(generate.ProtoGenerationError, match=r"protoc failed \(1\):.*nope"):
        generate.generate(checkout / "out", checkout)
