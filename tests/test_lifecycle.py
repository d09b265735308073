"""
What retry, clear, mark success / failed, kill and a changed argument mean for a batch (docs/lifecycle.md, "What
happens when you ..."): each row of that table is a test here or is named in it.

A retry and a clear are told apart the way Airflow does (``max_tries - retries + 1`` is the first try of the
current run of tries; a clear sets ``max_tries = try_number + retries``), so a narrow task-instance stand-in with
``max_tries`` drives the create operator through both; every API call is real HTTP to FakeOpenAIServer.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.exceptions import BatchFailedError, BatchNotEndedError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import IDEMPOTENCY_METADATA_KEY
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
)
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer
from tests.conftest import FAST, connection_env, jsonl, request_line
from tests.test_idempotency import MemoryStateStore

ENDPOINT = "/v1/chat/completions"
#: Fails on its first run only (the fake server's transient ``fake_error``), like a 500 from the model.
TRANSIENT = {"fake_error": {"status_code": 500, "code": "server_error", "times": 1}}


class TI:
    """The task instance as the create operator sees it: identity, map index, and Airflow's ``max_tries``."""

    def __init__(self, run_id: str, *, retries: int = 0) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = "nightly", "create", run_id, -1
        self.try_number, self.max_tries = 1, retries
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value

    def retry(self) -> None:
        self.try_number += 1

    def clear(self, retries: int = 0) -> None:
        """What ``clear_task_instances`` does: ``max_tries = try_number + retries``; the next try is one more."""
        self.max_tries = self.try_number + retries
        self.try_number += 1


#: The Task SDK's task_state_store, kept across tries and (on 3.3) clears.
Store = MemoryStateStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock, monkeypatch):
    """A server whose batches move only when the test moves its clock."""
    with FakeOpenAIServer(timings=FAST, clock=clock) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


@pytest.fixture
def live(monkeypatch):
    """A server on the real clock (FAST timings): for the blocking waits, which sleep in real time."""
    with FakeOpenAIServer(timings=FAST) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


def upload(rows: list[dict]) -> str:
    return OpenAIBatchHook().upload_file(jsonl(rows)).id


def create(ti: TI, file_id: str, store: Store | None = None, **kwargs: Any) -> str:
    kwargs.setdefault("endpoint", ENDPOINT)
    op = OpenAIBatchCreateOperator(task_id="create", input_file_id=file_id, **kwargs)
    context: dict[str, Any] = {"ti": ti}
    if store is not None:
        context["task_state_store"] = store
    return op.execute(context)


def ours(server: FakeOpenAIServer) -> list[str]:
    return [b.id for b in server.state.batches.values() if IDEMPOTENCY_METADATA_KEY in (b.metadata or {})]


def status(batch_id: str) -> str:
    return OpenAIBatchHook().get_batch(batch_id).status


# --- batch_status: what may be reused ---------------------------------------------------------------


@pytest.mark.parametrize("with_store", [True, False], ids=["task_state_store", "metadata_scan"])
def test_a_cancelling_batch_is_never_reused(fake, with_store):
    """A clear whose on_kill cancelled the batch must not be followed by a re-run that waits for the dying one."""
    file_id = upload([request_line(i) for i in range(3)])
    ti, store = TI(f"r-{uuid.uuid4()}"), Store() if with_store else None
    first = create(ti, file_id, store)
    OpenAIBatchHook().cancel_batch(first)
    assert status(first) == "cancelling"  # the fake clock stands still: it stays dying
    ti.retry()
    second = create(ti, file_id, store)
    assert second != first
    assert status(second) == "validating"


@pytest.mark.parametrize("with_store", [True, False], ids=["task_state_store", "metadata_scan"])
def test_a_retry_does_not_reuse_a_batch_that_failed_the_outcome_policy(live, with_store):
    """10 % failed with max_failed_ratio=0.05: try 1 fails; try 2 makes a new batch instead of failing again."""
    file_id = upload([request_line(i, **(TRANSIENT if i == 0 else {})) for i in range(10)])
    ti, store = TI(f"r-{uuid.uuid4()}", retries=1), Store() if with_store else None
    kwargs = {"wait_for_completion": True, "deferrable": False, "poll_interval": 0.01, "max_failed_ratio": 0.05}
    with pytest.raises(BatchFailedError, match=r"more than max_failed_ratio=0\.05"):
        create(ti, file_id, store, **kwargs)
    assert len(ours(live)) == 1
    ti.retry()
    second = create(ti, file_id, store, **kwargs)
    assert len(ours(live)) == 2
    assert OpenAIBatchHook().get_batch(second).request_counts.failed == 0


