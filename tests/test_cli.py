"""The ``idemstore`` command, in process (``cli.main``) on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from idemstore import TenantContext, cli, create_engine, idempotency_record_id, now_ms
from idemstore.cli.database import database_name
from idemstore.db.schema import SCHEMA_REVISIONS, VERSION_TABLE
from idemstore.migrate import downgrade


@pytest.fixture
def url_args(database):
    """``--database-url`` for a fresh migrated database (PostgreSQL: the test's schema)."""
    store = database.sync_store()
    store.close()
    if database.schema is not None:
        return ["--database-url", f"{database.url}?options=-csearch_path%3D{database.schema}"]
    return ["--database-url", database.url]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_reserve_get_stats_purge(url_args, capsys):
    code, out, _ = run(
        capsys,
        *url_args,
        "reserve",
        "--owner",
        "o",
        "--fingerprint",
        "fp-a",
        "--expires-at-ms",
        "99999999999999",
        "webhook.provider_event",
        "evt-1",
    )
    assert code == 0 and out.startswith("Reserved: idem_")
    code, out, _ = run(
        capsys,
        *url_args,
        "reserve",
        "--owner",
        "o",
        "--fingerprint",
        "fp-b",
        "webhook.provider_event",
        "evt-1",
    )
    assert code == 0 and out.startswith("Conflict: ")

    code, out, _ = run(capsys, *url_args, "get", "webhook.provider_event", "evt-1")
    assert code == 0
    record = json.loads(out)
    assert list(record)[:4] == ["schema_version", "record_id", "tenant_context", "operation"]
    assert record["status"] == "conflicted"
    assert record["conflict_fingerprints"] == ["fp-b"]
    assert record["tenant_context"] == {
        "org_id": "local",
        "workspace_id": "local",
        "source": "local_implicit",
    }

    code, out, _ = run(capsys, *url_args, "stats")
    assert code == 0
    assert "webhook.provider_event" in out and "conflicted" in out
    code, out, _ = run(capsys, *url_args, "stats", "--json")
    stats = json.loads(out)
    assert stats["total"] == 1
    assert stats["by_status"] == {"reserved": 0, "completed": 0, "conflicted": 1}
    assert stats["by_operation"] == {"webhook.provider_event": 1}

    code, out, _ = run(capsys, *url_args, "purge-expired", "--now-ms", "99999999999999")
    assert (code, out.strip()) == (0, "purged 1 expired record(s)")
    code, _, err = run(capsys, *url_args, "get", "webhook.provider_event", "evt-1")
    assert code == 1 and "no such record" in err


def test_tenant_options_scope_get(url_args, capsys):
    run(
        capsys,
        *url_args,
        "reserve",
        "--org",
        "org-a",
        "--workspace",
        "ws",
        "--deployment",
        "d",
        "--actor",
        "me",
        "--source",
        "explicit",
        "--owner",
        "o",
        "--fingerprint",
        "f",
        "op",
        "k",
    )
    code, out, _ = run(
        capsys,
        *url_args,
        "get",
        "--org",
        "org-a",
        "--workspace",
        "ws",
        "--deployment",
        "d",
        "op",
        "k",
    )
    assert code == 0
    assert json.loads(out)["tenant_context"] == {
        "org_id": "org-a",
        "workspace_id": "ws",
        "deployment_id": "d",
        "actor_id": "me",
        "source": "explicit",
    }
    assert run(capsys, *url_args, "get", "--org", "org-a", "--workspace", "ws", "op", "k")[0] == 1


def test_invalid_input_is_one_line_and_exit_2(url_args, capsys):
    code, _, err = run(
        capsys, *url_args, "reserve", "--owner", " ", "--fingerprint", "f", "op", "k"
    )
    assert code == 2
    assert err.strip() == "idemstore: error: idempotency owner cannot be empty"


def test_password_is_never_printed(capsys):
    code, out, err = run(
        capsys, "--database-url", "postgresql://user:s3cret@127.0.0.1:1/nowhere", "stats"
    )
    assert code == 2
    assert "s3cret" not in out + err
    assert "user:***@127.0.0.1:1/nowhere" in err


def test_database_url_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDEMSTORE_DATABASE_URL", f"sqlite:///{tmp_path}/env.db")
    code, out, _ = run(capsys, "migrate")
    assert code == 0 and f"sqlite:///{tmp_path}/env.db" in out
    assert (tmp_path / "env.db").exists()


def test_default_is_embedded_sqlite_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IDEMSTORE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "migrate")[0] == 0
    assert (tmp_path / "idemstore.db").exists()


