"""``idemstore bench``: how fast the store is, against the bare driver and the old JSON file.

One process, one run, one set of database settings. Sections:

``ops``
    reserve (fresh keys, duplicates, conflicts), complete and get, for the sync and the async
    store, and **the ceiling**: the very same SQL text (compiled from :mod:`idemstore.ops`'s
    builders by :func:`idemstore.dialects.compile_statement`), the same bind values
    (:func:`idemstore.ops.record_params`), the same transaction shape (``BEGIN IMMEDIATE`` /
    statements / ``COMMIT`` on SQLite) and the same pragmas, through the bare driver: stdlib
    ``sqlite3``, or psycopg / asyncpg. Every idemstore figure is a ratio to it, measured in
    interleaved rounds (the ratio is the median of the per-round ratios).
``json``
    the old way: the Rust store's persistence emulated (the whole map as pretty JSON, written to
    a temporary file, fsynced, renamed, directory fsynced) at the same record count. A few
    operations only are timed; the rate is what those few took.
``growth``
    the reserve rate with 10k, 100k and 1M records already in the table (preloaded in bulk,
    then reopened with the measured settings).
``concurrency``
    the aggregate reserve rate of K processes on one SQLite file, or of K connections of the
    async store on PostgreSQL (against bare asyncpg with a K-connection pool).
``import``
    import rate and peak memory of ``idemstore.importer`` on a generated file.

Benchmarks are not tests: the suite only checks that this runs and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from . import dialects, ops
from .aio import AsyncIdempotencyStore
from .config import DEFAULT_SYNCHRONOUS, resolve_url, safe_url, sync_url
from .dialects import DEFAULT_BUSY_TIMEOUT_MS, SQLITE_SYNCHRONOUS, CompiledStatement
from .errors import ConfigurationError, IdemstoreError, InvalidInputError
from .ids import idempotency_record_id
from .importer import import_file
from .jsonfile import record_to_json
from .model import IdempotencyRecord, Outcome, RecordStatus, TenantContext
from .schema import encode_u64
from .schema import records as R
from .store import IdempotencyStore

SECTIONS: Final = ("ops", "json", "growth", "concurrency", "import")
GROWTH_SIZES: Final = (10_000, 100_000, 1_000_000)
JSON_RECORDS: Final = 100_000
IMPORT_RECORDS: Final = 100_000
#: Issue 3: a 100,000-record file imports at this rate or more.
IMPORT_TARGET_RATE: Final = 50_000
#: A figure measured for less than this, or over fewer operations, is flagged.
TRUST_SECONDS: Final = 0.5
TRUST_OPS: Final = 200
#: Each JSON-file operation rewrites the whole file: a few, each seconds long, are enough.
JSON_TRUST_OPS: Final = 3
#: Per-round ratios spreading more than this around their median are flagged as noisy.
NOISY_SPREAD: Final = 0.25

OPERATION: Final = "bench.op"
OWNER: Final = "bench"
FINGERPRINT: Final = "sha256:request-a"
OTHER_FINGERPRINT: Final = "sha256:request-b"
TENANT: Final = TenantContext.explicit_user_workspace("org-bench", "ws-bench", None, "actor")
OUTCOME: Final = Outcome(
    outcome_kind="accepted",
    completed_at_ms=1_700_000_000_000,
    primary_ref_kind="delivery",
    primary_ref_id="delivery-1",
    details={"dedupe_result": "accepted"},
)

#: The statements a reservation, a completion and a read run (names as in :mod:`ops`).
STATEMENTS: Final[Mapping[str, dialects.StatementBuilder]] = {
    "reserve": ops._build_reserve,
    "complete": ops._build_complete,
    "get": ops._build_get,
    "fingerprints_select": ops._build_fingerprints_select,
    "fingerprints_insert": ops._build_fingerprints_insert,
    "fingerprints_delete": ops._build_fingerprints_delete,
}
_TOKEN: Final = ops._TOKEN_INDEX
_FINGERPRINT: Final = ops._FINGERPRINT_INDEX

#: SQLite's ``synchronous`` targets: (sync store, async store) reserve vs bare sqlite3.
SQLITE_TARGETS: Final = {"NORMAL": (0.5, 0.25), "FULL": (0.8, 0.6)}
GROWTH_TARGET: Final = 0.67
POSTGRES_CONCURRENCY_TARGET: Final = 0.5
POSTGRES_CONCURRENCY_TARGET_CONNECTIONS: Final = 8
JSON_TARGET: Final = 1000.0

WORKLOADS: Final = (
    "reserve (fresh)",
    "reserve (duplicate)",
    "reserve (conflict)",
    "complete",
    "get",
)


# -- settings and results ----------------------------------------------------------------


@dataclass
class BenchSettings:
    """What one run measures, and how long."""

    database_url: str | None = None
    synchronous: str = DEFAULT_SYNCHRONOUS
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
    #: Largest record count: caps the growth sizes, the JSON emulation and the import file.
    records: int = GROWTH_SIZES[-1]
    #: Operations per round per figure (a minimum: see ``min_seconds``).
    ops: int = 1000
    rounds: int = 3
    #: A round also runs at least this long.
    min_seconds: float = 0.3
    #: Operations timed on the JSON-file emulation.
    json_ops: int = 3
    processes: int = 4
    connections: int = POSTGRES_CONCURRENCY_TARGET_CONNECTIONS
    concurrency_seconds: float = 2.0
    sections: tuple[str, ...] = SECTIONS
    #: Seed keys for duplicates, conflicts, completions and reads.
    seed_keys: int = 1000


@dataclass
class Figure:
    section: str
    workload: str
    variant: str
    ops: int
    seconds: float
    rate: float
    p50_us: float | None = None
    p99_us: float | None = None
    baseline: str | None = None
    ratio: float | None = None
    target: float | None = None
    met: bool | None = None
    trusted: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    settings: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "figures": [asdict(f) for f in self.figures],
            "notes": self.notes,
            "skipped": self.skipped,
            "targets": [
                {
                    "workload": f.workload,
                    "variant": f.variant,
                    "ratio": f.ratio,
                    "target": f.target,
                    "met": f.met,
                }
                for f in self.figures
                if f.target is not None
            ],
        }

    def targets_met(self) -> bool:
        return all(f.met for f in self.figures if f.target is not None)


@dataclass
class Sample:
    """One round of one figure."""

    ops: int
    seconds: float
    latencies_ns: list[int]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    return float(sorted_values[round(q * (len(sorted_values) - 1))])


def _figure(
    section: str,
    workload: str,
    variant: str,
    samples: Sequence[Sample],
    *,
    notes: Sequence[str] = (),
    min_ops: int = TRUST_OPS,
) -> Figure:
    total_ops = sum(s.ops for s in samples)
    total_seconds = sum(s.seconds for s in samples)
    latencies = sorted(lat for s in samples for lat in s.latencies_ns)
    figure = Figure(
        section=section,
        workload=workload,
        variant=variant,
        ops=total_ops,
        seconds=round(total_seconds, 4),
        rate=statistics.median(s.rate for s in samples) if samples else 0.0,
        p50_us=_percentile(latencies, 0.50) / 1000 if latencies else None,
        p99_us=_percentile(latencies, 0.99) / 1000 if latencies else None,
        notes=list(notes),
    )
    if total_seconds < TRUST_SECONDS or total_ops < min_ops:
        figure.trusted = False
        figure.notes.append(
            f"too short to trust ({total_ops} ops in {total_seconds:.2f} s; "
            f"want >= {min_ops} ops and >= {TRUST_SECONDS} s)"
        )
    return figure


def _ratio(
    figure: Figure,
    baseline: Figure,
    mine: Sequence[Sample],
    theirs: Sequence[Sample],
    target: float | None = None,
) -> None:
    """Set ``figure.ratio`` to the median of per-round ratios against ``baseline``."""
    ratios = [m.rate / t.rate for m, t in zip(mine, theirs, strict=False) if t.rate > 0]
    if not ratios:
        return
    figure.baseline = baseline.variant
    figure.ratio = statistics.median(ratios)
    if len(ratios) > 1 and figure.ratio > 0:
        spread = (max(ratios) - min(ratios)) / figure.ratio
        if spread > NOISY_SPREAD:
            figure.notes.append(f"noisy: per-round ratios {min(ratios):.2f}..{max(ratios):.2f}")
    if not baseline.trusted:
        figure.trusted = False
    if target is not None:
        figure.target = target
        figure.met = figure.ratio >= target


# -- measuring ---------------------------------------------------------------------------


#: Operations per turn: variants take turns in chunks this long, so that they share the
#: machine's (and the disk's) good and bad moments.
CHUNK: Final = 20


def measure_chunk(fn: Callable[[int], object], start: int, count: int, out: list[int]) -> int:
    """Call ``fn(start) .. fn(start + count - 1)``; append latencies; elapsed ns."""
    clock = time.perf_counter_ns
    began = clock()
    for i in range(start, start + count):
        t0 = clock()
        fn(i)
        out.append(clock() - t0)
    return clock() - began


async def measure_chunk_async(
    fn: Callable[[int], Awaitable[object]], start: int, count: int, out: list[int]
) -> int:
    """:func:`measure_chunk` for a coroutine function, awaited one call at a time."""
    clock = time.perf_counter_ns
    began = clock()
    for i in range(start, start + count):
        t0 = clock()
        await fn(i)
        out.append(clock() - t0)
    return clock() - began


# -- the bare drivers: the same SQL, no SQLAlchemy -----------------------------------------


def reserve_params(key: str, fingerprint: str, token: int) -> tuple[str, dict[str, Any]]:
    """The record id and the bind values of a reservation, exactly as :func:`ops.reserve`
    makes them."""
    fresh = ops.fresh_record(TENANT, OPERATION, key, OWNER, fingerprint, ops.now_ms())
    return fresh.record_id, ops.record_params(fresh, token)


def complete_params(key: str) -> tuple[str, dict[str, Any]]:
    record_id = idempotency_record_id(TENANT, OPERATION, key)
    params = {**ops._tenant_params(TENANT, record_id), **ops._outcome_params(OUTCOME)}
    params["p_now"] = encode_u64(ops.now_ms())
    return record_id, params


def get_params(key: str) -> tuple[str, dict[str, Any]]:
    record_id = idempotency_record_id(TENANT, OPERATION, key)
    return record_id, ops._tenant_params(TENANT, record_id)


def compiled_statements(dialect: Dialect) -> dict[str, CompiledStatement]:
    """The store's statements as the store compiles them for ``dialect``."""
    return {name: dialects.compile_statement(name, b, dialect) for name, b in STATEMENTS.items()}


