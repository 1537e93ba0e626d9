"""The bench's sections that run in processes of their own: ``concurrency`` (K writer
processes on one SQLite file, or K connections of the async store on PostgreSQL against bare
asyncpg) and ``import`` (the importer in a fresh process, against the driver's own bulk insert
of the same rows)."""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..aio import AsyncIdempotencyStore
from ..db.bulk import insert_rows
from ..db.ops import Call
from ..store import IdempotencyStore
from ..transfer.importer import import_file
from .baselines import BareAsyncpg, BareSync, asyncpg_module, open_bare_sqlite
from .datagen import write_synthetic_file
from .harness import (
    FINGERPRINT,
    IMPORT_RECORDS,
    OPERATION,
    OWNER,
    TENANT,
    BenchResult,
    BenchSettings,
    Sample,
    callers_round,
    make_figure,
    set_ratio,
)
from .target import Target, make_path

# -- section: concurrency ----------------------------------------------------------------


def sqlite_worker(
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
                target=sqlite_worker,
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
    base = make_figure("concurrency", workload, "bare sqlite3", samples["bare"])
    mine = make_figure("concurrency", workload, "idemstore sync", samples["store"])
    set_ratio(mine, base, samples["store"], samples["bare"])
    one = make_figure("concurrency", "reserve (fresh), 1 process", "idemstore sync", single)
    one.notes.append("one of the same processes alone: the scaling reference")
    result.figures += [base, mine, one]


def _postgres_concurrency_round(
    store: AsyncIdempotencyStore | None,
    pool: Any,
    bare: BareAsyncpg,
    k: int,
    seconds: float,
    tag: str,
) -> Awaitable[Sample]:
    async def reserve(key: str) -> object:
        if store is not None:
            return await store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
        async with pool.acquire() as conn:
            return await bare.reserve(conn, key, FINGERPRINT)

    return callers_round(reserve, k, seconds, tag)


def bench_postgres_concurrency(
    target: Target, settings: BenchSettings, result: BenchResult
) -> None:
    url, schema = target.database("concurrency")
    target.sync_store(url, schema, migrate=True).close()
    k = settings.connections
    loop = asyncio.new_event_loop()
    store = target.async_store(url, schema, pool_size=k, max_overflow=0)
    asyncpg = asyncpg_module()

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
    base = make_figure("concurrency", workload, "bare asyncpg", samples["bare"])
    mine = make_figure("concurrency", workload, "idemstore async", samples["store"])
    set_ratio(mine, base, samples["store"], samples["bare"])
    result.figures += [base, mine]


# -- section: import ---------------------------------------------------------------------


def peak_rss_bytes() -> int:
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


def import_worker(
    path: str, urls: list[str], engine_options: list[dict[str, Any]], results: Any
) -> None:
    """In a fresh process, on three fresh databases: the import with its default workers, the
    import parsed in-process, and the baseline: the same rows, parsed beforehand, inserted with
    the driver's ``executemany`` in one transaction (what the import could reach if parsing
    were free)."""
    import resource

    from ..transfer.parse import BATCH_RECORDS, FileParse
    from ..transfer.rows import gc_paused

    before = peak_rss_bytes()
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
            peak = peak_rss_bytes()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with gc_paused(), FileParse(path, strict=False, batch_records=BATCH_RECORDS) as parse:
        batches = [(rows, fps) for rows, fps, *_ in parse]

    def insert(d: Any) -> int:
        with gc_paused(), d.bulk_load():
            for rows, fps in batches:
                insert_rows(d, rows, fps)
        return sum(len(rows) for rows, _ in batches)

    store = IdempotencyStore.from_url(urls[2], migrate=True, **engine_options[2])
    try:
        began = time.perf_counter()
        count = store.run(Call("write", insert))
        timings["bare"] = (count, time.perf_counter() - began)
    finally:
        store.close()
    results.put((timings, before, peak, children))


def bench_import(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    count = min(IMPORT_RECORDS, settings.records)
    directory = target.directory or Path(tempfile.mkdtemp(prefix="idemstore-bench-import-"))
    path = directory / "import.json"
    try:
        size = write_synthetic_file(path, count)
        databases = [target.database(f"import-{name}") for name in ("default", "inproc", "bare")]
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        worker = ctx.Process(
            target=import_worker,
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
        name: make_figure("import", workload, variant, [samples[name]])
        for name, variant in (
            ("bare", "bare executemany"),
            ("in-process", "idemstore import --workers 0"),
            ("default", "idemstore import"),
        )
    }
    bare = figures["bare"]
    for name in ("in-process", "default"):
        set_ratio(figures[name], bare, [samples[name]], [samples["bare"]])
    figures["default"].notes.append(
        f"peak RSS {rss_peak / 1e6:.0f} MB (process before import {rss_before / 1e6:.0f} "
        f"MB), largest parse worker {rss_workers / 1e6:.0f} MB"
    )
    result.figures += [bare, figures["in-process"], figures["default"]]