@pytest.mark.parametrize("command", [["stats"], ["export", "-"]])
def test_output_closed_early_is_not_a_traceback(tmp_path, command):
    from idemstore import IdempotencyStore

    url = f"sqlite:///{tmp_path}/pipe.db"
    with IdempotencyStore.from_url(url, migrate=True, synchronous="OFF") as store:
        for i in range(1500):  # a table larger than a pipe's buffer (64 KiB)
            store.reserve(TenantContext.local_implicit(), f"operation-{i:04}", "k", "o", "f")
    proc = subprocess.Popen(
        [sys.executable, "-m", "idemstore", "--database-url", url, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 141


# -- every command as a user runs it ----------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
LEGACY = REPO / "tests" / "data" / "sample_legacy.json"


@pytest.fixture
def sqlite_args(tmp_path):
    """``--database-url`` of a fresh migrated SQLite file."""
    url = f"sqlite:///{tmp_path}/cli.db"
    assert cli.main(["--database-url", url, "migrate"]) == 0
    return ["--database-url", url]


def _reserve(capsys, url_args, operation="op", key="k", fingerprint="fp"):
    code, out, _ = run(
        capsys, *url_args, "reserve", "--owner", "o", "--fingerprint", fingerprint, operation, key
    )
    assert code == 0, out
    return out.split()[1]  # the record id


def _get(capsys, url_args, *argv):
    code, out, err = run(capsys, *url_args, "get", *argv)
    return code, (json.loads(out) if code == 0 else None), err


def test_reserve_complete_get(url_args, capsys):
    """The flow a user finishes from the command line (SQLite and PostgreSQL)."""
    record_id = _reserve(capsys, url_args, "outbox.send", "send-1")
    began = now_ms()
    code, out, err = run(
        capsys,
        *url_args,
        "complete",
        "--outcome-kind",
        "sent",
        "--primary-ref",
        "message:msg-42",
        "--secondary-ref",
        "provider:abc:def",
        "--details",
        '{"attempts": 2, "to": ["a@example.com"], "big": 18446744073709551615}',
        "outbox.send",
        "send-1",
    )
    assert (code, err) == (0, "")
    assert out.startswith(f"Completed: {record_id} (outcome sent, completed_at_ms ")
    code, record, _ = _get(capsys, url_args, "outbox.send", "send-1")
    assert code == 0
    assert record["status"] == "completed"
    outcome = record["outcome"]
    assert began <= outcome.pop("completed_at_ms") <= now_ms()  # defaults to now
    assert outcome == {
        "outcome_kind": "sent",
        "primary_ref_kind": "message",
        "primary_ref_id": "msg-42",
        "secondary_ref_kind": "provider",
        "secondary_ref_id": "abc:def",  # split at the first colon
        "details": {"attempts": 2, "big": 18446744073709551615, "to": ["a@example.com"]},
    }
    # A duplicate now replays; get by record id finds the same record.
    code, out, _ = run(
        capsys, *url_args, "reserve", "--owner", "o", "--fingerprint", "fp", "outbox.send", "send-1"
    )
    assert out.startswith(f"Duplicate: {record_id} (status completed")
    code, by_key, _ = _get(capsys, url_args, "outbox.send", "send-1")
    assert by_key["last_seen_at_ms"] >= record["last_seen_at_ms"]  # the duplicate was seen
    assert _get(capsys, url_args, "--record-id", record_id)[1] == by_key


def test_complete_options(sqlite_args, capsys, tmp_path, monkeypatch):
    _reserve(capsys, sqlite_args)
    details = tmp_path / "details.json"
    details.write_text('{"from": "file", "n": [1, 2.5, null]}')
    code, out, _ = run(
        capsys,
        *sqlite_args,
        "complete",
        "--outcome-kind",
        "accepted",
        "--completed-at-ms",
        "1700000000123",
        "--details",
        f"@{details}",
        "--json",
        "op",
        "k",
    )
    assert code == 0
    record = json.loads(out)
    assert record["outcome"] == {
        "outcome_kind": "accepted",
        "completed_at_ms": 1700000000123,
        "details": {"from": "file", "n": [1, 2.5, None]},
    }
    monkeypatch.setattr(sys, "stdin", io.StringIO('"from stdin"'))
    code, _, _ = run(
        capsys, *sqlite_args, "complete", "--outcome-kind", "again", "--details", "@-", "op", "k"
    )
    assert code == 0
    assert _get(capsys, sqlite_args, "op", "k")[1]["outcome"]["details"] == "from stdin"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--details", "{x"], "--details is not JSON: Expecting property name"),
        (["--details", "NaN"], "--details: NaN is not a JSON number"),
        (["--details", "[1e999]"], "--details: the number 1e999 is out of range"),
        (["--details", '{"a": 1, "a": 2}'], "--details: an object repeats the key 'a'"),
        (["--details", "@/nonexistent/d.json"], "--details @/nonexistent/d.json: cannot read"),
        (["--details", "[" * 200 + "]" * 200], "details"),
        (["--primary-ref", "message"], "--primary-ref takes KIND:ID"),
        (["--secondary-ref", ":id"], "--secondary-ref takes KIND:ID"),
        (["--primary-ref", "kind:"], "--primary-ref takes KIND:ID"),
        (["--completed-at-ms", "-1"], "completed_at_ms"),
    ],
)
def test_complete_bad_input_is_one_line_exit_2_nothing_written(sqlite_args, capsys, argv, message):
    _reserve(capsys, sqlite_args)
    code, out, err = run(
        capsys, *sqlite_args, "complete", "--outcome-kind", "sent", *argv, "op", "k"
    )
    assert (code, out) == (2, "")
    assert err.startswith("idemstore: error: ") and message in err
    assert err.count("\n") == 1
    assert _get(capsys, sqlite_args, "op", "k")[1]["status"] == "reserved"


def test_complete_without_such_record_exits_1(sqlite_args, capsys):
    _reserve(capsys, sqlite_args)
    code, out, err = run(capsys, *sqlite_args, "complete", "--outcome-kind", "x", "op", "other")
    assert (code, out) == (1, "")
    assert err.strip() == (
        "no such record: operation 'op', key 'other' in tenant org 'local', workspace 'local'"
    )
    code, _, _ = run(
        capsys, *sqlite_args, "complete", "--outcome-kind", "x", "--org", "o2", "op", "k"
    )
    assert code == 1


def test_release(sqlite_args, capsys):
    record_id = _reserve(capsys, sqlite_args)
    code, out, err = run(capsys, *sqlite_args, "release", "--fingerprint", "other", "op", "k")
    assert (code, out) == (1, "")
    assert err.startswith("nothing released: tenant org 'local', workspace 'local' has no record")
    code, out, err = run(capsys, *sqlite_args, "release", "--fingerprint", "fp", "op", "k")
    assert (code, out, err) == (0, f"Released: {record_id}\n", "")
    assert _get(capsys, sqlite_args, "op", "k")[0] == 1
    code, out, _ = run(capsys, *sqlite_args, "release", "--fingerprint", "fp", "--json", "op", "k")
    assert code == 1
    assert json.loads(out) == {"released": False, "record_id": record_id}
    # A completed record is not released.
    _reserve(capsys, sqlite_args)
    run(capsys, *sqlite_args, "complete", "--outcome-kind", "done", "op", "k")
    assert run(capsys, *sqlite_args, "release", "--fingerprint", "fp", "op", "k")[0] == 1
    assert _get(capsys, sqlite_args, "op", "k")[1]["status"] == "completed"


def test_reserve_json(sqlite_args, capsys):
    code, out, _ = run(
        capsys, *sqlite_args, "reserve", "--owner", "o", "--fingerprint", "f", "--json", "op", "k"
    )
    assert code == 0
    payload = json.loads(out)
    token = payload.pop("token")
    assert isinstance(token, str) and token
    assert payload == {
        "result": "Reserved",
        "record_id": idempotency_record_id(TenantContext.local_implicit(), "op", "k"),
        "status": "reserved",
        "conflict_count": 0,
        "lease_expires_at_ms": None,
        "expires_at_ms": None,
    }
    code, out, _ = run(
        capsys, *sqlite_args, "reserve", "--owner", "o", "--fingerprint", "g", "--json", "op", "k"
    )
    payload = json.loads(out)
    assert (payload["result"], payload["token"], payload["conflict_count"]) == ("Conflict", None, 1)


def test_get_by_record_id(sqlite_args, capsys):
    record_id = _reserve(capsys, sqlite_args)
    code, by_id, _ = _get(capsys, sqlite_args, "--record-id", record_id)
    assert code == 0 and by_id == _get(capsys, sqlite_args, "op", "k")[1]
    code, _, err = _get(capsys, sqlite_args, "--record-id", "idem_nothing")
    assert code == 1 and err.strip() == "no such record: record id 'idem_nothing'"
    for argv in (["--record-id", record_id, "op", "k"], ["--record-id", record_id, "--org", "x"]):
        code, _, err = _get(capsys, sqlite_args, *argv)
        assert code == 2 and err.startswith("idemstore: error: get: --record-id names the record")
    code, _, err = _get(capsys, sqlite_args, "op")
    assert code == 2 and "give OPERATION KEY" in err


def test_get_names_the_tenant_it_searched(sqlite_args, capsys):
    assert run(capsys, *sqlite_args, "import", str(LEGACY))[0] == 0
    # The legacy record op/k has no tenant_context: the legacy tenant, not local_implicit.
    code, out, err = run(capsys, *sqlite_args, "get", "op", "k")
    assert (code, out) == (1, "")
    legacy_id = idempotency_record_id(
        TenantContext.explicit_user_workspace("local", "default", None, "system"), "op", "k"
    )
    assert err.splitlines() == [
        "no such record: operation 'op', key 'k' in tenant org 'local', workspace 'local'",
        "hint: that is the default tenant (local_implicit); name another with --org ORG "
        "--workspace WS [--deployment D], or look the record up with --record-id ID",
        "hint: a record with this operation and key is under the legacy tenant (records "
        "imported from a file without tenant_context): add --org local --workspace default, "
        f"or --record-id {legacy_id}",
    ]
    code, record, _ = _get(
        capsys, sqlite_args, "--org", "local", "--workspace", "default", "op", "k"
    )
    assert code == 0 and record["record_id"] == legacy_id
    # A tenant named: no hint, the tenant it searched.
    code, _, err = _get(capsys, sqlite_args, "--org", "a", "--workspace", "b", "op", "k")
    assert code == 1
    assert err == "no such record: operation 'op', key 'k' in tenant org 'a', workspace 'b'\n"
    code, _, err = _get(capsys, sqlite_args, "nothing", "here")
    assert code == 1 and len(err.splitlines()) == 2 and "legacy" not in err


def test_export_to_standard_output(sqlite_args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, *sqlite_args, "import", str(LEGACY))[0] == 0
    file = tmp_path / "out.json"
    code, out, _ = run(capsys, *sqlite_args, "export", str(file))
    assert code == 0 and out == f"exported 8 record(s) to {file}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "idemstore", *sqlite_args, "export", "-"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout == file.read_bytes()  # the file's bytes, nothing else
    assert proc.stderr == b"exported 8 record(s) to standard output\n"
    assert not (tmp_path / "-").exists()


def test_migrate_says_what_it_did(database, capsys):
    """On SQLite and PostgreSQL: created, already at, upgraded from one revision to another."""
    url = database.url
    if database.schema is not None:
        url = f"{database.url}?options=-csearch_path%3D{database.schema}"
    where = database_name(argparse.Namespace(database_url=url))
    head = SCHEMA_REVISIONS[-1]
    code, out, _ = run(capsys, "migrate", "--database-url", url)
    assert (code, out) == (0, f"{where}: created the idemstore schema at {head}\n")
    code, out, _ = run(capsys, "migrate", "--database-url", url)
    assert (code, out) == (0, f"{where}: the idemstore schema is already at {head} (head)\n")
    with database.sync_engine().begin() as connection:
        downgrade(connection, SCHEMA_REVISIONS[0])
    code, out, _ = run(capsys, "migrate", "--status", "--json", "--database-url", url)
    assert json.loads(out)["current"] == [SCHEMA_REVISIONS[0]]
    code, out, _ = run(capsys, "migrate", "--json", "--database-url", url)
    assert code == 0
    assert json.loads(out) == {
        "database": where,
        "done": "upgraded",
        "before": SCHEMA_REVISIONS[0],
        "after": head,
    }
    code, out, _ = run(capsys, "migrate", "--status", "--database-url", url)
    assert f"current:  {head}\n" in out and "state:    at head\n" in out


def test_migrate_status(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    first, head = SCHEMA_REVISIONS[0], SCHEMA_REVISIONS[-1]
    code, out, _ = run(capsys, "migrate", "--status", "--database-url", url)
    assert code == 0
    assert not (tmp_path / "s.db").exists()  # nothing created
    lines = out.splitlines()
    assert lines[1] == f"current:  none (the file {tmp_path}/s.db does not exist)"
    assert lines[2] == f"head:     {head}"
    assert lines[3] == "state:    no schema: run `idemstore migrate` to create it"
    assert lines[4] == "history (oldest first):"
    assert [line.split()[:2] for line in lines[5:]] == [["pending", r] for r in SCHEMA_REVISIONS]
    assert "Records and their conflict fingerprints." in lines[5]

    assert run(capsys, "migrate", "--database-url", url)[0] == 0
    engine = create_engine(url)
    with engine.begin() as connection:
        downgrade(connection, first)
    engine.dispose()
    code, out, _ = run(capsys, "migrate", "--status", "--database-url", url)
    lines = out.splitlines()
    assert lines[1] == f"current:  {first}"
    assert lines[3] == "state:    behind the head: run `idemstore migrate` to upgrade it"
    assert [line.split()[0] for line in lines[5:]] == ["applied"] + ["pending"] * (
        len(SCHEMA_REVISIONS) - 1
    )

    assert run(capsys, "migrate", "--database-url", url)[0] == 0
    code, out, _ = run(capsys, "migrate", "--status", "--json", "--database-url", url)
    status = json.loads(out)
    assert status["current"] == [head] and status["head"] == head and status["at_head"]
    assert [r["applied"] for r in status["history"]] == [True] * len(SCHEMA_REVISIONS)
    assert [r["revision"] for r in status["history"]] == list(SCHEMA_REVISIONS)

    with sa.create_engine(url).begin() as connection:
        connection.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'"))
    code, out, _ = run(capsys, "migrate", "--status", "--database-url", url)
    assert code == 0
    assert "current:  9999_future" in out
    assert "which this idemstore" in out and "does not know" in out
    assert out.count("pending") == len(SCHEMA_REVISIONS)


def test_tokens_fence_complete_and_release(sqlite_args, capsys):
    """reserve prints the token; complete/release --token write only while it holds."""
    code, out, _ = run(
        capsys,
        *sqlite_args,
        "reserve",
        "--owner",
        "worker-1",
        "--fingerprint",
        "fp",
        "--lease-ms",
        "1",
        "op",
        "k",
    )
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("Reserved: ") and len(lines) == 3
    first = lines[1].removeprefix("token: ")
    assert first != lines[1] and first
    assert lines[2].startswith("lease until: ") and lines[2].endswith(" (lease_expires_at_ms)")
    time.sleep(0.05)  # the 1 ms lease ends: the same request re-claims the key
    code, out, _ = run(
        capsys,
        *sqlite_args,
        "reserve",
        "--owner",
        "worker-2",
        "--fingerprint",
        "fp",
        "--lease-ms",
        "60000",
        "--json",
        "op",
        "k",
    )
    claim = json.loads(out)
    assert claim["result"] == "Reserved" and claim["token"] not in (None, first)
    assert claim["lease_expires_at_ms"] > now_ms() + 50_000

    code, out, err = run(
        capsys, *sqlite_args, "complete", "--outcome-kind", "late", "--token", first, "op", "k"
    )
    assert (code, out) == (1, "")
    assert "this token named no longer holds it" in err and err.count("\n") == 1
    code, _, err = run(
        capsys, *sqlite_args, "release", "--fingerprint", "fp", "--token", first, "op", "k"
    )
    assert code == 1 and err.endswith("with fingerprint 'fp' under this token\n")
    assert _get(capsys, sqlite_args, "op", "k")[1]["owner"] == "worker-2"  # untouched

    code, out, _ = run(
        capsys,
        *sqlite_args,
        "complete",
        "--outcome-kind",
        "done",
        "--token",
        claim["token"],
        "op",
        "k",
    )
    assert code == 0 and out.startswith("Completed: ")
    code, _, err = run(
        capsys, *sqlite_args, "complete", "--outcome-kind", "x", "--token", "not-a-token", "op", "k"
    )
    assert code == 2 and err.startswith("idemstore: error: token must be a token")


def test_reserve_ttl(sqlite_args, capsys):
    began = now_ms()
    code, out, _ = run(
        capsys,
        *sqlite_args,
        "reserve",
        "--owner",
        "o",
        "--fingerprint",
        "f",
        "--ttl-ms",
        "60000",
        "--json",
        "op",
        "k",
    )
    payload = json.loads(out)
    assert code == 0 and payload["token"] and payload["lease_expires_at_ms"] is None
    assert began + 60_000 <= payload["expires_at_ms"] <= now_ms() + 60_000
    code, _, err = run(
        capsys,
        *sqlite_args,
        "reserve",
        "--owner",
        "o",
        "--fingerprint",
        "f",
        "--ttl-ms",
        "1",
        "--expires-at-ms",
        "5",
        "op",
        "k2",
    )
    assert code == 2 and err.startswith("idemstore: error: ") and err.count("\n") == 1
    assert _get(capsys, sqlite_args, "op", "k2")[0] == 1  # nothing written
