"""``decentsim coordinator …`` and ``decentsim aggregator …``: the two server processes.

Both run until SIGTERM/SIGINT (the coordinator may also exit once its run is finished), log
to ``<state-dir>/<role>.log`` (events and counts, never a value, share or key) and write the
port(s) they listen on to ``<state-dir>/port`` (so ``--listen 127.0.0.1:0`` works; the
coordinator writes its gateway port and then its enrolment port).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from contract.runspec import MODES, RunSpec, RunSpecError
from contract.transcript import TranscriptError
from decentsim.commands.common import add_dp_arguments
from decentsim.usage import CommandFailed, UsageError, int_in, nonnegative_int
from identity.enrolment import MAX_TOKENS_PER_MINT
from identity.secret_files import SecretFileError, write_secret
from transport.grpc.channels import InsecureAddressError, warn_insecure


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, required=True, help="identity, database, views")
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="DNS name / IP the TLS server certificate covers (repeatable; default loopback)",
    )


INSECURE_HELP = "DEBUGGING ONLY: no TLS, identities unproven (a loud warning is printed)"
AUDIT_KEY_HELP = (
    "this server's own auditor's X25519 public key (<role>-auditor.pub, hex): record every "
    "message in and out in views/<role>.transcript, each record sealed to it (docs/audit.md)"
)


def _hostnames(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.hostname) or ("localhost", "127.0.0.1")


def _log_to(state_dir: Path, role: str) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    logging.basicConfig(
        filename=state_dir / f"{role}.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _wait_for_signal(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _write_port(state_dir: Path, *ports: int) -> None:
    """``<state-dir>/port``: the listening port(s), space-separated (written atomically)."""
    tmp = state_dir / ".port.tmp"
    tmp.write_text(" ".join(map(str, ports)))
    tmp.replace(state_dir / "port")


# -- coordinator ------------------------------------------------------------------------------
def add_coordinator_arguments(p: argparse.ArgumentParser) -> None:
    """``coordinator init | tokens | serve``."""
    sub = p.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="create the coordinator's CA, certificates and keys")
    _common(init)
    tokens = sub.add_parser("tokens", help="mint single-use enrolment tokens (one per line)")
    _common(tokens)
    tokens.add_argument(
        "--count",
        type=int_in(1, MAX_TOKENS_PER_MINT),
        required=True,
        help=f"tokens to mint (1..{MAX_TOKENS_PER_MINT:,})",
    )
    tokens.add_argument("--out", type=Path, help="write them here (0600) instead of stdout")
    serve = sub.add_parser("serve", help="serve devices and drive the run's rounds")
    _common(serve)
    serve.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT of the mTLS gateway")
    serve.add_argument(
        "--enrol-listen", default="127.0.0.1:0", help="HOST:PORT of enrolment (server TLS)"
    )
    serve.add_argument("--run", type=Path, help="RUN.json (omit to resume the stored run)")
    serve.add_argument("--aggregator", required=True, help="HOST:PORT of the aggregator link")
    serve.add_argument(
        "--aggregator-export",
        type=Path,
        required=True,
        help="the aggregator's export dir (ca.pem, aggregator_public.json)",
    )
    serve.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    serve.add_argument(
        "--exit-when-finished",
        action="store_true",
        help="exit a few seconds after the run is finished (devices see it first)",
    )
    serve.add_argument("--audit-key", type=Path, help=AUDIT_KEY_HELP)


def _read_run(path: Path) -> RunSpec:
    """The run of ``--run RUN.json``."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--run {str(path)!r}: cannot read it ({e.strerror})") from None
    try:
        return RunSpec.from_json(text, str(path))
    except RunSpecError as e:  # names the file and the field
        raise UsageError(f"--run: {e}") from None


