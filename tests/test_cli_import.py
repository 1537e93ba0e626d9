"""``idemstore import`` as a person runs it: a progress line on a terminal (records, rate,
elapsed, time left; as wide as the terminal) and nothing on a pipe, numbers written alike in
the progress line and the table, a JSON report also when the import fails, and ``-v`` lines
that say what the import did."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from idemstore.bench import datagen
from idemstore.cli.transfer import PROGRESS_MIN_BYTES, ProgressLine
from tests.badfiles import BAD_FILES

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "sample_versioned.json"
#: Records of the big file: above the size that gets a progress line (and parse workers).
BIG_RECORDS = 7_000
COLUMNS = 64


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IDEMSTORE_")}


def _command(db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "idemstore", "--database-url", f"sqlite:///{db}", *args]


def _migrated(tmp_path: Path, name: str) -> Path:
    db = tmp_path / name
    subprocess.run(_command(db, "migrate"), env=_env(), check=True, capture_output=True)
    return db


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "keys.json"
    datagen.write_realistic_file(path, BIG_RECORDS)
    assert path.stat().st_size >= PROGRESS_MIN_BYTES
    return path


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run ``argv`` with its stderr on a pseudo-terminal ``COLUMNS`` wide (stdout a pipe):
    exit status, stdout, and what the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=_env()
    )
    os.close(slave)
    received = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    return proc.wait(timeout=120), out, received.decode()


def test_progress_on_a_terminal_and_nothing_on_a_pipe(tmp_path: Path, big_file: Path) -> None:
    code, out, terminal = _run_on_a_terminal(
        _command(_migrated(tmp_path, "tty.db"), "import", str(big_file))
    )
    assert code == 0, terminal
    drawn = [line for line in terminal.replace("\r\n", "\n").split("\r") if line.strip()]
    assert drawn, terminal
    for line in drawn:
        assert len(line.rstrip("\n")) < COLUMNS, line  # fits the terminal
    last = drawn[-1].strip()
    # Records done, their rate and the time elapsed; the share read; the bar.
    assert last.startswith("[#") and "100.0%" in last, last
    assert f"{BIG_RECORDS:,} records" in last and "/s" in last and "elapsed 0:0" in last, last
    # Before the end: the time left.
    assert any("ETA" in line for line in drawn[:-1]), drawn
    # The table writes the numbers as the progress line does.
    row = out.splitlines()[2].split()
    assert row[2:4] == [f"{BIG_RECORDS:,}", f"{BIG_RECORDS:,}"], out

    piped = subprocess.run(
        _command(_migrated(tmp_path, "pipe.db"), "import", str(big_file)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""


def test_progress_line_says_records_rate_elapsed_and_time_left() -> None:
    now = [100.0]
    stream = io.StringIO()
    line = ProgressLine(stream, columns=80, clock=lambda: now[0])
    now[0] = 102.0
    line(50_000, 25, 100)
    drawn = stream.getvalue()
    assert len(drawn) == 80  # "\r" + 79 columns
    bar = re.match(r"\r\[(#*)(\.*)\] ", drawn)
    assert bar is not None, drawn
    assert len(bar.group(1)) == (len(bar.group(1)) + len(bar.group(2))) // 4  # 25%
    assert "25.0%  50,000 records  25,000/s  elapsed 0:02  ETA 0:06" in drawn
    now[0] = 102.05
    line(60_000, 30, 100)  # drawn at most every 0.1 s
    assert stream.getvalue() == drawn
    now[0] = 110.0
    line(200_000, 100, 100)
    last = stream.getvalue()[len(drawn) :]
    assert "100.0%  200,000 records  20,000/s  elapsed 0:10" in last and "ETA" not in last
    assert last.endswith("\n")
    line.close()  # ended once only
    assert stream.getvalue().count("\n") == 1
    narrow = io.StringIO()
    ProgressLine(narrow, columns=40, clock=lambda: 0.0)(5, 1, 2)
    assert not narrow.getvalue().startswith("\r[") and len(narrow.getvalue()) == 40


def test_json_report_also_when_the_import_fails(tmp_path: Path) -> None:
    """``--json`` prints a report whatever happens: a file refused, a database not migrated.
    The exit status and the error line on stderr are those without ``--json``."""
    db = _migrated(tmp_path, "json.db")
    bad = tmp_path / "bad.json"
    bad.write_bytes(next(b for b in BAD_FILES if b.name == "status_wrong_case").data)
    for args in (["import", str(bad)], ["import", "--json", str(bad)]):
        done = subprocess.run(
            _command(db, *args), env=_env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2
        assert done.stderr.startswith("idemstore: error: ") and done.stderr.count("\n") == 1
        error = done.stderr.removeprefix("idemstore: error: ").strip()
    report = json.loads(done.stdout)
    assert report["error"] == error and "field 'status'" in error
    assert report["failed"] == [{"path": str(bad), "error": error}]
    assert report["files"] == [] and report["totals"]["inserted"] == 0

    fresh = tmp_path / "not-migrated.db"
    fresh.touch()
    done = subprocess.run(
        _command(fresh, "import", "--json", str(SAMPLE)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert "no idemstore schema" in report["error"]
    assert report["error"] in done.stderr

    done = subprocess.run(
        _command(db, "import", "--json", str(SAMPLE)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["error"] is None


def test_verbose_import_says_what_it_did(tmp_path: Path, big_file: Path) -> None:
    db = _migrated(tmp_path, "v.db")
    done = subprocess.run(
        _command(db, "-v", "import", "--workers", "2", str(big_file), str(SAMPLE)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    log = done.stderr
    size = f"{big_file.stat().st_size:,} bytes"
    # The file, its form, who parsed it, what the table held; the batches and timings.
    assert f"{big_file}: {size}, versioned form, 2 parse worker process(es)" in log, log
    assert "the table is empty: batches are inserted without look-ups" in log
    batches = re.search(rf"{re.escape(str(big_file))}: {BIG_RECORDS:,} records in (\d+) batch", log)
    assert batches is not None and int(batches.group(1)) >= BIG_RECORDS // 2000, log
    assert "s writing, " in log and "waiting for the parse" in log
    assert f"{big_file}: imported in " in log
    again = subprocess.run(
        _command(db, "-v", "import", "--workers", "0", str(SAMPLE)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    size = f"{SAMPLE.stat().st_size:,} bytes"
    assert f"{SAMPLE}: {size}, versioned form, parsed in this process; the table has " in (
        again.stderr
    )
    assert "each batch is compared with them" in again.stderr