def _bind(stmt: CompiledStatement, params: Mapping[str, Any]) -> Any:
    if stmt.constants:
        params = {**stmt.constants, **params}
    if stmt.positional is not None:
        return tuple(params[p] for p in stmt.positional)
    return params


class BareSync:
    """The store's operations on a bare DBAPI connection (stdlib sqlite3 or psycopg)."""

    def __init__(self, connection: Any, dialect: Dialect) -> None:
        self.connection = connection
        self.sqlite = dialect.name == "sqlite"
        self.s = compiled_statements(dialect)

    def _begin(self, cursor: Any, write: bool) -> None:
        if self.sqlite:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def reserve(self, key: str, fingerprint: str) -> str:
        s = self.s
        token = secrets.randbits(63)
        record_id, params = reserve_params(key, fingerprint, token)
        by_id = {"p_record_id": record_id}
        cursor = self.connection.cursor()
        try:
            self._begin(cursor, True)
            cursor.execute(s["reserve"].sql, _bind(s["reserve"], params))
            (row,) = cursor.fetchall()
            if row[_TOKEN] == token:
                kind = "reserved"
                cursor.execute(s["fingerprints_delete"].sql, _bind(s["fingerprints_delete"], by_id))
            else:
                if row[_FINGERPRINT] == fingerprint:
                    kind = "duplicate"
                else:
                    kind = "conflict"
                    stmt = s["fingerprints_insert"]
                    cursor.execute(stmt.sql, _bind(stmt, {**by_id, "p_fingerprint": fingerprint}))
                cursor.execute(s["fingerprints_select"].sql, _bind(s["fingerprints_select"], by_id))
                cursor.fetchall()
            self.connection.commit()
            return kind
        except BaseException:
            self.connection.rollback()
            raise
        finally:
            cursor.close()

    def _read_back(self, name: str, params: Mapping[str, Any], record_id: str, write: bool) -> int:
        s = self.s
        cursor = self.connection.cursor()
        try:
            self._begin(cursor, write)
            cursor.execute(s[name].sql, _bind(s[name], params))
            rows = cursor.fetchall()
            if rows:
                stmt = s["fingerprints_select"]
                cursor.execute(stmt.sql, _bind(stmt, {"p_record_id": record_id}))
                cursor.fetchall()
            self.connection.commit()
            return len(rows)
        except BaseException:
            self.connection.rollback()
            raise
        finally:
            cursor.close()

    def complete(self, key: str) -> int:
        record_id, params = complete_params(key)
        return self._read_back("complete", params, record_id, True)

    def get(self, key: str) -> int:
        record_id, params = get_params(key)
        return self._read_back("get", params, record_id, False)


