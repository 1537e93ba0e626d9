"""The bench's ``groupcommit`` section: fresh reservations by 1, 8, 32 and 128 concurrent
callers, with and without group commit, as ratios to the sequential store in the same rounds.

SQLite (at the run's ``synchronous``): the async store with and without ``group_commit=True``;
beside the sequential sync store (the baseline) the same at ``synchronous=NORMAL`` and the
sequential async store; and one caller with and without group commit taking turns in short
chunks (what group commit costs a lone caller).

PostgreSQL, where idemstore builds no group commit: what one would gain, measured on bare
asyncpg. Each caller's reservation in a transaction of its own on a pool of as many
connections (what the store does), against the same reservations queued to one connection
that runs whatever queued in one transaction, each in a savepoint (group commit as SQLite's
store does it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from ..aio import AsyncIdempotencyStore
from ..db.offload import MAX_GROUP
from ..store import IdempotencyStore
from .baselines import BareAsyncpg, asyncpg_module
from .harness import (
    FINGERPRINT,
    OPERATION,
    OUTCOME,
    OWNER,
    TENANT,
    BenchResult,
    BenchSettings,
    Sample,
    Variant,
    callers_round,
    figures_from,
    make_figure,
    run_rounds,
    set_ratio,
)
from .target import Target

#: Concurrent callers of the section's figures.
CALLERS: Final = (1, 8, 32, 128)
SEQUENTIAL: Final = "reserve (fresh), sequential"
BASELINE: Final = "idemstore sync, sequential"
FRESH_BASELINE: Final = "idemstore sync, sequential reserve + complete"


def callers_workload(n: int) -> str:
    return f"reserve (fresh), {n} concurrent caller{'s' if n > 1 else ''}"


def sequential_round(reserve: Callable[[str], object], seconds: float, tag: str) -> Sample:
    """One caller reserving fresh keys for ``seconds``, synchronously."""
    latencies: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    i = 0
    while True:
        t0 = clock()
        reserve(f"{tag}-{i}")
        t1 = clock()
        latencies.append(t1 - t0)
        i += 1
        if t1 >= deadline:
            return Sample(i, (t1 - start) / 1e9, latencies)


Round = Callable[[str], Sample]


def timed_figures(
    rounds: int, plan: list[tuple[str, str, Round]], baseline: str, result: BenchResult
) -> None:
    """Run each ``(workload, variant, round)`` of ``plan`` once per round, the order turning
    round by round; figures with ratios to the variant ``baseline`` of the same rounds."""
    samples: dict[tuple[str, str], list[Sample]] = {}
    for round_ in range(rounds):
        shift = round_ % len(plan)
        for workload, variant, run in plan[shift:] + plan[:shift]:
            sample = run(f"gc{round_}-{len(samples)}-{variant}-{workload}")
            samples.setdefault((workload, variant), []).append(sample)
    base_key = next(key for key in samples if key[1] == baseline)
    base = make_figure("groupcommit", base_key[0], baseline, samples[base_key])
    result.figures.append(base)
    for key, mine in samples.items():
        if key == base_key:
            continue
        figure = make_figure("groupcommit", key[0], key[1], mine)
        set_ratio(figure, base, mine, samples[base_key])
        result.figures.append(figure)


def bench_group_commit(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    """The section on the run's target (see the module docstring)."""
    if target.sqlite:
        _bench_sqlite(target, settings, result)
    else:
        _bench_postgres(target, settings, result)


def _reserve_sync(store: IdempotencyStore) -> Callable[[str], object]:
    return lambda key: store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)


def _reserve_async(store: AsyncIdempotencyStore) -> Callable[[str], Awaitable[object]]:
    return lambda key: store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)


def _fresh_sync(store: IdempotencyStore) -> Callable[[str], object]:
    """A fresh key reserved, then its outcome stored (the peers' "fresh" path)."""

    def fresh(key: str) -> object:
        store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
        return store.complete(TENANT, OPERATION, key, OUTCOME)

    return fresh


