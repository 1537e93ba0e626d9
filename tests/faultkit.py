"""Helpers for the fault tests: deep values, the Rust parser's nesting count, a deep Python
stack, and the ``idemstore`` command run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
#: serde_json's recursion limit: a document nested this deep is refused, one less is read.
RUST_REFUSES_DEPTH = 128
#: Containers around ``details`` in the versioned file the Rust store writes (file object,
#: ``records`` map, record, ``outcome``).
DETAILS_CONTAINERS = 4
DETAILS_LIMIT = RUST_REFUSES_DEPTH - 1 - DETAILS_CONTAINERS  # 123

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def nested(depth: int, leaf: Any = "leaf") -> Any:
    """A value nested ``depth`` containers deep, arrays and objects alternating."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def nested_text(depth: int, leaf: str = "1") -> str:
    """``nested(depth)`` as compact JSON text, built without recursion."""
    opens = "".join("[" if i % 2 else '{"k":' for i in reversed(range(depth)))
    closes = "".join("]" if i % 2 else "}" for i in range(depth))
    return opens + leaf + closes


def max_depth(text: str) -> int:
    """The deepest nesting of a JSON text, arrays and objects counted alike (serde_json's
    count; strings skipped)."""
    depth = deepest = 0
    for m in _TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def rust_reads(text: str) -> bool:
    """Whether the Rust store's parser accepts this file's nesting."""
    return max_depth(text) < RUST_REFUSES_DEPTH


def stack_depth() -> int:
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back  # type: ignore[assignment]
    return depth


def near_recursion_limit(fn: Callable[[], T], frames_left: int = 60) -> T:
    """``fn()`` called with only ``frames_left`` frames to spare below the recursion limit."""

    def dive(n: int) -> T:
        return fn() if n <= 0 else dive(n - 1)

    return dive(sys.getrecursionlimit() - frames_left - stack_depth())


def command() -> list[str]:
    """The installed ``idemstore`` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "idemstore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "idemstore"]


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def _drop_file_override() -> None:  # pragma: no cover - runs in the child, before exec
    """Drop root's power to read and write past file permissions (from the capability
    bounding set: the command then runs as root without it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_ordinary_user() -> bool:
    """Whether :func:`run_cli` (``ordinary=True``) runs the command bound by file permissions:
    a non-root user is; root is once it drops its file-permission override."""
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(
        ["cat", "/proc/self/status"],
        capture_output=True,
        text=True,
        preexec_fn=_drop_file_override,
        check=False,
    )
    return probe.returncode == 0 and "CapEff:\t0000000000000000" not in probe.stdout


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    ordinary: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``idemstore ARGS`` in a fresh process; ``ordinary``: bound by file permissions
    even when this process runs as root (see :func:`as_ordinary_user`)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("IDEMSTORE_DATABASE_URL", None)
    drop = ordinary and os.geteuid() == 0
    return subprocess.run(
        [*command(), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
        preexec_fn=_drop_file_override if drop else None,
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert the command failed as a user's mistake: exit 2, one ``idemstore: error:`` line,
    no traceback. Returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("idemstore: error: "), lines[0]
    return lines[0]