class BareAsyncpg:
    """The store's operations on bare asyncpg connections."""

    def __init__(self, dialect: Dialect) -> None:
        self.s = compiled_statements(dialect)

    async def reserve(self, conn: Any, key: str, fingerprint: str) -> str:
        s = self.s
        token = secrets.randbits(63)
        record_id, params = reserve_params(key, fingerprint, token)
        by_id = {"p_record_id": record_id}
        async with conn.transaction():
            row = await conn.fetchrow(s["reserve"].sql, *_bind(s["reserve"], params))
            if row[_TOKEN] == token:
                stmt = s["fingerprints_delete"]
                await conn.execute(stmt.sql, *_bind(stmt, by_id))
                return "reserved"
            kind = "duplicate"
            if row[_FINGERPRINT] != fingerprint:
                kind = "conflict"
                stmt = s["fingerprints_insert"]
                await conn.execute(stmt.sql, *_bind(stmt, {**by_id, "p_fingerprint": fingerprint}))
            stmt = s["fingerprints_select"]
            await conn.fetch(stmt.sql, *_bind(stmt, by_id))
            return kind

    async def _read_back(
        self, conn: Any, name: str, params: Mapping[str, Any], record_id: str
    ) -> int:
        s = self.s
        async with conn.transaction():
            rows = await conn.fetch(s[name].sql, *_bind(s[name], params))
            if rows:
                stmt = s["fingerprints_select"]
                await conn.fetch(stmt.sql, *_bind(stmt, {"p_record_id": record_id}))
            return len(rows)

    async def complete(self, conn: Any, key: str) -> int:
        record_id, params = complete_params(key)
        return await self._read_back(conn, "complete", params, record_id)

    async def get(self, conn: Any, key: str) -> int:
        record_id, params = get_params(key)
        return await self._read_back(conn, "get", params, record_id)


def open_bare_sqlite(path: str, synchronous: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A stdlib connection with idemstore's pragmas (and no implicit transactions)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in dialects.sqlite_connect_pragmas(
        synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, memory=False
    ):
        connection.execute(pragma)
    return connection


def _asyncpg() -> Any:
    return importlib.import_module("asyncpg")


def _psycopg() -> Any:
    try:
        return importlib.import_module("psycopg")
    except ImportError as error:
        raise ConfigurationError(
            f"the PostgreSQL driver psycopg cannot be imported ({error}): "
            "pip install 'idemstore[postgresql]'"
        ) from None


# -- databases ---------------------------------------------------------------------------