@pytest.mark.parametrize("with_store", [True, False], ids=["task_state_store", "metadata_scan"])
def test_a_retry_reuses_a_completed_batch_that_passes_the_policy(fake, clock, with_store):
    """The worker died after the batch completed: the retry pays nothing more."""
    file_id = upload([request_line(i) for i in range(3)])
    ti, store = TI(f"r-{uuid.uuid4()}", retries=2), Store() if with_store else None
    first = create(ti, file_id, store)
    clock.advance(3600)
    assert status(first) == "completed"
    ti.retry()
    assert create(ti, file_id, store, wait_for_completion=True, deferrable=False) == first
    assert ours(fake) == [first]


# --- the create operator: clear means "run it again" unless asked for reuse ----------------------------


@pytest.mark.parametrize("with_store", [True, False], ids=["task_state_store", "metadata_scan"])
def test_clear_of_a_successful_create_runs_it_again(fake, clock, with_store):
    file_id = upload([request_line(i) for i in range(3)])
    ti, store = TI(f"r-{uuid.uuid4()}"), Store() if with_store else None
    first = create(ti, file_id, store)
    clock.advance(3600)
    ti.clear()
    second = create(ti, file_id, store)
    assert second != first
    assert ours(fake) == [first, second]


@pytest.mark.parametrize("with_store", [True, False], ids=["task_state_store", "metadata_scan"])
def test_clear_reuses_a_completed_batch_when_asked(fake, clock, with_store):
    file_id = upload([request_line(i) for i in range(3)])
    ti, store = TI(f"r-{uuid.uuid4()}"), Store() if with_store else None
    first = create(ti, file_id, store, reuse="active_or_completed")
    clock.advance(3600)
    ti.clear()
    assert create(ti, file_id, store, reuse="active_or_completed") == first
    assert ours(fake) == [first]


def test_clear_of_a_waiting_task_waits_for_the_same_batch(fake):
    """The default: the batch is still working, so the re-run waits for it instead of paying twice."""
    file_id = upload([request_line(i) for i in range(3)])
    ti = TI(f"r-{uuid.uuid4()}")
    first = create(ti, file_id)
    ti.clear()
    assert create(ti, file_id) == first
    ti.clear()
    third = create(ti, file_id, reuse="never")
    assert third != first
    assert status(first) == "validating"  # left alone: reuse='never' makes a new batch, it cancels nothing


@pytest.mark.parametrize(
    "change",
    [
        {"metadata": {"team": "search"}},
        {"completion_window": "48h"},
        {"output_expires_after": 7 * 86400},
        {"endpoint": "/v1/responses"},
    ],
    ids=["metadata", "completion_window", "output_expires_after", "endpoint"],
)
def test_a_changed_argument_is_a_new_batch(change, clock, monkeypatch):
    with FakeOpenAIServer(timings=FAST, clock=clock, completion_windows=("24h", "48h"), allowed_endpoints=None) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        file_id = upload([request_line(i) for i in range(3)])
        ti = TI(f"r-{uuid.uuid4()}", retries=2)
        first = create(ti, file_id)
        ti.retry()
        second = create(ti, file_id, **change)
        ti.retry()
        assert create(ti, file_id, **change) == second  # the same arguments again: reused
        assert second != first


def test_two_deployments_never_share_a_batch(fake, monkeypatch):
    """Same DAG, same scheduled run_id, same (reused) input file, two deployments: two batches."""
    file_id = upload([request_line(i) for i in range(3)])
    run_id = "scheduled__2026-01-01T00:00:00+00:00"
    monkeypatch.setenv("AIRFLOW__OPENAI_BATCH__DEPLOYMENT_SALT", "deployment-a")
    a = create(TI(run_id), file_id)
    monkeypatch.setenv("AIRFLOW__OPENAI_BATCH__DEPLOYMENT_SALT", "deployment-b")
    b = create(TI(run_id), file_id)
    monkeypatch.delenv("AIRFLOW__OPENAI_BATCH__DEPLOYMENT_SALT")
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "https://airflow-c.example/execution/")
    c = create(TI(run_id), file_id)
    assert len({a, b, c}) == 3
    retry = TI(run_id)
    retry.retry()
    assert create(retry, file_id) == c  # the default salt is stable within a deployment


def test_create_refuses_a_list_of_file_ids_with_what_to_do(fake):
    before = fake.count("batches.create")
    with pytest.raises(ValueError, match=r"Map over the list: .*expand\(input_file_id=upload.output\)"):
        create(TI("r"), ["file-a", "file-b"])  # type: ignore[arg-type]
    assert fake.count("batches.create") == before