def _fresh_async(store: AsyncIdempotencyStore) -> Callable[[str], Awaitable[object]]:
    async def fresh(key: str) -> object:
        await store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
        return await store.complete(TENANT, OPERATION, key, OUTCOME)

    return fresh


def _bench_sqlite(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    url, _ = target.database("groupcommit")
    loop = asyncio.new_event_loop()
    sync_store = target.sync_store(url, None, migrate=True)
    normal = IdempotencyStore.from_url(
        url, synchronous="NORMAL", busy_timeout_ms=settings.busy_timeout_ms
    )
    plain = target.async_store(url, None)
    grouped = target.async_store(url, None, group_commit=True)
    seconds = settings.concurrency_seconds
    try:
        for store in (plain, grouped):
            loop.run_until_complete(store.check_schema())
        sync_variant = f"idemstore sync, synchronous={settings.synchronous.upper()}"
        plan: list[tuple[str, str, Round]] = [
            (
                SEQUENTIAL,
                BASELINE,
                lambda tag: sequential_round(_reserve_sync(sync_store), seconds, tag),
            ),
            (
                SEQUENTIAL,
                "idemstore sync, synchronous=NORMAL",
                lambda tag: sequential_round(_reserve_sync(normal), seconds, tag),
            ),
        ]
        for n in CALLERS:
            plan.append(
                (callers_workload(n), "idemstore async", async_rounds(loop, plain, n, seconds))
            )
            plan.append(
                (
                    callers_workload(n),
                    "idemstore async + group commit",
                    async_rounds(loop, grouped, n, seconds),
                )
            )
        timed_figures(settings.rounds, plan, BASELINE, result)
        # Reserve then complete (two writes, as the peer comparison's "fresh" path).
        both = "reserve + complete (fresh)"
        timed_figures(
            settings.rounds,
            [
                (
                    f"{both}, sequential",
                    FRESH_BASELINE,
                    lambda tag: sequential_round(_fresh_sync(sync_store), seconds, tag),
                ),
                (
                    f"{both}, 32 concurrent callers",
                    "idemstore async + group commit",
                    lambda tag: loop.run_until_complete(
                        callers_round(_fresh_async(grouped), 32, seconds, tag)
                    ),
                ),
            ],
            FRESH_BASELINE,
            result,
        )
        average = grouped_average(grouped)
        result.notes.append(
            f"groupcommit: '{BASELINE}' is {sync_variant}, one call at a time; a group is at "
            f"most {MAX_GROUP} writes; groups formed held "
            + ("none" if average is None else f"{average:.1f} writes on average")
        )
        # What a lone caller pays: the two async stores taking turns in chunks of 20 calls.
        lone = [
            lone_variant("idemstore async, 1 caller", None, plain),
            lone_variant(
                "idemstore async + group commit, 1 caller", "idemstore async, 1 caller", grouped
            ),
        ]
        samples = run_rounds(lone, loop, settings, ("reserve (fresh)",), "gc-lone")
        result.figures += figures_from("groupcommit", lone, samples)
    finally:
        sync_store.close()
        normal.close()
        loop.run_until_complete(plain.close())
        loop.run_until_complete(grouped.close())
        loop.close()


def async_rounds(
    loop: asyncio.AbstractEventLoop, store: AsyncIdempotencyStore, n: int, seconds: float
) -> Round:
    """A round of ``n`` concurrent callers of ``store``, ``seconds`` long."""
    return lambda tag: loop.run_until_complete(
        callers_round(_reserve_async(store), n, seconds, tag)
    )


def lone_variant(name: str, baseline: str | None, store: AsyncIdempotencyStore) -> Variant:
    """One caller of ``store``, for :func:`~idemstore.bench.harness.run_rounds`."""

    def runners(tag: str) -> dict[str, Callable[[int], Awaitable[object]]]:
        reserve = _reserve_async(store)
        return {"reserve (fresh)": lambda i: reserve(f"{tag}-{i}")}

    return Variant(name, baseline, aio=runners, workloads=("reserve (fresh)",))


def grouped_average(store: AsyncIdempotencyStore) -> float | None:
    """Writes per group so far (transactions of more than one write), or None."""
    worker: Any = store._offload
    groups = getattr(worker, "groups", 0)
    return worker.grouped_calls / groups if groups else None


#: PostgreSQL: connections of the transaction-per-call pool (at most; the server's
#: max_connections is shared).
PG_POOL_MAX: Final = 32


class PgGroups:
    """Group commit on one asyncpg connection, as the SQLite store does it: a writer task
    takes whatever queued while its last transaction ran (at most :data:`MAX_GROUP`), runs it
    in one transaction, each call in a savepoint (asyncpg's nested transaction), one COMMIT."""

    def __init__(self, conn: Any, bare: BareAsyncpg) -> None:
        self.conn = conn
        self.bare = bare
        self.queue: asyncio.Queue[tuple[str, asyncio.Future[object]] | None] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._write())

    async def reserve(self, key: str) -> object:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((key, future))
        return await future

    async def _write(self) -> None:
        while (first := await self.queue.get()) is not None:
            group = [first]
            while not self.queue.empty() and len(group) < MAX_GROUP:
                item = self.queue.get_nowait()
                if item is None:
                    self.queue.put_nowait(None)
                    break
                group.append(item)
            try:
                if len(group) == 1:
                    results = [await self.bare.reserve(self.conn, group[0][0], FINGERPRINT)]
                else:
                    async with self.conn.transaction():
                        results = [
                            await self.bare.reserve(self.conn, key, FINGERPRINT) for key, _ in group
                        ]
            except Exception as error:
                for _, future in group:
                    future.set_exception(error)
            else:
                for (_, future), value in zip(group, results, strict=True):
                    future.set_result(value)

    async def close(self) -> None:
        self.queue.put_nowait(None)
        await self.task