def run_coordinator(args: argparse.Namespace) -> int:
    """Run a ``coordinator`` action."""
    from coordinator.service import CoordinatorService, ServiceError, coordinator_init

    try:
        if args.action == "init":
            export = coordinator_init(args.state_dir, _hostnames(args))
            print(f"coordinator identity in {args.state_dir}; share {export} with the aggregator")
            return 0
        if args.action == "tokens":
            from identity.enrolment import EnrolmentRegistry
            from identity.pki import LocalCA

            coordinator_init(args.state_dir, _hostnames(args))
            ca = LocalCA.load_or_create(args.state_dir / "pki", "decentsim coordinator CA")
            with EnrolmentRegistry(args.state_dir / "enrolment.sqlite3", ca) as registry:
                minted = registry.mint_tokens(args.count, dt.timedelta(days=7))
            text = "\n".join(minted) + "\n"
            if args.out:
                write_secret(args.out, text.encode())
            else:
                sys.stdout.write(text)
            return 0
        spec = _read_run(args.run) if args.run else None
        _log_to(args.state_dir, "coordinator")
        if args.insecure:
            warn_insecure("coordinator")
        service = CoordinatorService(
            args.state_dir,
            spec,
            args.aggregator,
            args.aggregator_export,
            _hostnames(args),
            insecure=args.insecure,
            audit_key=args.audit_key,
        )
    # each names the file, directory or option that is wrong
    except (ServiceError, SecretFileError, TranscriptError, InsecureAddressError, OSError) as e:
        raise UsageError(str(e)) from None
    stop = threading.Event()
    _wait_for_signal(stop)
    try:
        port, enrol_port = service.serve(args.listen, args.enrol_listen)
    except InsecureAddressError as e:
        service.stop()
        raise UsageError(str(e)) from None
    except ServiceError as e:  # cannot listen: the address is taken or not this machine's
        service.stop()
        raise CommandFailed(str(e)) from None
    _write_port(args.state_dir, port, enrol_port)
    logging.getLogger(__name__).info("coordinator serving on %d, enrolment on %d", port, enrol_port)
    while not stop.is_set():
        if service.failure or (args.exit_when_finished and service.finished.is_set()):
            time.sleep(3.0)  # let every device's long poll see "finished" or "failed"
            break
        stop.wait(0.5)
    service.stop()
    if service.failure:
        raise CommandFailed(f"the run failed: {service.failure}")
    return 0


# -- aggregator -------------------------------------------------------------------------------
def add_aggregator_arguments(p: argparse.ArgumentParser) -> None:
    """``aggregator init | serve``."""
    sub = p.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="create the aggregator's CA, certificate and keys")
    _common(init)
    serve = sub.add_parser("serve", help="serve the coordinator's mutual-TLS link")
    _common(serve)
    serve.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT of the link")
    serve.add_argument("--mode", default="mailbox", choices=MODES)
    serve.add_argument(
        "--coordinator-export",
        type=Path,
        required=True,
        help="the coordinator's export dir (ca.pem, coordinator_public.json)",
    )
    serve.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    serve.add_argument("--audit-key", type=Path, help=AUDIT_KEY_HELP)
    serve.add_argument(
        "--min-cohort",
        type=nonnegative_int,
        default=0,
        help="release pseudonym slots with fewer summands as zeros (must equal the run's)",
    )
    add_dp_arguments(serve)


def run_aggregator(args: argparse.Namespace) -> int:
    """Run an ``aggregator`` action."""
    from aggregator.service import AggregatorError, AggregatorService, aggregator_init
    from decentsim.commands.common import dp_config
    from protocols.secure_sum import Mode

    try:
        if args.action == "init":
            export = aggregator_init(args.state_dir, _hostnames(args))
            print(f"aggregator identity in {args.state_dir}; share {export} with the coordinator")
            return 0
        dp = (
            None
            if args.dp_sigma is None
            else dp_config(args.dp_sigma, args.dp_delta, args.dp_sensitivity)
        )
        _log_to(args.state_dir, "aggregator")
        if args.insecure:
            warn_insecure("aggregator")
        service = AggregatorService(
            args.state_dir,
            Mode(args.mode),
            args.coordinator_export,
            _hostnames(args),
            insecure=args.insecure,
            audit_key=args.audit_key,
            min_cohort=args.min_cohort,
            dp=dp,
        )
    # each names the file, directory or option that is wrong
    except (AggregatorError, SecretFileError, TranscriptError, InsecureAddressError, OSError) as e:
        raise UsageError(str(e)) from None
    stop = threading.Event()
    _wait_for_signal(stop)
    try:
        port = service.serve(args.listen)
    except InsecureAddressError as e:
        service.stop()
        raise UsageError(str(e)) from None
    except AggregatorError as e:  # cannot listen: the address is taken or not this machine's
        service.stop()
        raise CommandFailed(str(e)) from None
    _write_port(args.state_dir, port)
    logging.getLogger(__name__).info("aggregator serving on port %d", port)
    stop.wait()
    service.stop()
    return 0