# --- download: only an ended batch ----------------------------------------------------------------------


def test_download_refuses_a_batch_that_has_not_ended(fake, clock, tmp_path):
    file_id = upload([request_line(i) for i in range(3)])
    batch_id = create(TI("r"), file_id)
    op = OpenAIBatchDownloadOperator(task_id="download", batch_id=batch_id, destination=str(tmp_path / "out"))
    with pytest.raises(BatchNotEndedError, match=r"is 'validating', not ended.*Wait for it"):
        op.execute({"ti": TI("r")})
    assert not (tmp_path / "out").exists()
    assert fake.count("files.content") == 0
    clock.advance(3600)
    assert op.execute({"ti": TI("r")})["output_lines"] == 3


def test_delete_remote_files_keeps_an_input_another_batch_still_reads(fake, clock, tmp_path):
    """Uploads are reused by content, so two runs can share one input file: deleting it would break the other."""
    file_id = upload([request_line(i) for i in range(3)])
    mine = create(TI("run-a"), file_id)
    clock.advance(3600)
    other = create(TI("run-b"), file_id)  # created later: still validating on the frozen clock
    op = OpenAIBatchDownloadOperator(
        task_id="download", batch_id=mine, destination=str(tmp_path / "a"), delete_remote_files=True
    )
    result = op.execute({"ti": TI("run-a")})
    assert result["output_lines"] == 3
    assert file_id in fake.state.files  # kept: batch `other` reads it
    assert result["output_file_id"] not in fake.state.files  # our own outputs are gone
    clock.advance(3600)
    OpenAIBatchDownloadOperator(
        task_id="download", batch_id=other, destination=str(tmp_path / "b"), delete_remote_files=True
    ).execute({"ti": TI("run-b")})
    assert file_id not in fake.state.files  # the last reader deletes it


def test_the_retry_lookup_reads_only_batches_since_the_dag_run_started(fake, clock, monkeypatch):
    """A shared account's older batches (here 300, 3 pages) are not read: the scan stops at the run's start."""
    import types
    from datetime import datetime, timezone

    from airflow_provider_openai_batch import batches

    # The worker's clock is OpenAI's (the settle window is read on the worker's clock).
    monkeypatch.setattr(batches, "time", types.SimpleNamespace(time=clock, sleep=time.sleep))

    file_id = upload([request_line(i) for i in range(3)])
    for _ in range(300):
        fake.state.create_batch(file_id, ENDPOINT, "24h", {"team": "other"})
    clock.advance(3600)
    started = datetime.fromtimestamp(clock(), tz=timezone.utc)
    ti = TI(f"r-{uuid.uuid4()}", retries=1)
    ti.retry()  # try 2, whose try 1 died before sending: nothing to find
    op = OpenAIBatchCreateOperator(task_id="create", input_file_id=file_id, endpoint=ENDPOINT)
    fake.reset_counters()
    op.execute({"ti": ti, "dag_run": types.SimpleNamespace(start_date=started)})
    # One page for the scan since the run started, one for the look at the last minute for a racing try.
    assert fake.count("batches.list") == 2
    fake.reset_counters()
    op.execute({"ti": TI(f"r-{uuid.uuid4()}")})  # a first try: nothing can exist yet, no scan; only the racing look
    assert fake.count("batches.list") == 1


# --- one poll-failure policy and one kill policy for every way of waiting -------------------------------


@pytest.fixture
def no_sdk_retries(monkeypatch):
    """A connection without the SDK's own retries, so each injected fault is one failed poll."""
    with FakeOpenAIServer(timings=FAST) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv, max_retries=0))
        yield srv


def test_a_blocking_wait_survives_failed_polls(no_sdk_retries):
    file_id = upload([request_line(i) for i in range(3)])
    no_sdk_retries.faults.script("batches.retrieve", "500", "503", "429", "500")
    batch_id = create(TI("r"), file_id, wait_for_completion=True, deferrable=False, poll_interval=0.01)
    assert status(batch_id) == "completed"


def test_a_blocking_wait_gives_up_after_max_poll_failures(no_sdk_retries):
    from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError

    file_id = upload([request_line(i) for i in range(3)])
    batch_id = OpenAIBatchHook().create_batch(file_id, ENDPOINT).id
    no_sdk_retries.faults.script("batches.retrieve", *["500"] * 4)
    with pytest.raises(OpenAIBatchAPIError, match="500"):
        OpenAIBatchHook().wait_for_batch(batch_id, poll_interval=0.01, max_poll_failures=3)
    assert no_sdk_retries.count("batches.retrieve") == 4


