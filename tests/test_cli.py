"""The ``idemstore`` command, in process (``cli.main``) on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from idemstore import cli


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


def test_output_closed_early_is_not_a_traceback(tmp_path):
    import subprocess
    import sys

    from idemstore import IdempotencyStore, TenantContext

    url = f"sqlite:///{tmp_path}/pipe.db"
    with IdempotencyStore.from_url(url, migrate=True, synchronous="OFF") as store:
        for i in range(1500):  # a table larger than a pipe's buffer (64 KiB)
            store.reserve(TenantContext.local_implicit(), f"operation-{i:04}", "k", "o", "f")
    proc = subprocess.Popen(
        [sys.executable, "-m", "idemstore", "--database-url", url, "stats"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 141
