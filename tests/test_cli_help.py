"""The ``idemstore`` command's help and shape: a description on every command and help on
every argument, each ``COMMAND --help`` as a user runs it, the global options before or after
the command, and the README's examples of each command, run as written."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from idemstore.cli.parser import build_parser
from tests.test_cli import run

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (
    "migrate",
    "stats",
    "get",
    "reserve",
    "complete",
    "release",
    "purge-expired",
    "import",
    "export",
    "bench",
)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_and_argument_has_help():
    parser = build_parser()
    commands = _subcommands(parser)
    assert sorted(commands) == sorted(COMMANDS)
    missing = []
    for name, sub in [("idemstore", parser), *commands.items()]:
        if name == "bench":
            sub.parse_known_args([])  # its options are added when it is chosen
        if sub is not parser and not (sub.description or "").strip():
            missing.append(f"{name}: no description")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:  # deliberately hidden (bench's tuning knobs)
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    # What the issue found lacking, saying what it is:
    reserve = commands["reserve"].format_help()
    assert "webhook delivery" in reserve and "first_seen_event_id" in reserve
    assert "the idempotency key" in reserve and "operation the key belongs to" in reserve


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command):
    """``idemstore COMMAND --help`` as a user runs it: exit 0, the description, the global
    options (accepted there too)."""
    proc = subprocess.run(
        [sys.executable, "-m", "idemstore", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: idemstore {command}")
    description = _subcommands(build_parser())[command].description
    assert " ".join(description.split()[:4]) in " ".join(proc.stdout.split())
    assert "--database-url" in proc.stdout and "--verbose" in proc.stdout


def test_top_level_help_lists_the_commands_and_exit_codes():
    proc = subprocess.run(
        [sys.executable, "-m", "idemstore", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in proc.stdout
    assert "Exit status: 0 done; 1 not found or not done" in " ".join(proc.stdout.split())


def test_global_options_before_or_after_the_command(tmp_path, capsys):
    before = f"sqlite:///{tmp_path}/before.db"
    after = f"sqlite:///{tmp_path}/after.db"
    code, out, _ = run(capsys, "migrate", "--database-url", after)
    assert code == 0 and after in out
    code, out, _ = run(capsys, "stats", "--database-url", after, "--json")
    assert code == 0 and json.loads(out)["database"] == after
    # Given on both sides, the one after the command wins (as the closer one).
    code, out, _ = run(capsys, "--database-url", before, "stats", "--database-url", after)
    assert code == 0 and f"database: {after}" in out
    assert not (tmp_path / "before.db").exists()
    # Before the command it still works; -v after the command too.
    code, out, _ = run(capsys, "--database-url", after, "stats", "-v")
    assert code == 0 and f"database: {after}" in out
    # import parses its arguments early (its parse workers start first): the same there.
    sample = str(REPO / "tests" / "data" / "sample_versioned.json")
    code, out, _ = run(capsys, "import", sample, "--json", "--database-url", after)
    assert code == 0 and json.loads(out)["totals"]["inserted"] == 8
    assert not (tmp_path / "before.db").exists()
    args = build_parser().parse_args(["stats", "-v"])
    assert args.verbose is True and args.database_url is None
    args = build_parser().parse_args(["-v", "stats"])
    assert args.verbose is True


def test_the_readme_examples_run_as_written(tmp_path):
    """The README's command-line block: one example of each command, run in order as a shell
    runs it (all but ``bench``, a minute long), each exiting 0, on a fresh SQLite file."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The command line\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("idemstore ")]
    assert sorted({line.split()[1] for line in lines}) == sorted(COMMANDS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMSTORE_")}
    env["IDEMSTORE_DATABASE_URL"] = f"sqlite:///{tmp_path}/readme.db"
    command = shlex.quote(sys.executable) + " -m idemstore"
    outputs = {}
    for line in lines:
        if line.split()[1] == "bench":
            continue
        shell_line = command + line.removeprefix("idemstore")
        proc = subprocess.run(
            ["bash", "-c", shell_line], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, (line, proc.stderr)
        outputs.setdefault(line.split()[1], proc.stdout)  # the first of each command
    assert "created the idemstore schema at" in outputs["migrate"]
    assert json.loads(outputs["get"])["outcome"]["outcome_kind"] == "sent"
    assert json.loads(outputs["stats"])["total"] == 1  # send-2 was released
    assert "unchanged" in outputs["import"]
