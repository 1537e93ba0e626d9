"""A worker process for the run_once process proof (run as a script, not collected).

``python once_worker.py '<json job>'``: opens the store, prints ``ready``, waits for ``go`` on
stdin, then calls ``run_once`` on each of the job's keys in order, printing (flushed at once):

- ``S <key>`` when its work starts and ``F <key>`` when its work has run to completion;
- ``L <key>`` when ``run_once`` raised ``LeaseLostError`` (this worker's lease ended and
  another re-claimed the key), after which it calls ``run_once`` again for the key's outcome;
- ``O <key> <json outcome>``: the outcome ``run_once`` returned to this caller;

and ``done`` at the end. The job's ``first_work_ms`` is how long the work on its first key
takes (the test stops or kills the worker there); the others take ``work_ms``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Any

from idemstore import IdempotencyStore, LeaseLostError, Outcome, TenantContext, now_ms

OPERATION = "jobs.run"
TENANT = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-1")
FINGERPRINT = "fp-job"


def say(*words: str) -> None:
    print(*words, flush=True)


def main() -> None:
    job: dict[str, Any] = json.loads(sys.argv[1])
    options: dict[str, Any] = {}
    if job.get("schema"):
        options["connect_args"] = {"options": f"-csearch_path={job['schema']}"}
    store = IdempotencyStore.from_url(job["url"], **options)
    try:
        store.check_schema()
        say("ready")
        assert sys.stdin.readline().strip() == "go"
        for i, key in enumerate(job["keys"]):
            seconds = (job["first_work_ms"] if i == 0 else job["work_ms"]) / 1000

            def work(key: str = key, seconds: float = seconds) -> Outcome:
                say("S", key)
                time.sleep(seconds)
                say("F", key)
                return Outcome(
                    "done", completed_at_ms=now_ms(), primary_ref_id=job["name"], details={"k": key}
                )

            def once(work: Any = work, key: str = key) -> Outcome:
                return store.run_once(
                    TENANT,
                    OPERATION,
                    key,
                    work,
                    owner=job["name"],
                    request_fingerprint=FINGERPRINT,
                    lease=job["lease_ms"],
                    wait=job["wait_ms"],
                )

            try:
                outcome = once()
            except LeaseLostError:
                say("L", key)
                outcome = once()
            say("O", key, json.dumps(asdict(outcome)))
        say("done")
    finally:
        store.close()


if __name__ == "__main__":
    main()
