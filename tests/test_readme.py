"""The README's runnable examples run, and its first command's parts exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# Blocks that define everything they use (the caller's-transaction one sketches an app, the
# PostgreSQL one names a server that is not there).
RUNNABLE = [block for block in BLOCKS if "Order(" not in block and "db.internal" not in block]


def test_readme_has_the_two_commands_first():
    commands = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    assert "idemstore migrate" in commands[0]
    assert commands[1].strip() == ".venv/bin/python -m pytest"


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"example{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(block, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(block, encoding="utf-8")
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=120)
