"""``idemstore bench`` runs and reports every section (a smoke test: it checks that the bench
works, not how fast anything is)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from idemstore.bench import command as bench
from idemstore.bench.harness import WORKLOADS

POSTGRES_ENV = "IDEMSTORE_TEST_POSTGRES_URL"

TINY = [
    "--records",
    "300",
    "--ops",
    "20",
    "--rounds",
    "1",
    "--min-seconds",
    "0",
    "--json-ops",
    "1",
    "--processes",
    "2",
    "--connections",
    "2",
    "--concurrency-seconds",
    "0.1",
]
SECTIONS = {"ops", "growth", "json", "concurrency", "groupcommit", "leases"}


def _check(report: dict[str, object]) -> None:
    figures = report["figures"]
    assert isinstance(figures, list)
    assert {f["section"] for f in figures} >= SECTIONS
    ops = [f for f in figures if f["section"] == "ops"]
    assert {f["workload"] for f in ops} == set(WORKLOADS)
    assert all(f["rate"] > 0 for f in figures)
    # Every idemstore figure of the ops section is a ratio to the bare driver.
    assert all(f["ratio"] is not None for f in ops if f["variant"].startswith("idemstore"))
    # A lease and run_once, each as a ratio to the same store's plain reserve in the run.
    leases = {f["variant"]: f for f in figures if f["section"] == "leases"}
    for flavour in ("sync", "async"):
        base = f"idemstore {flavour} reserve"
        assert leases[base]["ratio"] is None
        for what in ("reserve, lease", "reserve + complete", "run_once, lease"):
            assert leases[f"idemstore {flavour} {what}"]["baseline"] == base
    # Tiny sizes: the bench says so, plainly, on each such figure and once in all.
    brief = [f for f in figures if not f["trusted"]]
    assert brief
    assert all(any("to compare" in n for n in f["notes"]) for f in brief)
    assert any("too few to compare" in n for n in report["notes"])
    # A measurement, not a verdict: no targets, and every baseline is said what it is.
    assert "targets" not in report
    assert not any("target" in f or "met" in f for f in figures)
    baselines = report["baselines"]
    assert isinstance(baselines, dict)
    assert {f["baseline"] for f in figures if f["ratio"] is not None} == set(baselines)
    assert all(baselines.values()), baselines
    settings = report["settings"]
    assert isinstance(settings, dict)
    assert settings["records"] == 300
    # The importer may or may not exist yet; either way the section reports.
    skipped = report["skipped"]
    assert isinstance(skipped, dict)
    assert "import" in skipped or any(f["section"] == "import" for f in figures)


def test_bench_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    assert bench.main(["--database-url", url, *TINY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    _check(report)
    assert report["settings"]["sqlite"]["synchronous"] == "FULL"
    # Its files are gone afterwards.
    assert list(tmp_path.iterdir()) == []


def test_bench_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    args = ["--database-url", url, *TINY, "--sections", "ops", "--synchronous", "normal"]
    assert bench.main([*args, "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "synchronous=NORMAL" in out
    assert "| section | figure |" in out
    assert "bare sqlite3" in out and "idemstore async" in out
    # Figures and ratios, each ratio with its baseline and what that is; no verdicts.
    assert "ratio  vs" in out and "baselines (what each ratio is taken to):" in out
    assert "  bare sqlite3: the store's own SQL statements through Python's sqlite3" in out
    assert "too few to compare" in out
    for shout in ("TOO SHORT", "MISSED", "NOT met", "targets:", "target", "issue"):
        assert shout.lower() not in out.lower(), shout


def test_bench_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("IDEMSTORE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"IDEMSTORE_REQUIRE_POSTGRES=1 but {POSTGRES_ENV} is not set")
        pytest.skip(f"the PostgreSQL bench smoke test needs {POSTGRES_ENV}")
    assert bench.main(["--database-url", url, *TINY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    _check(report)
    variants = {f["variant"] for f in report["figures"]}
    assert {"bare psycopg", "bare asyncpg", "idemstore sync", "idemstore async"} <= variants


def test_plainest_baseline_answers_as_the_store() -> None:
    """The plainest-upsert baseline binds every column of the record row (a column added to
    the record must reach it) and gives the store's three answers."""
    import sqlite3

    from idemstore.bench.baselines import PlainestSqlite

    connection = sqlite3.connect(":memory:", isolation_level=None)
    plain = PlainestSqlite(connection)
    assert plain.reserve("k", "fp-a", 1_000) == "reserved"
    assert plain.reserve("k", "fp-a", 1_001) == "duplicate"
    assert plain.reserve("k", "fp-b", 1_002) == "conflict"
    assert plain.reserve("other", "fp-b", 1_003) == "reserved"
