"""The bench's single-connection sections: ``ops`` (reserve, complete and get of both stores
against the bare driver), ``growth`` (the reserve rate with 10k..1M records in the table) and
``json`` (the Rust store's JSON-file persistence, emulated)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..aio import AsyncIdempotencyStore
from ..db.codec import KEY, RECORD_COLUMNS, full_row
from ..db.schema import records as R
from ..ids import idempotency_record_id
from ..rules import now_ms
from ..store import IdempotencyStore
from ..transfer.writer import record_to_json
from .baselines import (
    PLAIN_EXTRAS,
    PLAIN_TABLE,
    BareAsyncpg,
    BareSync,
    PlainestSqlite,
    asyncpg_module,
    psycopg_module,
)
from .datagen import synthetic_record
from .harness import (
    FINGERPRINT,
    GROWTH_SIZES,
    JSON_RECORDS,
    JSON_TRUST_OPS,
    OPERATION,
    OWNER,
    TENANT,
    WORKLOADS,
    BenchResult,
    BenchSettings,
    Figure,
    Runner,
    Sample,
    Variant,
    figures_from,
    make_figure,
    run_rounds,
    set_ratio,
    store_async,
    store_sync,
    workloads,
)
from .target import Target, make_path


def bare_workloads(bare: BareSync, seeds: Sequence[str]) -> Callable[[str], dict[str, Runner]]:
    return lambda tag: workloads(bare.reserve, bare.complete, bare.get, seeds, tag)


def store_workloads(
    store: IdempotencyStore, seeds: Sequence[str]
) -> Callable[[str], dict[str, Runner]]:
    return lambda tag: workloads(*store_sync(store), seeds, tag)


def seed_keys_of(store: IdempotencyStore, count: int) -> list[str]:
    keys = [f"seed-{i}" for i in range(count)]
    for key in keys:
        store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
    return keys


#: The clock the plainest-upsert comparison gives every reservation (``now_ms=``).
PLAIN_NOW = 1_700_000_000_000
PLAINEST = "bare sqlite3, plainest upsert"


def plainest_variants(
    bare: BareSync, sync_store: IdempotencyStore, async_store: AsyncIdempotencyStore
) -> list[Variant]:
    """Fresh reservations against the plainest upsert that does the job
    (:class:`PlainestSqlite`), taking turns: the cost ladder on bare sqlite3 (the plainest
    table plus one thing of the store's table each: the index on ``expires_at_ms``, the same
    index only where it is set, the CHECKs; then the store's own statements on its own table)
    and both stores' public ``reserve`` with ``now_ms`` given."""
    only = ("reserve (fresh)",)

    def plain(table: str, extras: tuple[str, ...]) -> Callable[[str], dict[str, Runner]]:
        baseline = PlainestSqlite(bare.connection, table, extras)
        return lambda tag: {
            only[0]: lambda i: baseline.reserve(f"{tag}-{i}", FINGERPRINT, PLAIN_NOW)
        }

    def sync_runs(tag: str) -> dict[str, Runner]:
        return {
            only[0]: lambda i: sync_store.reserve(
                TENANT, OPERATION, f"{tag}-{i}", OWNER, FINGERPRINT, now_ms=PLAIN_NOW
            )
        }

    def async_runs(tag: str) -> dict[str, Callable[[int], Any]]:
        return {
            only[0]: lambda i: async_store.reserve(
                TENANT, OPERATION, f"{tag}-{i}", OWNER, FINGERPRINT, now_ms=PLAIN_NOW
            )
        }

    def store_sql(tag: str) -> dict[str, Runner]:
        return {only[0]: lambda i: bare.reserve(f"{tag}-{i}", FINGERPRINT)}

    ladder = [
        Variant(
            f"{PLAINEST} + {extra}", PLAINEST, sync=plain(f"plain_{n}", (extra,)), workloads=only
        )
        for n, extra in enumerate(PLAIN_EXTRAS)
    ]
    return [
        Variant(PLAINEST, None, sync=plain(PLAIN_TABLE, ()), workloads=only),
        *ladder,
        Variant("bare sqlite3, the store's statements", PLAINEST, sync=store_sql, workloads=only),
        Variant("idemstore sync, now_ms given", PLAINEST, sync=sync_runs, workloads=only),
        Variant("idemstore async, now_ms given", PLAINEST, aio=async_runs, workloads=only),
    ]


def _postgres_variants(
    bare: BareSync,
    bare_pg: BareAsyncpg,
    conn: Any,
    sync_store: IdempotencyStore,
    async_store: AsyncIdempotencyStore,
    seeds: Sequence[str],
) -> list[Variant]:
    """The ops section's variants on PostgreSQL: each store against its own bare driver."""
    return [
        Variant(
            "bare psycopg",
            None,
            sync=lambda tag: workloads(bare.reserve, bare.complete, bare.get, seeds, tag),
        ),
        Variant(
            "idemstore sync",
            "bare psycopg",
            sync=lambda tag: workloads(*store_sync(sync_store), seeds, tag),
        ),
        Variant(
            "bare asyncpg",
            None,
            aio=lambda tag: workloads(
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
            aio=lambda tag: workloads(*store_async(async_store), seeds, tag),
        ),
    ]


def bench_ops(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    url, schema = target.database("ops")
    loop = asyncio.new_event_loop()
    sync_store = target.sync_store(url, schema, migrate=True)
    async_store = target.async_store(url, schema)
    extra_store: AsyncIdempotencyStore | None = None
    bare = target.bare_sync(url, schema, sync_store.engine.dialect)
    asyncpg_conn: Any = None
    try:
        seeds = seed_keys_of(sync_store, min(settings.seed_keys, max(10, settings.ops)))
        loop.run_until_complete(async_store.check_schema())
        variants: list[Variant] = []
        if target.sqlite:
            bare_name = "bare sqlite3"
            variants.append(
                Variant(
                    bare_name,
                    None,
                    sync=lambda tag: workloads(bare.reserve, bare.complete, bare.get, seeds, tag),
                )
            )
            variants.append(
                Variant(
                    "idemstore sync",
                    bare_name,
                    sync=lambda tag: workloads(*store_sync(sync_store), seeds, tag),
                )
            )
            variants.append(
                Variant(
                    "idemstore async",
                    bare_name,
                    aio=lambda tag: workloads(*store_async(async_store), seeds, tag),
                )
            )
            variants += plainest_variants(bare, sync_store, async_store)
            # The same store on aiosqlite through SQLAlchemy's greenlet bridge, for reference.
            greenlet = extra_store = target.async_store(url, schema, offload="greenlet")
            variants.append(
                Variant(
                    "idemstore async (aiosqlite, greenlet)",
                    bare_name,
                    aio=lambda tag: workloads(*store_async(greenlet), seeds, tag),
                    workloads=("reserve (fresh)",),
                )
            )
        else:
            asyncpg = asyncpg_module()
            asyncpg_conn = loop.run_until_complete(
                asyncpg.connect(target.conninfo(), server_settings={"search_path": schema})
            )
            bare_pg = BareAsyncpg(async_store.engine.dialect)
            variants += _postgres_variants(
                bare, bare_pg, asyncpg_conn, sync_store, async_store, seeds
            )
        if extra_store is not None:
            loop.run_until_complete(extra_store.check_schema())
        samples = run_rounds(variants, loop, settings, WORKLOADS, "ops")
        result.figures += figures_from("ops", variants, samples)
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


def synthetic_rows(start: int, stop: int, now: int) -> list[tuple[Any, ...]]:
    """The rows (:mod:`idemstore.db.codec`) of the synthetic records ``start..stop``, sorted by
    primary key (a fast bulk load)."""
    columns = list(RECORD_COLUMNS)
    base = list(full_row(synthetic_record(0, now), 0))
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
    rows.sort(key=lambda row: row[KEY])
    return rows


def preload(target: Target, url: str, schema: str | None, start: int, stop: int) -> float:
    """Add records ``start..stop`` in bulk, outside the measured settings; seconds taken."""
    began = time.perf_counter()
    now = now_ms()
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
        psycopg = psycopg_module()
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
    with psycopg_module().connect(target.conninfo()) as conn:
        conn.execute(f'INSERT INTO "{dest[1]}".{R.name} SELECT * FROM "{source[1]}".{R.name}')


def _growth_ratio(
    sizes: Sequence[int], by_size: dict[int, Figure], samples: dict[tuple[str, str], list[Sample]]
) -> Figure:
    """The reserve rate at the largest size as a ratio to the smallest."""
    first, last = sizes[0], sizes[-1]
    a, b = by_size[first], by_size[last]
    ratio = Figure(
        section="growth",
        workload=f"reserve rate at {last} vs {first} records",
        variant="idemstore sync",
        ops=a.ops + b.ops,
        seconds=a.seconds + b.seconds,
        rate=b.rate,
    )
    if not b.trusted:
        ratio.trusted = False
        ratio.notes.append(f"the rate at {last} records was too brief to compare")
    baseline = Figure(**{**asdict(a), "variant": f"idemstore sync at {first}"})
    set_ratio(
        ratio,
        baseline,
        samples[("reserve (fresh)", f"idemstore sync @{last}")],
        samples[("reserve (fresh)", f"idemstore sync @{first}")],
    )
    return ratio


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
                    sync=bare_workloads(bares[-1], []),
                    workloads=("reserve (fresh)",),
                )
            )
            variants.append(
                Variant(
                    f"idemstore sync @{size}",
                    f"{bare_name} @{size}",
                    sync=store_workloads(store, []),
                    workloads=("reserve (fresh)",),
                )
            )
        samples = run_rounds(variants, loop, settings, ("reserve (fresh)",), "growth")
    finally:
        for store in stores:
            store.close()
        for bare in bares:
            bare.connection.close()
        loop.close()
    by_size: dict[int, Figure] = {}
    for figure in figures_from("growth", variants, samples):
        name, size_text = figure.variant.rsplit(" @", 1)
        figure.workload = f"reserve (fresh), {int(size_text)} records"
        figure.variant = name
        if figure.baseline is not None:
            figure.baseline = figure.baseline.rsplit(" @", 1)[0]
        result.figures.append(figure)
        if name == "idemstore sync":
            by_size[int(size_text)] = figure
    if len(sizes) > 1:
        result.figures.append(_growth_ratio(sizes, by_size, samples))
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
    now = now_ms()
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
                fresh = synthetic_record(count + i, now_ms())
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
    figure = make_figure(
        "json",
        f"reserve (fresh), {count} records",
        "JSON-file emulation",
        [Sample(len(latencies), seconds, latencies)],
        min_ops=JSON_TRUST_OPS,
    )
    # Few operations by design (each rewrites the whole file; JSON_TRUST_OPS are enough):
    # say what was done.
    figure.notes.append(
        f"{len(latencies)} ops timed, rate extrapolated from them; file {size / 1e6:.1f} MB; "
        f"of each op {statistics.mean(io_ns) / 1e6:.0f} ms is write+fsync+rename "
        f"(the rest is Python's json.dumps, slower than serde_json)"
    )
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
        if not reference.trusted:
            vs.notes.append("the idemstore figure was too brief to compare")
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
