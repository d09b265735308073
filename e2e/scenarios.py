"""
The scenarios `make e2e` runs on the deployment, each asserting its result at its own fake OpenAI server.

Every wait is on a condition with a generous bound (the machine is shared and slow); nothing sleeps and then
asserts. Each scenario returns what it ran, the batches per task instance it found at the fake, what it
killed and how long it took, and writes its evidence (timings, log excerpts) to ``scenario-N.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_openai_batch.scheduler import LEARNED_BUDGET_SHARE
from airflow_provider_openai_batch.testing.tokens import request_tokens
from e2e.deployment import TRIGGERERS, WORKERS, Deployment, iter_log_lines, parent_of, wait_until
from e2e.fakes import Pause, ScenarioServer

#: Bound on any one wait: far above what a slow, shared machine needs, far below CI's limit.
LONG = 1500.0
#: Requests in the sharded example's input (its default is 120,000; this keeps two shards and the run short).
SHARDED_REQUESTS = 60_000
#: Requests in the download scenario's input: an output file of tens of MB, streamed slowly.
BIG_REQUESTS = 20_000
ENDPOINT = "/v1/chat/completions"
#: The one-task job's input: JOB_REQUESTS requests in shards of JOB_SHARD_REQUESTS (11 batches in round 1), about ten
#: times what the account's queue holds (one shard, within the 90 % of its limit the job keeps once it learned it);
#: the requests in JOB_TRANSIENT fail once, for a reason worth another try, and go again in round 2: each shard's own
#: transient failures as a piece of its own, as soon as that shard's batch ended (4 batches).
JOB_REQUESTS = 33
JOB_SHARD_REQUESTS = 3
JOB_TRANSIENT: dict[int, dict[str, Any]] = {
    1: {"status_code": 500, "type": "server_error", "code": "server_error", "times": 1},
    4: {"status_code": 429, "type": "requests", "code": "rate_limit_exceeded", "times": 1},
    7: {"error_code": "request_timeout", "times": 1},
    10: {"status_code": 503, "type": "server_error", "code": "server_error", "times": 1},
}


class ScenarioFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailed(message)


@dataclass
class Outcome:
    number: int
    title: str
    status: str = "FAIL"
    runs: list[str] = field(default_factory=list)
    batches_per_ti: dict[str, int] = field(default_factory=dict)
    killed: str = "nothing"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        counts = sorted(set(self.batches_per_ti.values()))
        per_ti = f"{len(self.batches_per_ti)} TIs x {counts[0]} batch" if len(counts) == 1 else str(self.batches_per_ti)
        return (
            f"[{self.status}] {self.number}. {self.title}\n"
            f"      runs: {', '.join(self.runs) or '-'}\n"
            f"      batches per task instance: {per_ti if self.batches_per_ti else '-'}\n"
            f"      killed: {self.killed}\n"
            f"      seconds: {self.seconds:.0f}" + "".join(f"\n      note: {note}" for note in self.notes)
        )


class Harness:
    """The deployment, one fake per scenario, and the helpers the scenarios share."""

    def __init__(self, run_dir: Path, python: str) -> None:
        self.run_dir = run_dir
        self.results = run_dir / "results"
        self.big_input = run_dir / "data" / "big.jsonl"
        self.job_input = run_dir / "data" / "job.jsonl"
        self.job_runs = 0
        self.fakes = {
            1: ScenarioServer("s1", "openai_default"),
            2: ScenarioServer("s2", "openai_s2"),
            3: ScenarioServer("s3", "openai_s3"),
            4: ScenarioServer("s4", "openai_s4"),
            5: ScenarioServer("s5", "openai_s5"),
            # A listing that lags every create by 3 s (twice the settle pause): OpenAI does not say a new batch is
            # listed at once (CONTRACT.md L13); the two tries must still end with one batch.
            6: ScenarioServer("s6", "openai_s6", list_lag=3.0),
            7: ScenarioServer("s7", "openai_s7"),
        }
        for fake in self.fakes.values():
            fake.start()
        self.deployment = Deployment(
            run_dir,
            {fake.conn_id: fake.connection for fake in self.fakes.values()},
            python=python,
            extra_env={
                "E2E_RESULTS": str(self.results),
                "E2E_BIG_INPUT": str(self.big_input),
                "E2E_JOB_INPUT": str(self.job_input),
                "E2E_JOB_SHARD_REQUESTS": str(JOB_SHARD_REQUESTS),
                "OPENAI_BATCH_EXAMPLE_SHARDED_REQUESTS": str(SHARDED_REQUESTS),
            },
        )

    def stop_fakes(self) -> None:
        for fake in self.fakes.values():
            fake.stop()

    # --- what the metadata database says --------------------------------------------------------

    def tis(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        rows = self.deployment.query(
            "SELECT ti.map_index, ti.state, ti.try_number, ti.hostname, ti.pid, t.id, j.hostname, ti.end_date "
            "FROM task_instance ti LEFT JOIN trigger t ON ti.trigger_id = t.id "
            "LEFT JOIN job j ON t.triggerer_id = j.id "
            "WHERE ti.dag_id = %s AND ti.run_id = %s AND ti.task_id = %s ORDER BY ti.map_index",
            dag_id,
            run_id,
            task_id,
        )
        keys = ("map_index", "state", "try_number", "hostname", "pid", "trigger_id", "triggerer", "end_date")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def xcom_batch_ids(self, dag_id: str, run_id: str, task_id: str = "create") -> dict[int, str]:
        rows = self.deployment.query(
            "SELECT map_index, value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = %s AND key = 'batch_id'",
            dag_id,
            run_id,
            task_id,
        )
        return {int(m): str(_xcom_value(v)) for m, v in rows}

    def trigger_deadlines(self, trigger_ids: list[int]) -> dict[int, float]:
        """``end_time`` of each trigger, decrypted from the metadata database as the triggerer reads it."""
        from cryptography.fernet import Fernet

        fernet = Fernet(self.deployment.fernet_key.encode())
        rows = self.deployment.query("SELECT id, kwargs FROM trigger WHERE id = ANY(%s)", trigger_ids)
        found = {}
        for trigger_id, kwargs in rows:
            text = kwargs if kwargs.startswith("{") else fernet.decrypt(kwargs.encode()).decode()
            value = _find_key(json.loads(text), "end_time")
            if value is not None:
                found[int(trigger_id)] = float(value)
        return found

    def batches_per_ti(self, fake: ScenarioServer, dag_id: str, run_id: str) -> dict[str, int]:
        """For each create task instance: how many batches at the fake carry its idempotency key."""
        per_key = fake.batches_per_key()
        result = {}
        for map_index, batch_id in sorted(self.xcom_batch_ids(dag_id, run_id).items()):
            key = fake.key_of(batch_id)
            result[f"create[{map_index}]" if map_index >= 0 else "create"] = per_key.get(str(key), 0)
        return result

    def write_evidence(self, outcome: Outcome) -> None:
        path = self.run_dir / f"scenario-{outcome.number}.json"
        path.write_text(json.dumps({**outcome.__dict__}, indent=1, default=str))

    def log_excerpt(self, service: str, *needles: str, limit: int = 20) -> list[str]:
        lines = list(iter_log_lines(self.deployment.logs / f"{service}.log", *needles))
        return lines[-limit:]

    def wait_deferred(self, dag_id: str, run_id: str, expected: int, task_id: str = "wait") -> list[dict[str, Any]]:
        """Until ``expected`` sensors are deferred with their trigger held by a triggerer."""

        def deferred() -> list[dict[str, Any]] | None:
            tis = self.tis(dag_id, run_id, task_id)
            held = [ti for ti in tis if ti["state"] == "deferred" and ti["triggerer"] in TRIGGERERS]
            return held if len(held) >= expected else None

        return list(wait_until(f"{expected} deferred {dag_id}.{task_id} on a triggerer", deferred, LONG, 1.0))

    def heal(self) -> list[str]:
        """Start again every service a scenario killed (or that died), so the next scenario has them all."""
        dead = self.deployment.dead_services()
        for name in dead:
            self.restart_and_wait(name)
        return dead

    def restart_and_wait(self, name: str) -> None:
        self.deployment.restart(name)
        if name in WORKERS:
            self.deployment.wait_for_log(name, "ready.", LONG)
        else:
            self.deployment.wait_for_jobs(LONG)


def _xcom_value(value: Any) -> Any:
    """An XCom value as stored: JSON text, or already decoded by the driver (a JSONB column)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _find_key(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        if key in value and isinstance(value[key], (int, float)):
            return value[key]
        for inner in value.values():
            found = _find_key(inner, key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for inner in value:
            found = _find_key(inner, key)
            if found is not None:
                return found
    return None


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


# --- the scenarios -------------------------------------------------------------------------------


def s1_examples(h: Harness, out: Outcome) -> None:
    """The main example and the sharded example: success, sensors deferred on a triggerer."""
    fake, d = h.fakes[1], h.deployment
    fake.hold_batches()
    runs = {dag_id: d.trigger(dag_id) for dag_id in ("example_openai_batch", "example_openai_batch_sharded")}
    out.runs = [f"{dag_id}/{run_id}" for dag_id, run_id in runs.items()]
    shards = -(-SHARDED_REQUESTS // 50_000)
    h.wait_deferred("example_openai_batch", runs["example_openai_batch"], 1)
    held = h.wait_deferred("example_openai_batch_sharded", runs["example_openai_batch_sharded"], shards)
    out.evidence["sharded_waits_held_by"] = sorted(str(ti["triggerer"]) for ti in held)
    fake.release_batches()
    for dag_id, run_id in runs.items():
        state = d.wait_for_run(dag_id, run_id, LONG)
        check(state == "success", f"{dag_id} ended {state}")
    for dag_id, run_id in runs.items():
        per_ti = h.batches_per_ti(fake, dag_id, run_id)
        out.batches_per_ti.update({f"{dag_id}.{name}": n for name, n in per_ti.items()})
    check(len(out.batches_per_ti) == 1 + shards, f"expected {1 + shards} create task instances: {out.batches_per_ti}")
    check(set(out.batches_per_ti.values()) == {1}, f"not one batch per create: {out.batches_per_ti}")
    check(len(fake.batches()) == 1 + shards, f"{len(fake.batches())} batches at the fake")
    check(fake.trigger_polls() > 0, "no poll came from a trigger (async client)")
    joined = d.query(
        "SELECT dag_id, value FROM xcom WHERE run_id = ANY(%s) AND task_id IN ('join', 'join_results') "
        "AND key = 'return_value'",
        list(runs.values()),
    )
    check(len(joined) == 2, f"joins pushed {len(joined)} results")
    for dag_id, value in joined:
        result = _xcom_value(value)
        lines = _count_lines(Path(result["joined_uri"]))
        expected = SHARDED_REQUESTS if dag_id.endswith("sharded") else 20
        check(lines == expected, f"{dag_id}: joined file holds {lines} rows, expected {expected}")
        out.evidence[f"{dag_id}.joined"] = {"uri": result["joined_uri"], "rows": lines}
    out.notes.append(f"sensors deferred on {', '.join(sorted(set(out.evidence['sharded_waits_held_by'])))}")


def s2_triggerer_killed(h: Harness, out: Outcome) -> None:
    """50 deferred waits; kill -9 the triggerer holding most; all complete on the other, deadlines unchanged."""
    fake, d = h.fakes[2], h.deployment
    dag_id = "e2e_triggerer_killed"
    fake.hold_batches()
    run_id = d.trigger(dag_id)
    out.runs = [f"{dag_id}/{run_id}"]
    held = h.wait_deferred(dag_id, run_id, 50)
    by_triggerer: dict[str, list[int]] = {}
    for ti in held:
        by_triggerer.setdefault(str(ti["triggerer"]), []).append(int(ti["trigger_id"]))
    victim = max(by_triggerer, key=lambda name: len(by_triggerer[name]))
    survivor = next(name for name in TRIGGERERS if name != victim)
    deadlines_before = h.trigger_deadlines([int(ti["trigger_id"]) for ti in held])
    check(len(deadlines_before) == 50, f"read {len(deadlines_before)} trigger deadlines")
    killed_at = time.monotonic()
    pids = d.kill(victim)
    out.killed = f"kill -9 {victim} (pids {pids}), holding {len(by_triggerer[victim])} of 50 waits"

    def adopted() -> bool:
        tis = h.tis(dag_id, run_id, "wait")
        waiting = [ti for ti in tis if ti["state"] == "deferred"]
        return len(waiting) == 50 and all(ti["triggerer"] == survivor for ti in waiting)

    wait_until(f"{survivor} to adopt every trigger", adopted, LONG, 1.0)
    adoption = time.monotonic() - killed_at
    deadlines_after = h.trigger_deadlines(list(deadlines_before))
    check(deadlines_after == deadlines_before, "a trigger's deadline changed when it moved to the other triggerer")
    created = {b["id"]: b["created_at"] for b in fake.batches()}
    ids = h.xcom_batch_ids(dag_id, run_id)
    spans = {round(deadlines_before[int(ti["trigger_id"])] - created[ids[ti["map_index"]]]) for ti in held}
    check(len(spans) == 1, f"deadlines are not all counted from their batch's creation: {spans}")
    fake.release_batches()
    state = d.wait_for_run(dag_id, run_id, LONG)
    check(state == "success", f"run ended {state}")
    waits = h.tis(dag_id, run_id, "wait")
    check(len(waits) == 50 and all(ti["state"] == "success" for ti in waits), "not every wait succeeded")
    out.batches_per_ti = h.batches_per_ti(fake, dag_id, run_id)
    check(len(out.batches_per_ti) == 50 and set(out.batches_per_ti.values()) == {1}, str(out.batches_per_ti))
    check(len(fake.batches()) == 50, f"{len(fake.batches())} batches at the fake")
    out.evidence.update(
        {
            "held_before_kill": {name: len(ids) for name, ids in by_triggerer.items()},
            "adopted_after_seconds": round(adoption, 1),
            "deadline_from_creation_seconds": spans.pop(),
            "survivor_log": h.log_excerpt(survivor, "trigger", limit=10),
        }
    )
    out.notes.append(f"{survivor} adopted all 50 triggers {adoption:.0f}s after the kill; deadlines unchanged")
    h.restart_and_wait(victim)


def s3_worker_killed_in_create(h: Harness, out: Outcome) -> None:
    """kill -9 the worker running a create after its API call returned: the retry ends with one batch."""
    fake, d = h.fakes[3], h.deployment
    dag_id = "e2e_worker_killed_in_create"
    fake.hold_batches()
    run_id = d.trigger(dag_id)
    out.runs = [f"{dag_id}/{run_id}"]
    wait_until("the create call to take effect at the fake", lambda: fake.batches(), LONG, 0.05)
    ti = wait_until(
        "the create task's worker",
        lambda: next((t for t in h.tis(dag_id, run_id, "create") if t["state"] == "running" and t["hostname"]), None),
        LONG,
        0.2,
    )
    victim = str(ti["hostname"])
    check(victim in WORKERS, f"create ran on {victim}")
    killed_at = time.monotonic()
    pids = d.kill(victim)
    out.killed = f"kill -9 {victim} (whole worker, pids {pids}) after batch {fake.batches()[0]['id']} was created"

    def retried() -> dict[str, Any] | None:
        tis = h.tis(dag_id, run_id, "create")
        return tis[0] if tis and tis[0]["try_number"] >= 2 and tis[0]["state"] in ("running", "success") else None

    retry = wait_until("the retry of create", retried, LONG, 1.0)
    out.evidence["retry_started_after_seconds"] = round(time.monotonic() - killed_at, 1)
    fake.release_batches()
    state = d.wait_for_run(dag_id, run_id, LONG)
    check(state == "success", f"run ended {state}")
    final = h.tis(dag_id, run_id, "create")[0]
    check(final["try_number"] >= 2, f"create ended on try {final['try_number']}")
    check(final["hostname"] != victim, f"the retry ran on the killed worker {victim}")
    out.batches_per_ti = h.batches_per_ti(fake, dag_id, run_id)
    check(out.batches_per_ti == {"create": 1}, str(out.batches_per_ti))
    check(len(fake.batches()) == 1, f"{len(fake.batches())} batches at the fake")
    out.notes.append(
        f"try {final['try_number']} on {final['hostname']} reused the batch; the retry started "
        f"{out.evidence['retry_started_after_seconds']:.0f}s after the kill (task_instance_heartbeat_timeout=30)"
    )
    out.evidence["retry"] = {k: str(v) for k, v in retry.items()}
    h.restart_and_wait(victim)


def s4_worker_killed_in_download(h: Harness, out: Outcome) -> None:
    """kill -9 a worker mid-download: the retry leaves one complete result file and no partial one."""
    fake, d = h.fakes[4], h.deployment
    dag_id = "e2e_worker_killed_in_download"
    h.big_input.parent.mkdir(parents=True, exist_ok=True)
    with h.big_input.open("w") as handle:
        for i in range(BIG_REQUESTS):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Describe item {i}."}]}
            line = {"custom_id": f"item-{i:06d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            handle.write(json.dumps(line) + "\n")
    fake.controls.download_delay = 0.5  # seconds per streamed chunk: a slow network under the download
    run_id = d.trigger(dag_id)
    out.runs = [f"{dag_id}/{run_id}"]
    folder = h.results / "s4" / run_id

    def partial_written() -> Path | None:
        found = [p for p in folder.glob(".output.jsonl.*.partial") if p.stat().st_size > 0] if folder.exists() else []
        return found[0] if found else None

    partial = wait_until("the download to be half way", partial_written, LONG, 0.05)
    ti = next(t for t in h.tis(dag_id, run_id, "download") if t["state"] == "running")
    victim = str(ti["hostname"])
    check(victim in WORKERS, f"download ran on {victim}")
    size = partial.stat().st_size
    pids = d.kill(victim)
    out.killed = f"kill -9 {victim} (whole worker, pids {pids}) with {size:,} bytes of output.jsonl written"
    fake.controls.download_delay = 0.05
    state = d.wait_for_run(dag_id, run_id, LONG)
    check(state == "success", f"run ended {state}")
    final = h.tis(dag_id, run_id, "download")[0]
    check(final["try_number"] >= 2, f"download ended on try {final['try_number']}")
    files = sorted(p.name for p in folder.iterdir())
    out.evidence["files"] = files
    check(files == ["output.jsonl"], f"the result folder holds {files}")
    lines = _count_lines(folder / "output.jsonl")
    check(lines == BIG_REQUESTS, f"output.jsonl holds {lines} lines, expected {BIG_REQUESTS}")
    out.batches_per_ti = h.batches_per_ti(fake, dag_id, run_id)
    check(out.batches_per_ti == {"create": 1}, str(out.batches_per_ti))
    out.notes.append(f"retry on {final['hostname']}: output.jsonl complete ({lines:,} lines), no partial file left")
    h.restart_and_wait(victim)


def s5_scheduler_restarted(h: Harness, out: Outcome) -> None:
    """Restart (kill -9, start) the scheduler with 50 batches in flight: nothing lost, nothing duplicated."""
    fake, d = h.fakes[5], h.deployment
    dag_id = "e2e_scheduler_restarted"
    fake.hold_batches()
    run_id = d.trigger(dag_id)
    out.runs = [f"{dag_id}/{run_id}"]
    wait_until("50 batches in flight at the fake", lambda: len(fake.batches()) >= 50, LONG, 0.5)
    # Some waits deferred, the others queued or running: the new scheduler has to pick up every kind.
    h.wait_deferred(dag_id, run_id, 10)
    states = sorted(str(ti["state"]) for ti in h.tis(dag_id, run_id, "wait"))
    pids = d.kill("scheduler")
    out.killed = f"kill -9 scheduler (pids {pids}), then a new scheduler; waits were {_tally(states)}"
    h.restart_and_wait("scheduler")
    fake.release_batches()
    state = d.wait_for_run(dag_id, run_id, LONG)
    check(state == "success", f"run ended {state}")
    waits = h.tis(dag_id, run_id, "wait")
    check(len(waits) == 50 and all(ti["state"] == "success" for ti in waits), "not every wait succeeded")
    out.batches_per_ti = h.batches_per_ti(fake, dag_id, run_id)
    check(len(out.batches_per_ti) == 50 and set(out.batches_per_ti.values()) == {1}, str(out.batches_per_ti))
    check(len(fake.batches()) == 50, f"{len(fake.batches())} batches at the fake")


def s6_two_tries(h: Harness, out: Outcome) -> None:
    """
    Kill only the Celery pool process supervising a create whose API call is slow: Airflow starts try 2 while
    the orphaned try 1 keeps running; both create a batch, and the duplicate is cancelled within seconds.
    """
    fake, d = h.fakes[6], h.deployment
    dag_id = "e2e_two_tries"
    fake.hold_batches()
    fake.controls.hold_next_create()
    run_id = d.trigger(dag_id)
    out.runs = [f"{dag_id}/{run_id}"]
    wait_until("try 1's create call to reach the fake", fake.controls.create_held.is_set, LONG, 0.2)
    ti = wait_until(
        "try 1's task process",
        lambda: next((t for t in h.tis(dag_id, run_id, "create") if t["state"] == "running" and t["pid"]), None),
        LONG,
        0.2,
    )
    task_pid = int(ti["pid"])
    pool_pid = parent_of(task_pid)
    worker = str(ti["hostname"])
    check(pool_pid is not None and pool_pid != d.pid(worker), f"no pool process above task pid {task_pid}")
    assert pool_pid is not None
    check(os.getpgid(pool_pid) == d.pid(worker), f"pid {pool_pid} is not one of {worker}'s processes")
    killed_at = time.monotonic()
    d.kill_pid(pool_pid)
    out.killed = f"kill -9 the pool process {pool_pid} of {worker} supervising try 1 (task pid {task_pid})"

    def try_two_created() -> bool:
        tis = h.tis(dag_id, run_id, "create")
        return bool(tis and tis[0]["try_number"] >= 2 and fake.batches())

    wait_until("try 2 to create its batch while try 1 is still running", try_two_created, LONG, 0.5)
    out.evidence["try2_batch_after_seconds"] = round(time.monotonic() - killed_at, 1)
    check(_alive(task_pid), "the orphaned try-1 process ended before its create call returned")
    fake.controls.release_create.set()
    wait_until("try 1's batch", lambda: len(fake.batches()) >= 2, LONG, 0.2)

    def settled() -> list[dict[str, Any]] | None:
        batches = fake.batches()
        dying = [b for b in batches if b["status"] in ("cancelling", "cancelled")]
        return batches if len(batches) == 2 and len(dying) == 1 else None

    batches = wait_until("the duplicate to be cancelled", settled, LONG, 0.2)
    duplicate = next(b for b in batches if b["status"] in ("cancelling", "cancelled"))
    survivor = next(b for b in batches if b is not duplicate)
    check(survivor["created_at"] <= duplicate["created_at"], "the newer batch survived")
    cancel_delay = duplicate["cancel_requested_at"] - duplicate["created_at"]
    wait_until("the orphaned try-1 process to end", lambda: not _alive(task_pid), LONG, 0.5)
    out.evidence["orphan_lived_after_kill_seconds"] = round(time.monotonic() - killed_at, 1)
    fake.release_batches()
    state = d.wait_for_run(dag_id, run_id, LONG)
    check(state == "success", f"run ended {state}")
    check(h.xcom_batch_ids(dag_id, run_id) == {-1: survivor["id"]}, "the task did not end with the survivor")
    check(fake.batches_per_key() == {str(survivor["key"]): 2}, "batches of other keys at the fake")
    out.batches_per_ti = {"create": 2}
    final = {b["id"]: b["status"] for b in fake.batches()}
    check(final[survivor["id"]] == "completed" and final[duplicate["id"]] == "cancelled", str(final))
    out.notes.append(
        f"both tries created a batch; the duplicate {duplicate['id']} was cancelled {cancel_delay:.1f}s after "
        f"it was created; the task ended with {survivor['id']}; the orphaned try-1 process ran "
        f"{out.evidence['orphan_lived_after_kill_seconds']:.0f}s after its pool process was killed"
    )
    out.evidence.update(
        {
            "batches": batches,
            "duplicate_cancelled_after_seconds": round(cancel_delay, 1),
            # The orphan's last words (its stderr went to the worker's log): it dies at its first log line.
            "worker_log": h.log_excerpt(worker, "WorkerLostError", "BrokenPipeError", "openai_batch.py", limit=20),
            "scheduler_log": h.log_excerpt("scheduler", "e2e_two_tries", limit=20),
        }
    )


@dataclass(frozen=True)
class KillStep:
    """A step of the job to kill its worker at: the fake stops at one call (see ``Pause``) while it is killed."""

    name: str
    what: str
    route: str
    numbers: range  # which call of the route (1-based, counted from the trigger); one is drawn at random
    acted: bool
    client: str | None = None


def job_kill_steps(shards: tuple[int, int], downloads: int) -> list[KillStep]:
    """The steps of a job of ``shards`` batches in its two rounds, ``downloads`` files fetched in round 1."""
    first, second = shards
    return [
        KillStep(
            "r1-upload-answer-lost",
            "round 1: upload {n} took effect, its answer lost",
            "files.create",
            range(1, first + 1),
            acted=True,
        ),
        KillStep(
            "r1-between-creates",
            "round 1: after create {m} returned, before create {n}",
            "batches.create",
            range(2, first + 1),
            acted=False,
        ),
        KillStep(
            "r1-create-answer-lost",
            "round 1: create {n} took effect, its answer lost",
            "batches.create",
            range(1, first + 1),
            acted=True,
        ),
        KillStep(
            "r1-settle",
            "round 1: every create took effect and the wave's one settle listing was answered, the answer lost",
            "batches.list",
            range(1, 2),
            acted=True,
            client="OpenAI",
        ),
        # Round 1 always defers: the last create's batch is still validating when the job has created it.
        KillStep(
            "r1-resumed",
            "round 1: resumed after the deferral, before downloading",
            "batches.retrieve",
            range(1, 2),
            acted=False,
            client="OpenAI",
        ),
        KillStep(
            "r1-between-downloads",
            "round 1: after download {m} of " + str(downloads) + ", before the next",
            "files.content",
            range(2, downloads + 1),
            acted=False,
        ),
        KillStep(
            "r2-create-answer-lost",
            "round 2: create {k} took effect, its answer lost",
            "batches.create",
            range(first + 1, first + second + 1),
            acted=True,
        ),
        KillStep(
            "r2-between-creates",
            "round 2: after create {j} returned, before create {k}",
            "batches.create",
            range(first + 2, first + second + 1),
            acted=False,
        ),
        KillStep(
            "r2-between-downloads",
            "round 2: after its first download",
            "files.content",
            range(downloads + 2, downloads + 3),
            acted=False,
        ),
    ]


def _job_input(path: Path, nonce: int) -> list[str]:
    """Write the job's input (new content for each ``nonce``: nothing uploaded before is reused); its custom ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = []
    with path.open("w") as handle:
        for i in range(JOB_REQUESTS):
            body: dict[str, Any] = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"Label {i} ({nonce})."}],
            }
            if i in JOB_TRANSIENT:
                body["fake_error"] = JOB_TRANSIENT[i]  # the fake fails this request once, then answers it
            ids.append(f"job-{i:03d}")
            handle.write(json.dumps({"custom_id": ids[-1], "method": "POST", "url": ENDPOINT, "body": body}) + "\n")
    return ids


def s7_one_task_job(h: Harness, out: Outcome) -> None:
    """
    The one-task job (``@task.openai_batch``) over 10 shards, ten times what the account's queue holds, with a
    second round, its worker killed (kill -9, the whole worker) at a step drawn at random: the retry ends with
    exactly one admitted batch per shard per round, the queue never over its limit, and the complete joined result
    in input order. ``E2E_SEED`` replays a draw; ``E2E_JOB_STEP`` picks the step.
    """
    fake, d = h.fakes[7], h.deployment
    dag_id = "e2e_one_task_job"
    ids = _job_input(h.job_input, h.job_runs)
    first = -(-JOB_REQUESTS // JOB_SHARD_REQUESTS)
    retried = sorted({i // JOB_SHARD_REQUESTS for i in JOB_TRANSIENT})
    second = shards_with_errors = len(retried)
    steps = job_kill_steps((first, second), downloads=first + shards_with_errors)
    seed = int(os.environ.get("E2E_SEED") or random.SystemRandom().randrange(2**32))
    draw = random.Random(seed)
    wanted = [name for name in os.environ.get("E2E_JOB_STEP", "").split(",") if name]
    if wanted:  # e.g. --scenarios 7,7,7 with E2E_JOB_STEP=a,b,c: one step per run, in order
        name = wanted[h.job_runs % len(wanted)]
        step = next(s for s in steps if s.name == name)
    else:
        step = draw.choice(steps)
    h.job_runs += 1
    number = draw.choice(step.numbers)
    where = step.what.format(n=number, m=number - 1, k=number - first, j=number - first - 1)
    print(f"e2e: scenario 7: seed {seed}, kill step {step.name} ({where})", flush=True)
    out.evidence.update({"seed": seed, "step": step.name, "call": f"{step.route} #{number}", "where": where})
    fake.server.state.failures.clear()  # each run's transient requests fail once (the fake counts per custom id)
    # The account's queue for the model holds one shard's tokens (the fake's own count, CONTRACT A1), so that the
    # share of it the job keeps once learned still holds the largest shard: the job is refused at first, learns the
    # limit and schedules within it, a shard at a time (no budget is declared in the DAG).
    lines = [json.loads(line) for line in h.job_input.read_text().splitlines()]
    shard_tokens = max(
        sum(request_tokens(ENDPOINT, line["body"]) for line in lines[i : i + JOB_SHARD_REQUESTS])
        for i in range(0, len(lines), JOB_SHARD_REQUESTS)
    )
    limit = math.ceil(shard_tokens / LEARNED_BUDGET_SHARE) + 1
    fake.server.state.queue_limits = {"gpt-4o-mini": limit}
    earlier = {b["id"] for b in fake.batches()}
    earlier_uploads = set(fake.uploads())
    fake.controls.pause_at(Pause(step.route, number, step.acted, step.client))
    run_id = d.trigger(dag_id)
    out.runs = [f"{dag_id}/{run_id}"]
    wait_until(f"the job to reach {step.route} #{number}", fake.controls.paused.is_set, LONG, 0.1)
    ti = wait_until(
        "the job's worker",
        lambda: next((t for t in h.tis(dag_id, run_id, "job") if t["state"] == "running" and t["pid"]), None),
        LONG,
        0.2,
    )
    victim = str(ti["hostname"])
    check(victim in WORKERS, f"the job ran on {victim}")
    check(int(ti["pid"]) in d.session_of(victim), f"task pid {ti['pid']} is not one of {victim}'s processes")
    batches_then = len(fake.batches()) - len(earlier)
    killed_at = time.monotonic()
    pids = d.kill(victim)
    fake.controls.resume.set()
    out.killed = (
        f"kill -9 {victim} (whole worker, pids {pids}) at {where} [step {step.name}, seed {seed}]; "
        f"{batches_then} batch(es) at the fake then"
    )
    state = d.wait_for_run(dag_id, run_id, LONG)
    out.evidence["run_ended_after_kill_seconds"] = round(time.monotonic() - killed_at, 1)
    check(state == "success", f"run ended {state}")
    final = h.tis(dag_id, run_id, "job")[0]
    check(final["try_number"] >= 2, f"the job ended on try {final['try_number']}")
    check(final["hostname"] != victim, f"the retry ran on the killed worker {victim}")
    rows = d.query(
        "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = 'job' AND key = 'return_value'",
        dag_id,
        run_id,
    )
    check(len(rows) == 1, f"the job pushed {len(rows)} results")
    result = _xcom_value(rows[0][0])
    refused = {r.batch_id for r in fake.server.state.queue_refusals}
    out.evidence["queue_refusals"] = len([b for b in fake.batches() if b["id"] not in earlier and b["id"] in refused])
    batches = [b for b in fake.batches() if b["id"] not in earlier and b["id"] not in refused]
    per_key = Counter(str(b["key"]) for b in batches)
    out.batches_per_ti = {"job": len(batches)}
    out.evidence.update({"batches": batches, "result_batches": result["batches"], "counts": result["counts"]})
    check(set(per_key.values()) == {1}, f"a (round, piece) key with more than one batch: {dict(per_key)}")
    expected = [(0, i) for i in range(first)] + [(1, i) for i in retried]
    made = [(b["round"], b["shard"]) for b in result["batches"]]
    check(made == expected, f"the job ran (round, shard) {made}, expected {expected}")
    check(len(per_key) == len(expected), f"{len(per_key)} keys at the fake for {len(expected)} shards")
    check(
        {b["batch_id"] for b in result["batches"]} == {b["id"] for b in batches},
        "the fake holds a batch the job did not end with",
    )
    check(result["counts"]["succeeded"] == JOB_REQUESTS, f"counts {result['counts']}")
    peak = fake.server.state.peak_enqueued("gpt-4o-mini")
    out.evidence["peak_enqueued"] = peak
    check(0 < peak <= limit, f"the account's queue held {peak} tokens, over its limit of {limit}")
    uploads = sorted(name for file_id, name in fake.uploads().items() if file_id not in earlier_uploads)
    out.evidence["uploads"] = uploads
    folder = Path(result["joined_uri"]).parent
    files = sorted(p.name for p in folder.iterdir())
    check(files == ["joined.jsonl"], f"the result folder holds {files}")
    joined = [json.loads(line) for line in Path(result["joined_uri"]).read_text().splitlines()]
    check([r["custom_id"] for r in joined] == ids, "the joined result is not every input once, in input order")
    check({r["status"] for r in joined} == {"succeeded"}, "a request did not succeed in the joined result")
    again = [i for i, r in enumerate(joined) if r.get("round") == 1]
    check(again == sorted(JOB_TRANSIENT), f"requests answered in round 2: {again}")
    tries = {n: _task_log_events(d.home, dag_id, run_id, "job", n) for n in range(1, int(final["try_number"]) + 1)}
    out.evidence["task_log"] = tries
    created_by = {n: sum(e.startswith("Created batch") for e in events) for n, events in tries.items()}
    out.notes.append(
        f"{len(batches)} batches = {first} shards in round 1 + {second} in round 2, one per (round, piece) key, "
        f"through a queue of one shard ({out.evidence['queue_refusals']} refused, not charged; "
        f"at most {peak} of {limit} tokens enqueued) "
        f"({len(uploads)} input files uploaded); "
        f"batches created per try (task log) {created_by}; "
        f"try {final['try_number']} on {final['hostname']} finished the job; joined {len(joined)} rows in input "
        f"order ({len(again)} answered in round 2); run ended {out.evidence['run_ended_after_kill_seconds']:.0f}s "
        "after the kill (task_instance_heartbeat_timeout=30)"
    )
    h.restart_and_wait(victim)


def _task_log_events(home: Path, dag_id: str, run_id: str, task_id: str, try_number: int) -> list[str]:
    """The job's own log lines (what it created, reused, downloaded) in one try's task log."""
    path = home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}" / f"attempt={try_number}.log"
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            event = str(json.loads(line).get("event", ""))
        except ValueError:
            continue
        if event.startswith(("Created batch", "Uploaded", "Reusing", "Round", "round", "Job done")):
            events.append(event)
    return events


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _tally(states: list[str]) -> str:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "not started"


SCENARIOS: dict[int, tuple[str, Callable[[Harness, Outcome], None]]] = {
    1: ("main and sharded examples: success, sensors deferred on a triggerer", s1_examples),
    2: ("50 deferred waits, kill -9 the triggerer holding most", s2_triggerer_killed),
    3: ("kill -9 the worker running a create after its API call", s3_worker_killed_in_create),
    4: ("kill -9 a worker mid-download", s4_worker_killed_in_download),
    5: ("restart the scheduler with 50 batches in flight", s5_scheduler_restarted),
    6: ("two tries at once: kill only the pool process of a slow create", s6_two_tries),
    7: ("one-task job, kill -9 its worker at a random step: one batch per shard per round", s7_one_task_job),
}