class Target:
    """Where the bench writes: fresh SQLite files in a temporary directory beside the
    configured database, or fresh PostgreSQL schemas (dropped at the end)."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.url = resolve_url(settings.database_url)
        self.backend = self.url.get_backend_name()
        if self.backend not in ("sqlite", "postgresql"):
            raise ConfigurationError(
                f"idemstore bench measures SQLite or PostgreSQL, not {self.backend!r}"
            )
        self.sqlite = self.backend == "sqlite"
        self._schemas: list[str] = []
        self.directory: Path | None = None
        if self.sqlite:
            database = self.url.database
            parent = (
                Path(database).resolve().parent if database not in (None, "", ":memory:") else None
            )
            try:
                if parent is not None:
                    parent.mkdir(parents=True, exist_ok=True)
                self.directory = Path(tempfile.mkdtemp(prefix="idemstore-bench-", dir=parent))
            except OSError as error:
                raise ConfigurationError(
                    f"cannot create the bench's files beside {safe_url(self.url)}: "
                    f"{error.strerror or error}"
                ) from None
        else:
            self._check_server()

    def _check_server(self) -> None:
        """Connect once, so that a server that cannot be reached is one line, not a trace."""
        psycopg = _psycopg()
        try:
            psycopg.connect(self.conninfo(), connect_timeout=10).close()
        except psycopg.Error as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ConfigurationError(f"cannot connect to {safe_url(self.url)}: {reason}") from None

    # SQLite ------------------------------------------------------------------------------

    def sqlite_path(self, name: str) -> str:
        assert self.directory is not None
        return str(self.directory / f"{name}.db")

    # PostgreSQL --------------------------------------------------------------------------

    def conninfo(self) -> str:
        return sync_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    def new_schema(self) -> str:
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        with _psycopg().connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        self._schemas.append(schema)
        return schema

    # both --------------------------------------------------------------------------------

    def database(self, name: str) -> tuple[str, str | None]:
        """A fresh database: (url, schema or None)."""
        if self.sqlite:
            return f"sqlite:///{self.sqlite_path(name)}", None
        return self.url.render_as_string(hide_password=False), self.new_schema()

    def sync_options(self, schema: str | None) -> dict[str, Any]:
        return {} if schema is None else {"connect_args": {"options": f"-csearch_path={schema}"}}

    def async_options(self, schema: str | None) -> dict[str, Any]:
        if schema is None:
            return {}
        return {"connect_args": {"server_settings": {"search_path": schema}}}

    def sync_store(self, url: str, schema: str | None, **options: Any) -> IdempotencyStore:
        return IdempotencyStore.from_url(
            url,
            synchronous=self.settings.synchronous,
            busy_timeout_ms=self.settings.busy_timeout_ms,
            **self.sync_options(schema),
            **options,
        )

    def async_store(self, url: str, schema: str | None, **options: Any) -> AsyncIdempotencyStore:
        return AsyncIdempotencyStore.from_url(
            url,
            synchronous=self.settings.synchronous,
            busy_timeout_ms=self.settings.busy_timeout_ms,
            **self.async_options(schema),
            **options,
        )

    def bare_sync(self, url: str, schema: str | None, dialect: Dialect) -> BareSync:
        if self.sqlite:
            path = make_path(url)
            conn = open_bare_sqlite(path, self.settings.synchronous, self.settings.busy_timeout_ms)
            return BareSync(conn, dialect)
        conn = _psycopg().connect(self.conninfo(), options=f"-csearch_path={schema}")
        return BareSync(conn, dialect)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._schemas:
            with _psycopg().connect(self.conninfo(), autocommit=True) as conn:
                for schema in self._schemas:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def make_path(url: str) -> str:
    database = sa.make_url(url).database
    assert database
    return database


# -- section: ops and the ceiling ----------------------------------------------------------


Runner = Callable[[int], object]
AsyncRunner = Callable[[int], Awaitable[object]]
W = TypeVar("W")


def _workloads(
    reserve: Callable[[str, str], W],
    complete: Callable[[str], W],
    get: Callable[[str], W],
    seeds: Sequence[str],
    tag: str,
) -> dict[str, Callable[[int], W]]:
    """The measured operations, by name, for a sync (W = object) or async (W = Awaitable)
    store or driver."""
    n = len(seeds)
    return {
        "reserve (fresh)": lambda i: reserve(f"{tag}-{i}", FINGERPRINT),
        "reserve (duplicate)": lambda i: reserve(seeds[i % n], FINGERPRINT),
        "reserve (conflict)": lambda i: reserve(seeds[i % n], OTHER_FINGERPRINT),
        "complete": lambda i: complete(seeds[i % n]),
        "get": lambda i: get(seeds[i % n]),
    }


def _store_sync(store: IdempotencyStore) -> tuple[Any, Any, Any]:
    return (
        lambda key, fp: store.reserve(TENANT, OPERATION, key, OWNER, fp),
        lambda key: store.complete(TENANT, OPERATION, key, OUTCOME),
        lambda key: store.get(TENANT, OPERATION, key),
    )


def _store_async(store: AsyncIdempotencyStore) -> tuple[Any, Any, Any]:
    return (
        lambda key, fp: store.reserve(TENANT, OPERATION, key, OWNER, fp),
        lambda key: store.complete(TENANT, OPERATION, key, OUTCOME),
        lambda key: store.get(TENANT, OPERATION, key),
    )


def _bare_workloads(bare: BareSync, seeds: Sequence[str]) -> Callable[[str], dict[str, Runner]]:
    return lambda tag: _workloads(bare.reserve, bare.complete, bare.get, seeds, tag)


def _store_workloads(
    store: IdempotencyStore, seeds: Sequence[str]
) -> Callable[[str], dict[str, Runner]]:
    return lambda tag: _workloads(*_store_sync(store), seeds, tag)


@dataclass
class Variant:
    name: str
    baseline: str | None
    sync: Callable[[str], dict[str, Runner]] | None = None
    aio: Callable[[str], dict[str, AsyncRunner]] | None = None
    workloads: tuple[str, ...] = WORKLOADS


def _run_rounds(
    variants: Sequence[Variant],
    loop: asyncio.AbstractEventLoop,
    settings: BenchSettings,
    workloads: Sequence[str],
    label: str,
) -> dict[tuple[str, str], list[Sample]]:
    """Per round and workload, the variants take turns in chunks of :data:`CHUNK` operations
    until each has run at least ``settings.ops`` operations and ``settings.min_seconds``."""
    samples: dict[tuple[str, str], list[Sample]] = {}
    min_ns = int(settings.min_seconds * 1e9)
    for round_ in range(settings.rounds):
        for workload in workloads:
            taking = [v for v in variants if workload in v.workloads]
            shift = round_ % len(taking)
            taking = taking[shift:] + taking[:shift]
            runners: list[Any] = []
            for variant in taking:
                tag = f"{label}-{variant.name}-{round_}"
                if variant.sync is not None:
                    runners.append(variant.sync(tag)[workload])
                else:
                    assert variant.aio is not None
                    runners.append(variant.aio(tag)[workload])
            latencies: list[list[int]] = [[] for _ in taking]
            elapsed = [0] * len(taking)
            done = 0
            while done < settings.ops or min(elapsed) < min_ns:
                count = min(CHUNK, max(1, settings.ops - done)) if done < settings.ops else CHUNK
                for n, variant in enumerate(taking):
                    if variant.sync is not None:
                        elapsed[n] += measure_chunk(runners[n], done, count, latencies[n])
                    else:
                        elapsed[n] += loop.run_until_complete(
                            measure_chunk_async(runners[n], done, count, latencies[n])
                        )
                done += count
            for n, variant in enumerate(taking):
                sample = Sample(done, elapsed[n] / 1e9, latencies[n])
                samples.setdefault((workload, variant.name), []).append(sample)
    return samples


def _figures_from(
    section: str,
    variants: Sequence[Variant],
    samples: Mapping[tuple[str, str], list[Sample]],
    targets: Mapping[tuple[str, str], float],
) -> list[Figure]:
    figures: dict[tuple[str, str], Figure] = {}
    for (workload, name), rounds in samples.items():
        figures[(workload, name)] = _figure(section, workload, name, rounds)
    for variant in variants:
        if variant.baseline is None:
            continue
        for workload in variant.workloads:
            mine = figures.get((workload, variant.name))
            base = figures.get((workload, variant.baseline))
            if mine is None or base is None:
                continue
            _ratio(
                mine,
                base,
                samples[(workload, variant.name)],
                samples[(workload, variant.baseline)],
                targets.get((workload, variant.name)),
            )
    order = {name: i for i, name in enumerate(v.name for v in variants)}
    return sorted(figures.values(), key=lambda f: (WORKLOADS.index(f.workload), order[f.variant]))


def _seed(store: IdempotencyStore, count: int) -> list[str]:
    keys = [f"seed-{i}" for i in range(count)]
    for key in keys:
        store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
    return keys


def bench_ops(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    url, schema = target.database("ops")
    loop = asyncio.new_event_loop()
    sync_store = target.sync_store(url, schema, migrate=True)
    async_store = target.async_store(url, schema)
    extra_store: AsyncIdempotencyStore | None = None
    bare = target.bare_sync(url, schema, sync_store.engine.dialect)
    asyncpg_conn: Any = None
    try:
        seeds = _seed(sync_store, min(settings.seed_keys, max(10, settings.ops)))
        loop.run_until_complete(async_store.check_schema())
        variants: list[Variant] = []
        targets: dict[tuple[str, str], float] = {}
        if target.sqlite:
            bare_name = "bare sqlite3"
            variants.append(
                Variant(
                    bare_name,
                    None,
                    sync=lambda tag: _workloads(bare.reserve, bare.complete, bare.get, seeds, tag),
                )
            )
            variants.append(
                Variant(
                    "idemstore sync",
                    bare_name,
                    sync=lambda tag: _workloads(*_store_sync(sync_store), seeds, tag),
                )
            )
            variants.append(
                Variant(
                    "idemstore async",
                    bare_name,
                    aio=lambda tag: _workloads(*_store_async(async_store), seeds, tag),
                )
            )
            # The same store on aiosqlite through SQLAlchemy's greenlet bridge, for reference.
            greenlet = extra_store = target.async_store(url, schema, offload="greenlet")
            variants.append(
                Variant(
                    "idemstore async (aiosqlite, greenlet)",
                    bare_name,
                    aio=lambda tag: _workloads(*_store_async(greenlet), seeds, tag),
                    workloads=("reserve (fresh)",),
                )
            )
            level = settings.synchronous.upper()
            if level in SQLITE_TARGETS:
                sync_target, async_target = SQLITE_TARGETS[level]
                targets[("reserve (fresh)", "idemstore sync")] = sync_target
                targets[("reserve (fresh)", "idemstore async")] = async_target
        else:
            asyncpg = _asyncpg()
            asyncpg_conn = loop.run_until_complete(
                asyncpg.connect(target.conninfo(), server_settings={"search_path": schema})
            )
            bare_pg = BareAsyncpg(async_store.engine.dialect)
            conn = asyncpg_conn
            variants += [
                Variant(
                    "bare psycopg",
                    None,
                    sync=lambda tag: _workloads(bare.reserve, bare.complete, bare.get, seeds, tag),
                ),
                Variant(
                    "idemstore sync",
                    "bare psycopg",
                    sync=lambda tag: _workloads(*_store_sync(sync_store), seeds, tag),
                ),
                Variant(
                    "bare asyncpg",
                    None,
                    aio=lambda tag: _workloads(
                        lambda k, fp: bare_pg.reserve(conn, k, fp),
                        lambda k: bare_pg.complete(conn, k),
                        lambda k: bare_pg.get(conn, k),
                        seeds,
                        tag,
                    ),
                ),
                Variant(
                    "idemstore async",
                    "bare asyncpg",
                    aio=lambda tag: _workloads(*_store_async(async_store), seeds, tag),
                ),
            ]
        if extra_store is not None:
            loop.run_until_complete(extra_store.check_schema())
        samples = _run_rounds(variants, loop, settings, WORKLOADS, "ops")
        result.figures += _figures_from("ops", variants, samples, targets)
    finally:
        sync_store.close()
        loop.run_until_complete(async_store.close())
        if extra_store is not None:
            loop.run_until_complete(extra_store.close())
        if asyncpg_conn is not None:
            loop.run_until_complete(asyncpg_conn.close())
        bare.connection.close()
        loop.close()


# -- synthetic records (growth preload, JSON emulation, import file) -----------------------


def synthetic_record(i: int, now: int) -> IdempotencyRecord:
    """A completed record, as an application would leave one."""
    key = f"pre-{i}"
    return IdempotencyRecord(
        record_id=idempotency_record_id(TENANT, OPERATION, key),
        tenant_context=TENANT,
        operation=OPERATION,
        key=key,
        owner=OWNER,
        request_fingerprint=f"sha256:{i:064x}",
        status=RecordStatus.COMPLETED,
        first_seen_at_ms=now,
        last_seen_at_ms=now + 1,
        first_seen_event_id=f"event-{i}",
        outcome=Outcome(
            outcome_kind="accepted",
            completed_at_ms=now + 1,
            primary_ref_kind="delivery",
            primary_ref_id=f"delivery-{i}",
            details={"dedupe_result": "accepted"},
        ),
    )


def synthetic_rows(start: int, stop: int, now: int) -> list[tuple[Any, ...]]:
    """Rows in ``records`` column order (those of :func:`synthetic_record`), sorted by
    primary key (a fast bulk load)."""
    columns = [c.name for c in R.columns]
    template = ops.record_params(synthetic_record(0, now), 0)
    base = [template[f"p_{c}"] for c in columns]
    at = {c: columns.index(c) for c in columns}
    record_id, key, fingerprint = at["record_id"], at["key"], at["request_fingerprint"]
    event, ref, token = (
        at["first_seen_event_id"],
        at["outcome_primary_ref_id"],
        at["reservation_token"],
    )
    randbits = secrets.randbits
    rows = []
    for i in range(start, stop):
        row = base.copy()
        row[key] = k = f"pre-{i}"
        row[record_id] = idempotency_record_id(TENANT, OPERATION, k)
        row[fingerprint] = f"sha256:{i:064x}"
        row[event] = f"event-{i}"
        row[ref] = f"delivery-{i}"
        row[token] = randbits(63)
        rows.append(tuple(row))
    rows.sort(key=lambda row: row[0])
    return rows


def preload(target: Target, url: str, schema: str | None, start: int, stop: int) -> float:
    """Add records ``start..stop`` in bulk, outside the measured settings; seconds taken."""
    began = time.perf_counter()
    now = ops.now_ms()
    columns = [c.name for c in R.columns]
    batch = 50_000
    if target.sqlite:
        conn = sqlite3.connect(make_path(url), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("PRAGMA cache_size = -262144")  # 256 MiB, for the bulk load only
            sql = (
                f"INSERT INTO {R.name} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})"
            )
            for lo in range(start, stop, batch):
                rows = synthetic_rows(lo, min(lo + batch, stop), now)
                conn.execute("BEGIN")
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    else:
        psycopg = _psycopg()
        with psycopg.connect(target.conninfo(), options=f"-csearch_path={schema}") as conn:
            conn.execute("SET synchronous_commit = off")
            for lo in range(start, stop, batch):
                rows = synthetic_rows(lo, min(lo + batch, stop), now)
                with (
                    conn.cursor() as cursor,
                    cursor.copy(f"COPY {R.name} ({', '.join(columns)}) FROM STDIN") as copy,
                ):
                    for row in rows:
                        copy.write_row(row)
                conn.commit()
        with psycopg.connect(
            target.conninfo(), options=f"-csearch_path={schema}", autocommit=True
        ) as conn:
            conn.execute(f"VACUUM ANALYZE {R.name}")
    return time.perf_counter() - began


# -- section: growth ---------------------------------------------------------------------


def growth_sizes(records: int) -> list[int]:
    return sorted({min(size, records) for size in GROWTH_SIZES})


def _clone_growth_database(
    target: Target, source: tuple[str, str | None], dest: tuple[str, str | None]
) -> None:
    """Make ``dest`` (fresh) a copy of the records in ``source``."""
    if target.sqlite:
        shutil.copyfile(make_path(source[0]), make_path(dest[0]))
        return
    target.sync_store(dest[0], dest[1], migrate=True).close()
    with _psycopg().connect(target.conninfo()) as conn:
        conn.execute(f'INSERT INTO "{dest[1]}".{R.name} SELECT * FROM "{source[1]}".{R.name}')


def bench_growth(target: Target, settings: BenchSettings, result: BenchResult) -> dict[int, Figure]:
    """The sync store's reserve rate (and the bare driver's) at each size: one database per
    size (each a copy of the one before, topped up in bulk), all measured interleaved."""
    sizes = growth_sizes(settings.records)
    databases: list[tuple[str, str | None]] = []
    loaded = 0
    for size in sizes:
        database = target.database(f"growth-{size}")
        if databases:
            _clone_growth_database(target, databases[-1], database)
        else:
            target.sync_store(*database, migrate=True).close()
        seconds = preload(target, database[0], database[1], loaded, size)
        how = "executemany, synchronous=OFF" if target.sqlite else "COPY, then VACUUM ANALYZE"
        result.notes.append(
            f"growth: {size} records: copied {loaded} and preloaded {size - loaded} more "
            f"in {seconds:.1f} s ({how})"
        )
        loaded = size
        databases.append(database)
    bare_name = "bare sqlite3" if target.sqlite else "bare psycopg"
    stores: list[IdempotencyStore] = []
    bares: list[BareSync] = []
    variants: list[Variant] = []
    loop = asyncio.new_event_loop()
    try:
        for size, (url, schema) in zip(sizes, databases, strict=True):
            store = target.sync_store(url, schema)
            store.check_schema()
            stores.append(store)
            bares.append(target.bare_sync(url, schema, store.engine.dialect))
            variants.append(
                Variant(
                    f"{bare_name} @{size}",
                    None,
                    sync=_bare_workloads(bares[-1], []),
                    workloads=("reserve (fresh)",),
                )
            )
            variants.append(
                Variant(
                    f"idemstore sync @{size}",
                    f"{bare_name} @{size}",
                    sync=_store_workloads(store, []),
                    workloads=("reserve (fresh)",),
                )
            )
        samples = _run_rounds(variants, loop, settings, ("reserve (fresh)",), "growth")
    finally:
        for store in stores:
            store.close()
        for bare in bares:
            bare.connection.close()
        loop.close()
    by_size: dict[int, Figure] = {}
    for figure in _figures_from("growth", variants, samples, {}):
        name, size_text = figure.variant.rsplit(" @", 1)
        figure.workload = f"reserve (fresh), {int(size_text)} records"
        figure.variant = name
        if figure.baseline is not None:
            figure.baseline = figure.baseline.rsplit(" @", 1)[0]
        result.figures.append(figure)
        if name == "idemstore sync":
            by_size[int(size_text)] = figure
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        a, b = by_size[first], by_size[last]
        ratio = Figure(
            section="growth",
            workload=f"reserve rate at {last} vs {first} records",
            variant="idemstore sync",
            ops=a.ops + b.ops,
            seconds=a.seconds + b.seconds,
            rate=b.rate,
            trusted=a.trusted and b.trusted,
        )
        baseline = Figure(**{**asdict(a), "variant": f"idemstore sync at {first}"})
        is_target = (first, last) == (GROWTH_SIZES[0], GROWTH_SIZES[-1])
        _ratio(
            ratio,
            baseline,
            samples[("reserve (fresh)", f"idemstore sync @{last}")],
            samples[("reserve (fresh)", f"idemstore sync @{first}")],
            GROWTH_TARGET if is_target else None,
        )
        if not is_target:
            ratio.notes.append(
                f"the target ({GROWTH_TARGET}) is for 1M vs 10k records; run with --records 1000000"
            )
        result.figures.append(ratio)
    return by_size


# -- section: the old way (the Rust store's JSON file) -------------------------------------


def bench_json(
    target: Target,
    settings: BenchSettings,
    result: BenchResult,
    reference: Figure | None,
) -> None:
    count = min(JSON_RECORDS, settings.records)
    assert target.directory is not None or not target.sqlite
    directory = target.directory or Path(tempfile.mkdtemp(prefix="idemstore-bench-json-"))
    path = directory / "idempotency_keys.json"
    now = ops.now_ms()
    records = {
        r["record_id"]: r for r in (record_to_json(synthetic_record(i, now)) for i in range(count))
    }
    latencies: list[int] = []
    io_ns: list[int] = []
    size = 0
    try:
        for i in range(settings.json_ops):
            t0 = time.perf_counter_ns()
            key = f"json-{i}"
            record_id = idempotency_record_id(TENANT, OPERATION, key)
            if record_id not in records:  # the reserve itself (a fresh key)
                fresh = synthetic_record(count + i, ops.now_ms())
                records[record_id] = record_to_json(fresh)
            snapshot = dict(records)  # Rust clones the map before persisting it
            payload = json.dumps(
                {"schema_version": 1, "records": snapshot}, indent=2, ensure_ascii=False
            ).encode()
            t1 = time.perf_counter_ns()
            _write_atomically(path, payload)
            t2 = time.perf_counter_ns()
            latencies.append(t2 - t0)
            io_ns.append(t2 - t1)
            size = len(payload)
    finally:
        if target.directory is None:
            shutil.rmtree(directory, ignore_errors=True)
    seconds = sum(latencies) / 1e9
    figure = _figure(
        "json",
        f"reserve (fresh), {count} records",
        "JSON-file emulation",
        [Sample(len(latencies), seconds, latencies)],
        min_ops=JSON_TRUST_OPS,
    )
    # Few operations by design: each rewrites the whole file. Not "too short" in the usual
    # sense, but say what was done.
    figure.notes = [
        f"{len(latencies)} ops timed, rate extrapolated from them; file {size / 1e6:.1f} MB; "
        f"of each op {statistics.mean(io_ns) / 1e6:.0f} ms is write+fsync+rename "
        f"(the rest is Python's json.dumps, slower than serde_json)"
    ]
    result.figures.append(figure)
    if reference is not None and figure.rate > 0:
        io_rate = 1e9 / statistics.mean(io_ns)
        vs = Figure(
            section="json",
            workload=f"idemstore vs JSON file, {count} records",
            variant=reference.variant,
            ops=reference.ops,
            seconds=reference.seconds,
            rate=reference.rate,
            baseline="JSON-file emulation",
            ratio=reference.rate / figure.rate,
            trusted=reference.trusted,
            notes=[
                f"vs the I/O alone (free serialisation): {reference.rate / io_rate:.0f}x",
                f"idemstore figure: {reference.workload}",
            ],
        )
        if count == JSON_RECORDS:
            vs.target = JSON_TARGET
            vs.met = vs.ratio is not None and vs.ratio >= JSON_TARGET
        result.figures.append(vs)


def _write_atomically(path: Path, payload: bytes) -> None:
    """As the Rust ``write_state_file_atomically``: temp file, fsync, rename, fsync dir."""
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- section: concurrency ----------------------------------------------------------------


def _sqlite_worker(
    url: str, synchronous: str, busy_timeout_ms: int, commands: Any, results: Any
) -> None:
    """One process of the SQLite concurrency figure. It opens the store and a bare sqlite3
    connection once, then serves ``(mode, tag, start_at, seconds)`` commands: fresh
    reservations from ``start_at`` (wall clock) for ``seconds``; ``None`` ends it."""
    conn = open_bare_sqlite(make_path(url), synchronous, busy_timeout_ms)
    bare = BareSync(conn, sa.create_engine("sqlite://").dialect)
    store = IdempotencyStore.from_url(url, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
    store.check_schema()
    results.put("ready")
    try:
        while (command := commands.get()) is not None:
            mode, tag, start_at, seconds = command
            if mode == "bare":
                reserve: Callable[[str], object] = lambda key: bare.reserve(key, FINGERPRINT)  # noqa: E731
            else:
                reserve = lambda key: store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)  # noqa: E731
            time.sleep(max(0.0, start_at - time.time()))
            latencies: list[int] = []
            clock = time.perf_counter_ns
            start = time.time()
            deadline = clock() + int(seconds * 1e9)
            i = 0
            while True:
                t0 = clock()
                reserve(f"{tag}-{i}")
                t1 = clock()
                latencies.append(t1 - t0)
                i += 1
                if t1 >= deadline:
                    break
            results.put((i, start, time.time(), latencies))
    finally:
        store.close()
        conn.close()


class SqliteWorkers:
    """K processes (spawned once) writing to one SQLite file on command."""

    def __init__(self, url: str, settings: BenchSettings, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(count)]
        self.seconds = settings.concurrency_seconds
        self.processes = [
            ctx.Process(
                target=_sqlite_worker,
                args=(url, settings.synchronous, settings.busy_timeout_ms, q, self.results),
                daemon=True,
            )
            for q in self.commands
        ]
        for process in self.processes:
            process.start()
        for _ in self.processes:
            self.results.get(timeout=120)

    def run(self, mode: str, count: int, tag: str) -> Sample:
        start_at = time.time() + 0.05
        for n in range(count):
            self.commands[n].put((mode, f"{tag}-p{n}", start_at, self.seconds))
        outcomes = [self.results.get(timeout=120 + self.seconds) for _ in range(count)]
        total = sum(o[0] for o in outcomes)
        wall = max(o[2] for o in outcomes) - min(o[1] for o in outcomes)
        return Sample(total, wall, [lat for o in outcomes for lat in o[3]])

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def bench_sqlite_concurrency(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    url, _ = target.database("concurrency")
    IdempotencyStore.from_url(url, migrate=True).close()
    k = settings.processes
    samples: dict[str, list[Sample]] = {"bare": [], "store": []}
    single: list[Sample] = []
    workers = SqliteWorkers(url, settings, k)
    try:
        for round_ in range(settings.rounds):
            for mode in ("bare", "store") if round_ % 2 == 0 else ("store", "bare"):
                samples[mode].append(workers.run(mode, k, f"c{mode}{round_}"))
        single.append(workers.run("store", 1, "c1"))
    finally:
        workers.close()
    workload = f"reserve (fresh), {k} processes"
    base = _figure("concurrency", workload, "bare sqlite3", samples["bare"])
    mine = _figure("concurrency", workload, "idemstore sync", samples["store"])
    _ratio(mine, base, samples["store"], samples["bare"])
    one = _figure("concurrency", "reserve (fresh), 1 process", "idemstore sync", single)
    one.notes.append("one of the same processes alone: the scaling reference")
    result.figures += [base, mine, one]


async def _postgres_concurrency_round(
    store: AsyncIdempotencyStore | None,
    pool: Any,
    bare: BareAsyncpg,
    k: int,
    seconds: float,
    tag: str,
) -> Sample:
    latencies: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)

    async def task(n: int) -> int:
        i = 0
        while True:
            key = f"{tag}-t{n}-{i}"
            t0 = clock()
            if store is not None:
                await store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
            else:
                async with pool.acquire() as conn:
                    await bare.reserve(conn, key, FINGERPRINT)
            t1 = clock()
            latencies.append(t1 - t0)
            i += 1
            if t1 >= deadline:
                return i

    start = clock()
    counts = await asyncio.gather(*(task(n) for n in range(k)))
    return Sample(sum(counts), (clock() - start) / 1e9, latencies)


def bench_postgres_concurrency(
    target: Target, settings: BenchSettings, result: BenchResult
) -> None:
    url, schema = target.database("concurrency")
    target.sync_store(url, schema, migrate=True).close()
    k = settings.connections
    loop = asyncio.new_event_loop()
    store = target.async_store(url, schema, pool_size=k, max_overflow=0)
    asyncpg = _asyncpg()

    async def create_pool() -> Any:
        return await asyncpg.create_pool(
            target.conninfo(), min_size=k, max_size=k, server_settings={"search_path": schema}
        )

    pool = loop.run_until_complete(create_pool())
    bare = BareAsyncpg(store.engine.dialect)
    samples: dict[str, list[Sample]] = {"bare": [], "store": []}
    seconds = settings.concurrency_seconds
    try:
        # Warm both pools (all k connections opened, statements prepared).
        loop.run_until_complete(_postgres_concurrency_round(store, pool, bare, k, 0.2, "warm-s"))
        loop.run_until_complete(_postgres_concurrency_round(None, pool, bare, k, 0.2, "warm-b"))
        for round_ in range(settings.rounds):
            for mode in ("bare", "store") if round_ % 2 == 0 else ("store", "bare"):
                sample = loop.run_until_complete(
                    _postgres_concurrency_round(
                        store if mode == "store" else None,
                        pool,
                        bare,
                        k,
                        seconds,
                        f"{mode}{round_}",
                    )
                )
                samples[mode].append(sample)
    finally:
        loop.run_until_complete(pool.close())
        loop.run_until_complete(store.close())
        loop.close()
    workload = f"reserve (fresh), {k} connections"
    base = _figure("concurrency", workload, "bare asyncpg", samples["bare"])
    mine = _figure("concurrency", workload, "idemstore async", samples["store"])
    target_ratio = (
        POSTGRES_CONCURRENCY_TARGET if k == POSTGRES_CONCURRENCY_TARGET_CONNECTIONS else None
    )
    _ratio(mine, base, samples["store"], samples["bare"], target_ratio)
    result.figures += [base, mine]


# -- section: import ---------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """This process's peak resident set. Linux's VmHWM belongs to the process's own memory
    map; ``ru_maxrss`` would carry the parent's peak over fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _import_worker(
    path: str, urls: list[str], engine_options: list[dict[str, Any]], results: Any
) -> None:
    """In a fresh process, on three fresh databases: the import with its default workers, the
    import parsed in-process, and the baseline: the same rows, parsed beforehand, inserted with
    the driver's ``executemany`` in one transaction (what the import could reach if parsing
    were free)."""
    import resource

    from ._parse import BATCH_RECORDS, FileParse
    from ._rows import gc_paused

    before = _peak_rss_bytes()
    timings: dict[str, tuple[int, float]] = {}
    for name, workers, url, options in zip(
        ("default", "in-process"), (None, 0), urls, engine_options, strict=False
    ):
        store = IdempotencyStore.from_url(url, migrate=True, **options)
        try:
            began = time.perf_counter()
            count = import_file(store, path, workers=workers).inserted
            timings[name] = (count, time.perf_counter() - began)
        finally:
            store.close()
        if name == "default":
            peak = _peak_rss_bytes()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with gc_paused(), FileParse(path, strict=False, batch_records=BATCH_RECORDS) as parse:
        batches = [(rows, fps) for rows, fps, *_ in parse]

    def insert(d: Any) -> int:
        with gc_paused(), d.bulk_load():
            for rows, fps in batches:
                ops.insert_rows(d, rows, fps)
        return sum(len(rows) for rows, _ in batches)

    store = IdempotencyStore.from_url(urls[2], migrate=True, **engine_options[2])
    try:
        began = time.perf_counter()
        count = store.run(ops.Call("write", insert))
        timings["bare"] = (count, time.perf_counter() - began)
    finally:
        store.close()
    results.put((timings, before, peak, children))