def test_a_poking_sensor_tolerates_failed_polls(no_sdk_retries):
    from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

    file_id = upload([request_line(i) for i in range(3)])
    batch_id = OpenAIBatchHook().create_batch(file_id, ENDPOINT).id
    sensor = OpenAIBatchSensor(task_id="wait", batch_id=batch_id, mode="poke", deferrable=False, max_poll_failures=2)
    no_sdk_retries.faults.script("batches.retrieve", "500", "500", "500")
    assert sensor.poke({"ti": TI("r")}) is False
    assert sensor.poke({"ti": TI("r")}) is False
    with pytest.raises(Exception, match="500"):
        sensor.poke({"ti": TI("r")})


def _trigger(batch_id: str, **kwargs: Any):
    from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchTrigger

    return OpenAIBatchTrigger(batch_id, "openai_default", 0.05, time.time() + 60, **kwargs)


def _first_event(trigger) -> dict[str, Any]:
    import asyncio

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError("no event")

    return asyncio.run(first())


@pytest.mark.parametrize(
    ("state", "cancelled"),
    [
        ("failed", True),  # mark failed: Airflow 3's kill
        (None, False),  # cleared: the re-run waits for the same batch
        ("restarting", False),
        ("success", False),  # marked successful: the batch runs on, a later download gets its results
        ("<unknown>", False),  # the state could not be read: never guess in favour of throwing work away
    ],
)
def test_trigger_on_kill_cancels_only_when_the_user_stopped_the_work(fake, state, cancelled, monkeypatch):
    """Airflow 3.3 calls on_kill on clear, mark failed and mark success alike; the task's state tells them apart."""
    import asyncio

    file_id = upload([request_line(i) for i in range(3)])
    batch_id = OpenAIBatchHook().create_batch(file_id, ENDPOINT).id
    trigger = _trigger(batch_id)

    async def state_now() -> str | None:
        return state

    monkeypatch.setattr(trigger, "task_state", state_now)
    asyncio.run(trigger.on_kill())
    assert fake.count("batches.cancel") == (1 if cancelled else 0)
    assert status(batch_id) == ("cancelling" if cancelled else "validating")


def test_a_clear_never_reuses_the_batch_it_cancelled(fake):
    """Even if something cancels the batch while the task is cleared, the re-run does not wait for a dying batch."""
    file_id = upload([request_line(i) for i in range(3)])
    ti = TI(f"r-{uuid.uuid4()}")
    first = create(ti, file_id)
    OpenAIBatchHook().cancel_batch(first)
    ti.clear()
    assert create(ti, file_id) != first


@pytest.mark.parametrize(("state", "cancelled"), [("failed", True), (None, False), ("success", False)])
def test_poke_mode_sensor_on_kill_follows_the_same_policy(fake, state, cancelled, monkeypatch):
    from airflow_provider_openai_batch.operators import base
    from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

    file_id = upload([request_line(i) for i in range(3)])
    batch_id = OpenAIBatchHook().create_batch(file_id, ENDPOINT).id
    sensor = OpenAIBatchSensor(task_id="wait", batch_id=batch_id, mode="poke", deferrable=False)
    assert sensor.poke({"ti": TI("r")}) is False
    monkeypatch.setattr(base, "task_instance_state", lambda ti: state)
    sensor.on_kill()
    assert fake.count("batches.cancel") == (1 if cancelled else 0)


def test_trigger_rereads_the_connection_once_after_a_401(live, monkeypatch):
    """The key was rotated in the secrets backend while the task waited: the next poll uses the new one."""
    import json

    from airflow_provider_openai_batch.hooks import openai_batch as hook_module

    file_id = upload([request_line(i) for i in range(3)])
    batch_id = OpenAIBatchHook().create_batch(file_id, ENDPOINT).id
    fresh = json.loads(connection_env(live))
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps({**fresh, "password": "sk-revoked"}))
    base_hook = hook_module.BaseHook
    reads: list[str] = []

    async def rotating(cls, conn_id):  # the first read sees the old key; the key is rotated right after it
        conn = base_hook.get_connection(conn_id)
        reads.append(conn.password)
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(fresh))
        return conn

    # The connection store (env var here, a secrets backend in production) as the hook reads it, on every version
    # (Airflow 3.0 has no aget_connection: the hook then reads it in a thread).
    monkeypatch.setattr(base_hook, "aget_connection", classmethod(rotating), raising=False)
    event = _first_event(_trigger(batch_id, jitter_first_poll=False))
    assert reads[:2] == ["sk-revoked", fresh["password"]]
    assert event["status"] == "terminal"


