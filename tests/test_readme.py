"""The README runs as written: every ```python block is run whole, in a fresh interpreter and
an empty folder, unless the line before it is a marker ``<!-- fragment: why -->`` (a block
that is not a script on purpose, such as an ``env.py``; there should be few). A block that
names the placeholder server ``...://app@db.internal/app`` runs against the test PostgreSQL
server (a scratch database, that placeholder's URLs pointed at it); every other block runs on
SQLite files in its folder. Its links lead somewhere, and its first command's parts exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import postgres_url_or_skip

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
#: The PostgreSQL server the README's examples name; the test points it at its own.
PLACEHOLDER = re.compile(r"(postgresql(?:\+\w+)?)://app@db\.internal/app")
#: Blocks that are fragments on purpose: few, each with its reason.
MAX_FRAGMENTS = 3


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    fragment: str | None  # the marker's reason, if the block is a fragment

    @property
    def postgresql(self) -> bool:
        return PLACEHOLDER.search(self.code) is not None


def python_blocks(text: str) -> list[Block]:
    """Every ```python block of ``text``, with the ``<!-- fragment: ... -->`` marker on the
    line before it, if any."""
    found = []
    pattern = r"(?:^<!-- fragment:(?P<why>[^>]*)-->\n)?^```python\n(?P<code>.*?)^```"
    for match in re.finditer(pattern, text, flags=re.S | re.M):
        why = match.group("why")
        line = text.count("\n", 0, match.start("code"))
        found.append(Block(line, match.group("code"), why.strip() if why is not None else None))
    return found


BLOCKS = python_blocks(README)
RUNNABLE = [b for b in BLOCKS if b.fragment is None]


def test_blocks_are_found_and_fragments_are_few_and_say_why():
    assert len(BLOCKS) == README.count("```python\n")
    fragments = [b for b in BLOCKS if b.fragment is not None]
    assert len(fragments) <= MAX_FRAGMENTS, [b.line for b in fragments]
    assert all(b.fragment for b in fragments), "a fragment marker says why"
    assert any(b.postgresql for b in RUNNABLE) and any(not b.postgresql for b in RUNNABLE)


def test_the_marker_reader():
    text = (
        "x\n```python\nprint(1)\n```\n<!-- fragment: an env.py -->\n```python\nimport a\n```\n"
        '```python\nf("postgresql+asyncpg://app@db.internal/app")\n```\n'
    )
    one, two, three = python_blocks(text)
    assert (one.code, one.fragment, one.postgresql) == ("print(1)\n", None, False)
    assert (two.code, two.fragment) == ("import a\n", "an env.py")
    assert three.fragment is None and three.postgresql


@pytest.fixture
def scratch_postgres() -> Iterator[sa.URL]:
    """A fresh empty PostgreSQL database (the examples use the default schema, which a
    search_path cannot give asyncpg), dropped afterwards."""
    server = sa.make_url(postgres_url_or_skip())
    name = f"readme_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        server.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield server.set(database=name)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def _run(code: str, cwd: Path) -> None:
    script = cwd / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMSTORE_")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "block", [b for b in RUNNABLE if not b.postgresql], ids=lambda b: f"line{b.line}"
)
def test_readme_example_runs_on_sqlite(block: Block, tmp_path: Path) -> None:
    _run(block.code, tmp_path)


@pytest.mark.parametrize(
    "block", [b for b in RUNNABLE if b.postgresql], ids=lambda b: f"line{b.line}"
)
def test_readme_example_runs_on_postgresql(
    block: Block, tmp_path: Path, scratch_postgres: sa.URL
) -> None:
    where = scratch_postgres.render_as_string(hide_password=False).split("://", 1)[1]
    _run(PLACEHOLDER.sub(lambda m: f"{m.group(1)}://{where}", block.code), tmp_path)


def test_readme_links_lead_somewhere():
    """Relative links name files of the repository, and FORMAT.md is named by its link."""
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (REPO / target).exists(), target
    unlinked = README.replace("[docs/FORMAT.md](docs/FORMAT.md)", "")
    assert "FORMAT.md" not in unlinked


def test_readme_has_the_two_commands_first():
    commands = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    assert "idemstore migrate" in commands[0]
    assert commands[1].strip() == ".venv/bin/python -m pytest"