def write_json_file(path: Path, count: int) -> int:
    """A versioned Rust key file with ``count`` synthetic records; its size in bytes."""
    now = ops.now_ms()
    records = {
        r["record_id"]: r for r in (record_to_json(synthetic_record(i, now)) for i in range(count))
    }
    payload = json.dumps({"schema_version": 1, "records": records}, indent=2).encode()
    path.write_bytes(payload)
    return len(payload)


def bench_import(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    count = min(IMPORT_RECORDS, settings.records)
    directory = target.directory or Path(tempfile.mkdtemp(prefix="idemstore-bench-import-"))
    path = directory / "import.json"
    try:
        size = write_json_file(path, count)
        databases = [target.database(f"import-{name}") for name in ("default", "inproc", "bare")]
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        worker = ctx.Process(
            target=_import_worker,
            args=(
                str(path),
                [url for url, _ in databases],
                [target.sync_options(schema) for _, schema in databases],
                results,
            ),
        )
        worker.start()
        try:
            timings, rss_before, rss_peak, rss_workers = results.get(timeout=3600)
        finally:
            worker.join(timeout=60)
    finally:
        if target.directory is None:
            shutil.rmtree(directory, ignore_errors=True)
    workload = f"import {count} records ({size / 1e6:.1f} MB file)"
    samples = {name: Sample(ops_, seconds, []) for name, (ops_, seconds) in timings.items()}
    figures = {
        name: _figure("import", workload, variant, [samples[name]])
        for name, variant in (
            ("bare", "bare driver: executemany of the parsed rows"),
            ("in-process", "idemstore import --workers 0"),
            ("default", "idemstore import"),
        )
    }
    bare = figures["bare"]
    for name in ("in-process", "default"):
        _ratio(figures[name], bare, [samples[name]], [samples["bare"]])
    figures["default"].notes.append(
        f"target {IMPORT_TARGET_RATE:,} records/s for 100k records (issue 3): "
        + ("met" if figures["default"].rate >= IMPORT_TARGET_RATE else "NOT met")
        + f"; peak RSS {rss_peak / 1e6:.0f} MB (process before import {rss_before / 1e6:.0f} "
        f"MB), largest parse worker {rss_workers / 1e6:.0f} MB"
    )
    result.figures += [bare, figures["in-process"], figures["default"]]


# -- running -----------------------------------------------------------------------------


def _versions(target: Target) -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
    for name in ("aiosqlite", "psycopg", "asyncpg"):
        with contextlib.suppress(ImportError):
            versions[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
    return versions


def _settings_dict(target: Target, settings: BenchSettings) -> dict[str, Any]:
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
        "versions": _versions(target),
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
        with _psycopg().connect(target.conninfo()) as conn:
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
    result = BenchResult(_settings_dict(target, settings))
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
        if "import" in settings.sections:
            say("import ...")
            bench_import(target, settings, result)
    finally:
        target.close()
    untrusted = [f for f in result.figures if not f.trusted]
    if untrusted:
        result.notes.append(
            f"TOO SHORT TO TRUST: {len(untrusted)} figure(s), marked '?' (measured for less "
            f"than {TRUST_SECONDS} s or {TRUST_OPS} ops in all): raise --ops / --min-seconds"
        )
    return result


# -- output ------------------------------------------------------------------------------


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"


def _fmt_us(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _fmt_ratio(figure: Figure) -> str:
    if figure.ratio is None:
        return ""
    text = f"{figure.ratio:,.0f}x" if figure.ratio >= 100 else f"{figure.ratio:.2f}"
    return text


def _fmt_target(figure: Figure) -> str:
    if figure.target is None:
        return ""
    sign = "ok" if figure.met else "MISSED"
    target = f"{figure.target:,.0f}x" if figure.target >= 100 else f"{figure.target:.2f}"
    return f">= {target} {sign}"


def format_table(result: BenchResult) -> str:
    headers = ("section", "figure", "variant", "ops/s", "p50 us", "p99 us", "ratio", "target")
    rows = [
        (
            f.section,
            f.workload,
            f.variant + ("" if f.trusted else " ?"),
            _fmt_rate(f.rate),
            _fmt_us(f.p50_us),
            _fmt_us(f.p99_us),
            _fmt_ratio(f),
            _fmt_target(f),
        )
        for f in result.figures
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    right = {3, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_markdown(result: BenchResult) -> str:
    """The table as Markdown (for the README)."""
    headers = ("section", "figure", "variant", "ops/s", "p50 µs", "p99 µs", "ratio", "target")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * 4 + "---|"]
    for f in result.figures:
        cells = (
            f.section,
            f.workload,
            f.variant + ("" if f.trusted else " (too short to trust)"),
            _fmt_rate(f.rate),
            _fmt_us(f.p50_us),
            _fmt_us(f.p99_us),
            _fmt_ratio(f) + (f" vs {f.baseline}" if f.baseline and f.ratio is not None else ""),
            _fmt_target(f),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
    s = result.settings
    lines = [f"idemstore bench: {s['database']}"]
    if "sqlite" in s:
        q = s["sqlite"]
        lines.append(
            f"settings: SQLite {s['versions']['sqlite']}, journal_mode={q['journal_mode']}, "
            f"synchronous={q['synchronous']}, busy_timeout={q['busy_timeout_ms']} ms, "
            f"files in {q['files_in']}"
        )
    if "postgresql" in s:
        q = s["postgresql"]
        lines.append(
            "settings: PostgreSQL "
            + ", ".join(f"{k}={v}" for k, v in q.items())
            + "; JSON emulation files in the system temp directory"
        )
    lines.append(
        f"run: {s['rounds']} interleaved rounds, each >= {s['ops_per_round_min']} ops and "
        f">= {s['min_seconds_per_round']} s; ratio = median of per-round ratios; "
        f"growth sizes {s['growth_sizes']}; {s['cpus']} CPUs; Python {s['versions']['python']}, "
        f"SQLAlchemy {s['versions']['sqlalchemy']}"
    )
    lines += ["", format_table(result), ""]
    for f in result.figures:
        for note in f.notes:
            if not note.startswith("too short to trust"):
                lines.append(f"- {f.section} / {f.workload} / {f.variant}: {note}")
    for note in result.notes:
        lines.append(f"- {note}")
    for section, reason in result.skipped.items():
        lines.append(f"- {section}: skipped: {reason}")
    targets = [f for f in result.figures if f.target is not None]
    if targets:
        met = sum(1 for f in targets if f.met)
        shaky = sum(1 for f in targets if not f.trusted)
        lines.append(
            f"targets: {met}/{len(targets)} met"
            + (f" ({shaky} of them from figures too short to trust)" if shaky else "")
        )
    return "\n".join(lines)


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
        default=POSTGRES_CONCURRENCY_TARGET_CONNECTIONS,
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