def test_trigger_fails_when_the_key_is_still_refused_after_a_reread(fake, monkeypatch):
    import json

    file_id = upload([request_line(i) for i in range(3)])
    batch_id = OpenAIBatchHook().create_batch(file_id, ENDPOINT).id
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps({**json.loads(connection_env(fake)), "password": "x"}))
    event = _first_event(_trigger(batch_id, jitter_first_poll=False))
    assert event["status"] == "error"
    assert "401" in event["message"]
    assert fake.count("batches.retrieve") == 2  # the first try and the one after re-reading the connection


# --- in real DAG runs (dag.test): mapping and the README's basic example ------------------------------


@pytest.fixture
def dag_server(airflow_db, monkeypatch):
    from tests.conftest import DEFERRING

    with FakeOpenAIServer(timings=DEFERRING) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


def test_mapped_downloads_to_one_destination_never_overwrite_each_other(dag_server, tmp_path):
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator
    from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor
    from tests.conftest import run_dag, task_states, xcoms

    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([request_line(i) for i in range(6)]))
    destination = tmp_path / "results"

    def build():
        up = OpenAIBatchUploadOperator(
            task_id="upload", source=str(source), endpoint=ENDPOINT, sharding="always", max_requests_per_file=2
        )
        create = OpenAIBatchCreateOperator.partial(task_id="create", endpoint=ENDPOINT).expand(input_file_id=up.output)
        wait = OpenAIBatchSensor.partial(task_id="wait", deferrable=True, poke_interval=0.1).expand(
            batch_id=create.output
        )
        OpenAIBatchDownloadOperator.partial(task_id="download", destination=str(destination)).expand(
            batch_id=wait.output
        )

    run = run_dag(build)
    assert set(task_states(run).values()) == {"success"}
    uris = {i: r["output_uri"] for i, r in xcoms(run, "download").items()}
    assert sorted(uris) == [0, 1, 2]
    assert len(set(uris.values())) == 3
    seen = set()
    for index, uri in uris.items():
        assert uri == str(destination / str(index) / "output.jsonl")
        seen |= {json.loads(line)["custom_id"] for line in Path(uri).read_text().splitlines()}
    assert seen == {f"req-{i}" for i in range(6)}


def test_the_readme_basic_example_with_50001_lines_says_what_to_do(dag_server, tmp_path, caplog, capfd):
    """upload → create(input_file_id=upload.output): a sharded upload is refused by create with the fix, no batch."""
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator
    from tests.conftest import run_dag, task_states

    source = tmp_path / "big.jsonl"
    source.write_bytes(jsonl([request_line(i) for i in range(50_001)]))

    def build():
        up = OpenAIBatchUploadOperator(task_id="upload", source=str(source), endpoint=ENDPOINT)
        OpenAIBatchCreateOperator(task_id="create", input_file_id=up.output, endpoint=ENDPOINT)

    run = run_dag(build)
    assert task_states(run) == {"upload": "success", "create": "failed"}
    assert dag_server.count("batches.create") == 0
    out, err = capfd.readouterr()  # the task's log goes to the captured logger or to the console, by Airflow version
    assert "Map over the list" in caplog.text + out + err  # not "TypeError: sequence item 4: expected str ..."


def test_request_dicts_in_source_are_not_templated(dag_server, caplog):
    """Prompts holding Jinja syntax pass through untouched; a string source is still a template."""
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator
    from tests.conftest import run_dag, task_states, xcoms

    prompts = ["{% if x %}keep{% endif %}", "Hello {{name}}, {{ ds }}", "{#"]
    rows = [request_line(i) for i in range(3)]
    for row, prompt in zip(rows, prompts, strict=True):
        row["body"]["messages"][0]["content"] = prompt

    def build():
        OpenAIBatchUploadOperator(task_id="upload", source=rows, endpoint=ENDPOINT, filename="{{ ds }}.jsonl")

    run = run_dag(build)
    assert task_states(run) == {"upload": "success"}
    file_id = xcoms(run, "upload")[-1]
    stored = dag_server.state.files[file_id]
    sent = [json.loads(line)["body"]["messages"][0]["content"] for line in stored.path.read_text().splitlines()]
    assert sent == prompts
    assert stored.filename.startswith(run.logical_date.strftime("%Y-%m-%d."))  # the other fields still render
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "{{name}}" in r.getMessage()]
