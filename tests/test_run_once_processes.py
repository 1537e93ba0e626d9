"""run_once across real processes (issue 11): 8 processes run ``run_once`` on the same 20
keys with a 300 ms lease; one is SIGKILLed while it holds a key, another is stopped
(SIGSTOP) while it holds one, past its lease, and continued (SIGCONT) once someone else has
re-claimed and completed that key. Afterwards:

- every key has exactly one outcome, stored once (status completed);
- the work ran to completion once per key, except the two the victims held: the killed
  one's key once (the killed work never finished), the stalled one's at most twice, and the
  stalled worker's completion was refused with ``LeaseLostError`` (its outcome is not the
  key's);
- every caller that finished got that one outcome, the stalled one too (asking again).

On SQLite (one file) and PostgreSQL (one schema).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import IO, Any

from idemstore import Outcome, RecordStatus
from tests.conftest import Database
from tests.once_worker import OPERATION, TENANT
from tests.test_concurrency import worker_env

WORKER = Path(__file__).with_name("once_worker.py")
KEYS = [f"k{i:02}" for i in range(20)]
LEASE_MS = 300
KILLED, STALLED = "killed", "stalled"


def _start(job: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _read_until(stream: IO[str], wanted: str, seen: list[str]) -> None:
    while True:
        line = stream.readline()
        assert line, f"worker ended before {wanted!r}: {seen}"
        seen.append(line.rstrip("\n"))
        if seen[-1] == wanted:
            return


def test_run_once_across_processes_killed_and_stalled(database: Database) -> None:
    started = time.monotonic()
    store = database.sync_store()
    rng = random.Random(11)
    base = {"url": database.url, "schema": database.schema, "lease_ms": LEASE_MS}
    jobs = {
        KILLED: {**base, "keys": KEYS, "first_work_ms": 60_000},
        STALLED: {**base, "keys": [KEYS[1], KEYS[0], *KEYS[2:]], "first_work_ms": 200},
    }
    for i in range(6):
        jobs[f"w{i}"] = {**base, "keys": rng.sample(KEYS, len(KEYS)), "first_work_ms": 20}
    for name, job in jobs.items():
        job.update(name=name, wait_ms=15_000, work_ms=20)
    procs = {name: _start(job) for name, job in jobs.items()}
    lines: dict[str, list[str]] = {name: [] for name in procs}
    try:
        for proc in procs.values():
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
        # The victims take their first keys, then one is killed and one stopped mid-work
        # (before its first renewal, so not inside a transaction).
        _go(procs[KILLED])
        _read_until(procs[KILLED].stdout, f"S {KEYS[0]}", lines[KILLED])  # type: ignore[arg-type]
        _go(procs[STALLED])
        _read_until(procs[STALLED].stdout, f"S {KEYS[1]}", lines[STALLED])  # type: ignore[arg-type]
        procs[KILLED].send_signal(signal.SIGKILL)
        procs[STALLED].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        for name in procs:
            if name not in (KILLED, STALLED):
                _go(procs[name])
        # Continue the stalled one once its key has been re-claimed and completed by another.
        while True:
            record = store.get(TENANT, OPERATION, KEYS[1])
            if record is not None and record.outcome is not None:
                break
            assert time.monotonic() - stopped < 15, "nobody re-claimed the stalled worker's key"
            time.sleep(0.02)
        assert time.monotonic() - stopped >= LEASE_MS / 1000  # not before its lease ended
        procs[STALLED].send_signal(signal.SIGCONT)
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            lines[name] += out.splitlines()
            if name == KILLED:
                assert proc.returncode == -signal.SIGKILL
            else:
                assert proc.returncode == 0, err
                assert lines[name][-1] == "done", (name, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()

    stored = {key: store.get(TENANT, OPERATION, key) for key in KEYS}
    store.close()
    for key, record in stored.items():
        assert record is not None and record.status is RecordStatus.COMPLETED, key
        assert record.outcome is not None and record.outcome.details == {"k": key}

    starts: Counter[str] = Counter()
    finishes: Counter[str] = Counter()
    returned: dict[str, dict[str, Outcome]] = defaultdict(dict)
    lost: dict[str, list[str]] = defaultdict(list)
    for name, output in lines.items():
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "S":
                starts[rest] += 1
            elif kind == "F":
                finishes[rest] += 1
            elif kind == "L":
                lost[name].append(rest)
            elif kind == "O":
                key, _, text = rest.partition(" ")
                returned[name][key] = Outcome(**json.loads(text))

    # The killed worker's work never finished; its key was re-claimed and worked once.
    assert starts[KEYS[0]] == 2 and finishes[KEYS[0]] == 1
    assert KEYS[0] not in returned[KILLED] and stored[KEYS[0]].outcome.primary_ref_id != KILLED
    # The stalled worker finished its work, but its completion was refused: the key's
    # outcome is the re-claimer's, and the work ran (to completion) twice at most.
    assert lost == {STALLED: [KEYS[1]]}
    assert finishes[KEYS[1]] == 2
    assert stored[KEYS[1]].outcome.primary_ref_id not in (STALLED, KILLED)
    # Every other key: worked once, to completion.
    for key in KEYS[2:]:
        assert (starts[key], finishes[key]) == (1, 1), key
    # Every caller that finished got the key's one outcome, for every key.
    for name in procs:
        if name != KILLED:
            assert returned[name] == {key: stored[key].outcome for key in KEYS}, name
    assert time.monotonic() - started < 30
