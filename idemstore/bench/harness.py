"""The bench's harness: what one run measures (settings, the workloads and their constants),
how (variants taking turns in short chunks, rounds, medians), and what it yields (figures, and
ratios to a baseline measured in the same rounds)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..defaults import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_SYNCHRONOUS
from ..model import Outcome, TenantContext

if TYPE_CHECKING:
    from ..aio import AsyncIdempotencyStore
    from ..store import IdempotencyStore

SECTIONS: Final = ("ops", "json", "growth", "concurrency", "groupcommit", "import", "leases")
GROWTH_SIZES: Final = (10_000, 100_000, 1_000_000)
JSON_RECORDS: Final = 100_000
IMPORT_RECORDS: Final = 100_000
#: A figure measured for less than this, or over fewer operations, says it is too brief to
#: compare.
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

#: Connections of the PostgreSQL concurrency figure, unless told.
POSTGRES_CONNECTIONS: Final = 8

#: What each baseline a ratio is taken to is (the report prints the ones a run used).
BASELINES: Final = {
    "bare sqlite3": "the store's own SQL statements through Python's sqlite3 module on one "
    "open connection, same pragmas, no idemstore code (the ceiling)",
    "bare sqlite3, plainest upsert": "the plainest reservation on Python's sqlite3, same "
    "pragmas: the record's columns with the primary key only (no other index, no CHECK, no "
    "conflict table), one INSERT .. ON CONFLICT DO UPDATE .. RETURNING with the store's CASE "
    "branches, BEGIN IMMEDIATE / COMMIT, the record id hashed as the store does",
    "bare psycopg": "the store's own SQL statements through psycopg on one open connection, "
    "no idemstore code (the ceiling)",
    "bare asyncpg": "the store's own SQL statements through asyncpg (a pool of the same size "
    "for the concurrency figure), no idemstore code (the ceiling)",
    "JSON-file emulation": "the Rust store's persistence, emulated: the whole map serialised, "
    "written, fsynced and renamed on every reservation",
    "idemstore sync, sequential": "the sync store, one reservation at a time, at the run's "
    "synchronous setting (the group-commit section's reference)",
    "idemstore sync, sequential reserve + complete": "the sync store reserving a fresh key "
    "and completing it, one key at a time, at the run's synchronous setting",
    "bare asyncpg, sequential": "the store's own SQL statements through asyncpg, one "
    "reservation at a time (the group-commit section's reference on PostgreSQL)",
    "idemstore async, 1 caller": "the async store without group commit, one caller, taking "
    "turns with the one it is compared with",
    "bare executemany": "the driver's executemany (COPY on PostgreSQL) of the already-parsed "
    "rows in one transaction: the import if parsing were free",
    "idemstore sync reserve": "the sync store's plain reserve (no lease) of a fresh key, in "
    "the same rounds on the same database",
    "idemstore async reserve": "the async store's plain reserve (no lease) of a fresh key, in "
    "the same rounds on the same database",
}


def describe_baseline(name: str) -> str | None:
    """What the baseline ``name`` is (:data:`BASELINES`; the growth ratio's baseline is the
    same store at the smallest table); None for a name it does not know."""
    if name.startswith("idemstore sync at "):
        return f"the same store's reserve rate with {name.rsplit(' ', 1)[1]} records in the table"
    return BASELINES.get(name)


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
    connections: int = POSTGRES_CONNECTIONS
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
    #: ``ratio`` is this figure's rate over the rate of ``baseline`` (a variant's name).
    baseline: str | None = None
    ratio: float | None = None
    #: False: measured too briefly (or against such a baseline) to compare; a note says so.
    trusted: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    settings: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def baselines(self) -> dict[str, str | None]:
        """The baselines this run's ratios are taken to, each with what it is."""
        names = dict.fromkeys(f.baseline for f in self.figures if f.baseline is not None)
        return {name: describe_baseline(name) for name in names}

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "figures": [asdict(f) for f in self.figures],
            "baselines": self.baselines(),
            "notes": self.notes,
            "skipped": self.skipped,
        }


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


def make_figure(
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
        figure.notes.append(too_brief(total_ops, total_seconds, min_ops))
    return figure


def too_brief(ops: int, seconds: float, min_ops: int = TRUST_OPS) -> str:
    """The note of a figure measured too briefly to compare."""
    return f"n={ops:,} ops in {seconds:.2f} s, too {'few' if ops < min_ops else 'brief'} to compare"


def set_ratio(
    figure: Figure, baseline: Figure, mine: Sequence[Sample], theirs: Sequence[Sample]
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
    if not baseline.trusted and figure.trusted:
        figure.trusted = False
        figure.notes.append(f"its baseline, {baseline.variant}, was too brief to compare")


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


# -- rounds ---------------------------------------------------------------------------------


Runner = Callable[[int], object]
AsyncRunner = Callable[[int], Awaitable[object]]
W = TypeVar("W")


async def callers_round(
    reserve: Callable[[str], Awaitable[object]], n: int, seconds: float, tag: str
) -> Sample:
    """``n`` tasks reserving fresh keys for ``seconds``: one sample over all of them."""
    latencies: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)

    async def task(t: int) -> int:
        i = 0
        while True:
            t0 = clock()
            await reserve(f"{tag}-t{t}-{i}")
            t1 = clock()
            latencies.append(t1 - t0)
            i += 1
            if t1 >= deadline:
                return i

    start = clock()
    counts = await asyncio.gather(*(task(t) for t in range(n)))
    return Sample(sum(counts), (clock() - start) / 1e9, latencies)


def workloads(
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


def store_sync(store: IdempotencyStore) -> tuple[Any, Any, Any]:
    return (
        lambda key, fp: store.reserve(TENANT, OPERATION, key, OWNER, fp),
        lambda key: store.complete(TENANT, OPERATION, key, OUTCOME),
        lambda key: store.get(TENANT, OPERATION, key),
    )


def store_async(store: AsyncIdempotencyStore) -> tuple[Any, Any, Any]:
    return (
        lambda key, fp: store.reserve(TENANT, OPERATION, key, OWNER, fp),
        lambda key: store.complete(TENANT, OPERATION, key, OUTCOME),
        lambda key: store.get(TENANT, OPERATION, key),
    )


@dataclass
class Variant:
    name: str
    baseline: str | None
    sync: Callable[[str], dict[str, Runner]] | None = None
    aio: Callable[[str], dict[str, AsyncRunner]] | None = None
    workloads: tuple[str, ...] = WORKLOADS


def run_rounds(
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


def figures_from(
    section: str,
    variants: Sequence[Variant],
    samples: Mapping[tuple[str, str], list[Sample]],
) -> list[Figure]:
    figures: dict[tuple[str, str], Figure] = {}
    for (workload, name), rounds in samples.items():
        figures[(workload, name)] = make_figure(section, workload, name, rounds)
    for variant in variants:
        if variant.baseline is None:
            continue
        for workload in variant.workloads:
            mine = figures.get((workload, variant.name))
            base = figures.get((workload, variant.baseline))
            if mine is None or base is None:
                continue
            set_ratio(
                mine,
                base,
                samples[(workload, variant.name)],
                samples[(workload, variant.baseline)],
            )
    order = {name: i for i, name in enumerate(v.name for v in variants)}
    # The ops workloads in their order; a section's own workloads (leases) after them.
    rank = {name: i for i, name in enumerate(WORKLOADS)}
    return sorted(
        figures.values(), key=lambda f: (rank.get(f.workload, len(rank)), order[f.variant])
    )
