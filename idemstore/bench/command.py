"""``idemstore bench``: its options (the ``idemstore`` command adds them when ``bench`` is
chosen), the settings they make, and the run over the chosen sections."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from ..db.engine import safe_url
from ..defaults import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_SYNCHRONOUS, SQLITE_SYNCHRONOUS
from ..errors import IdemstoreError, InvalidInputError
from .baselines import psycopg_module
from .groupcommit import bench_group_commit
from .harness import (
    GROWTH_SIZES,
    JSON_RECORDS,
    POSTGRES_CONNECTIONS,
    SECTIONS,
    TRUST_OPS,
    TRUST_SECONDS,
    BenchResult,
    BenchSettings,
    Figure,
)
from .leases import bench_leases
from .processes import bench_import, bench_postgres_concurrency, bench_sqlite_concurrency
from .report import format_markdown, format_report
from .scenarios import bench_growth, bench_json, bench_ops, growth_sizes
from .target import Target

# -- running -----------------------------------------------------------------------------


def versions(target: Target) -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
    for name in ("aiosqlite", "psycopg", "asyncpg"):
        with contextlib.suppress(ImportError):
            versions[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
    return versions


def settings_dict(target: Target, settings: BenchSettings) -> dict[str, Any]:
    d: dict[str, Any] = {
        "database": safe_url(target.url),
        "backend": target.backend,
        "sections": list(settings.sections),
        "ops_per_round_min": settings.ops,
        "min_seconds_per_round": settings.min_seconds,
        "rounds": settings.rounds,
        "records": settings.records,
        "growth_sizes": growth_sizes(settings.records),
        "json_records": min(JSON_RECORDS, settings.records),
        "json_ops": settings.json_ops,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions(target),
    }
    if target.sqlite:
        d["sqlite"] = {
            "synchronous": settings.synchronous.upper(),
            "journal_mode": "WAL",
            "busy_timeout_ms": settings.busy_timeout_ms,
            "files_in": str(target.directory),
        }
        d["processes"] = settings.processes
    else:
        with psycopg_module().connect(target.conninfo()) as conn:
            d["postgresql"] = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]
                for name in ("server_version", "synchronous_commit", "fsync", "shared_buffers")
            }
        d["connections"] = settings.connections
    d["concurrency_seconds"] = settings.concurrency_seconds
    return d


def run_bench(settings: BenchSettings, *, log: Callable[[str], None] | None = None) -> BenchResult:
    """Run the sections in ``settings`` and return every figure."""
    say = log or (lambda _message: None)
    if settings.synchronous.upper() not in SQLITE_SYNCHRONOUS:
        raise InvalidInputError(f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
    target = Target(settings)
    result = BenchResult(settings_dict(target, settings))
    try:
        if "ops" in settings.sections:
            say("ops: reserve / complete / get, store vs bare driver ...")
            bench_ops(target, settings, result)
        growth: dict[int, Figure] = {}
        if "growth" in settings.sections:
            say(f"growth: reserve at {growth_sizes(settings.records)} records ...")
            growth = bench_growth(target, settings, result)
        if "json" in settings.sections:
            say("json: the Rust store's JSON-file persistence, emulated ...")
            count = min(JSON_RECORDS, settings.records)
            reference = growth.get(count)
            if reference is None:
                result.notes.append(
                    "json: no growth figure at the same record count; compared with the ops "
                    "section's reserve rate (a smaller table)"
                )
                reference = next(
                    (
                        f
                        for f in result.figures
                        if f.section == "ops"
                        and f.workload == "reserve (fresh)"
                        and f.variant == "idemstore sync"
                    ),
                    None,
                )
            bench_json(target, settings, result, reference)
        if "concurrency" in settings.sections:
            if target.sqlite:
                say(f"concurrency: {settings.processes} processes on one SQLite file ...")
                bench_sqlite_concurrency(target, settings, result)
            else:
                say(f"concurrency: {settings.connections} asyncpg connections ...")
                bench_postgres_concurrency(target, settings, result)
        if "groupcommit" in settings.sections:
            say("groupcommit: 1..128 concurrent async callers, with and without group commit ...")
            bench_group_commit(target, settings, result)
        if "import" in settings.sections:
            say("import ...")
            bench_import(target, settings, result)
        if "leases" in settings.sections:
            say("leases: reserve with and without a lease, run_once ...")
            bench_leases(target, settings, result)
    finally:
        target.close()
    untrusted = [f for f in result.figures if not f.trusted]
    if untrusted:
        result.notes.append(
            f"{len(untrusted)} figure(s) measured over fewer than {TRUST_OPS} ops or "
            f"{TRUST_SECONDS} s in all (or against such a baseline), too few to compare: "
            "raise --ops and --min-seconds, or leave out --quick"
        )
    return result


# -- command line ------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``idemstore bench`` options (the CLI delegates here)."""
    parser.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,  # keeps a value given before the subcommand (idemstore CLI)
        help="where to measure (default: $IDEMSTORE_DATABASE_URL, else sqlite:///idemstore.db). "
        "SQLite: fresh files in a temporary directory beside it; PostgreSQL: fresh "
        "schemas, dropped afterwards",
    )
    parser.add_argument(
        "--records",
        type=_positive_int,
        default=None,
        help="largest table for the growth figures (10k, 100k, 1M capped to this), the JSON "
        "emulation and the import file (default 1000000; --quick 10000)",
    )
    parser.add_argument(
        "--ops",
        type=_positive_int,
        default=None,
        help="operations per round per figure, at least (default 1000; --quick 200)",
    )
    parser.add_argument("--rounds", type=_positive_int, default=None, help="rounds (default 3)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="a round also lasts at least this long (default 0.3; --quick 0.2)",
    )
    parser.add_argument(
        "--synchronous",
        default=DEFAULT_SYNCHRONOUS,
        type=str.upper,
        choices=SQLITE_SYNCHRONOUS,
        help="SQLite synchronous for the store and the bare driver alike (default FULL)",
    )
    parser.add_argument(
        "--busy-timeout-ms", type=int, default=DEFAULT_BUSY_TIMEOUT_MS, help=argparse.SUPPRESS
    )
    parser.add_argument("--json-ops", type=_positive_int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--processes", type=_positive_int, default=4, help="SQLite writer processes (default 4)"
    )
    parser.add_argument(
        "--connections",
        type=_positive_int,
        default=POSTGRES_CONNECTIONS,
        help="PostgreSQL connections (default 8)",
    )
    parser.add_argument(
        "--concurrency-seconds", type=float, default=None, help="length of a concurrency run"
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and shorter rounds (about a minute)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")


def settings_from(args: argparse.Namespace) -> BenchSettings:
    quick = bool(args.quick)
    sections = tuple(s.strip() for s in str(args.sections).split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise InvalidInputError(
            f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )

    def pick(value: Any, normal: Any, short: Any) -> Any:
        return value if value is not None else (short if quick else normal)

    return BenchSettings(
        database_url=getattr(args, "database_url", None),
        synchronous=args.synchronous,
        busy_timeout_ms=args.busy_timeout_ms,
        records=pick(args.records, GROWTH_SIZES[-1], 10_000),
        ops=pick(args.ops, 1000, 200),
        rounds=pick(args.rounds, 3, 3),
        min_seconds=pick(args.min_seconds, 0.3, 0.2),
        json_ops=pick(args.json_ops, 3, 3),
        processes=args.processes,
        connections=args.connections,
        concurrency_seconds=pick(args.concurrency_seconds, 2.0, 0.5),
        sections=sections,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``idemstore bench`` from parsed arguments; the exit status."""
    settings = settings_from(args)
    as_json = bool(args.json)
    result = run_bench(
        settings, log=None if as_json else (lambda m: print(m, file=sys.stderr, flush=True))
    )
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_report(result))
        if getattr(args, "markdown", False):
            print()
            print(format_markdown(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idemstore bench",
        description="Measure idemstore against the bare driver and the old JSON-file store.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except IdemstoreError as error:
        print(f"idemstore bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