def _bench_postgres(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    url, schema = target.database("groupcommit")
    target.sync_store(url, schema, migrate=True).close()
    loop = asyncio.new_event_loop()
    asyncpg = asyncpg_module()
    store = target.async_store(url, schema)
    bare = BareAsyncpg(store.engine.dialect)
    seconds = settings.concurrency_seconds
    options = {"server_settings": {"search_path": schema}}

    async def open_all() -> tuple[Any, Any, PgGroups]:
        pool = await asyncpg.create_pool(
            target.conninfo(), min_size=PG_POOL_MAX, max_size=PG_POOL_MAX, **options
        )
        conn = await asyncpg.connect(target.conninfo(), **options)
        return pool, conn, PgGroups(conn, bare)

    pool, conn, groups = loop.run_until_complete(open_all())

    async def per_call(key: str) -> object:
        async with pool.acquire() as c:
            return await bare.reserve(c, key, FINGERPRINT)

    def rounds(reserve: Callable[[str], Awaitable[object]], n: int) -> Round:
        return lambda tag: loop.run_until_complete(callers_round(reserve, n, seconds, tag))

    try:
        base = "bare asyncpg, sequential"
        plan: list[tuple[str, str, Round]] = [(SEQUENTIAL, base, rounds(per_call, 1))]
        for n in CALLERS:
            plan.append(
                (callers_workload(n), "bare asyncpg, a transaction per call", rounds(per_call, n))
            )
            plan.append(
                (
                    callers_workload(n),
                    "bare asyncpg, grouped on one connection",
                    rounds(groups.reserve, n),
                )
            )
        timed_figures(settings.rounds, plan, base, result)
        result.notes.append(
            f"groupcommit (PostgreSQL, bare asyncpg): a transaction per call on a pool of "
            f"{PG_POOL_MAX} connections, against group commit built on one connection "
            f"(savepoints, at most {MAX_GROUP} calls a transaction)"
        )
    finally:
        loop.run_until_complete(groups.close())
        loop.run_until_complete(conn.close())
        loop.run_until_complete(pool.close())
        loop.run_until_complete(store.close())
        loop.close()
