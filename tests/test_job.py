"""
The one-task job (``OpenAIBatchJobOperator``): end to end over real HTTP against FakeOpenAIServer, its rounds, and
its crash matrix: a worker killed at every step (and in pairs of steps), with and without ``task_state_store``,
leaves exactly one batch per shard per round and the same joined result.

Airflow's part is played by a small driver: ``execute``; on ``TaskDeferred`` the trigger runs to its one event and
``execute_complete`` resumes, on a fresh operator as a new worker would. A crash ends the try; the next try starts
at ``execute`` again, as an Airflow retry does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_openai_batch import idempotency
from airflow_provider_openai_batch.idempotency import IDEMPOTENCY_METADATA_KEY
from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer
from airflow_provider_openai_batch.triggers.job import OpenAIBatchJobTrigger
from tests.conftest import FAST, connection_env, jsonl, request_line
from tests.test_idempotency import Crash, FakeTI, MemoryStateStore

#: The server's time moves only when the driver says so: every batch is still running when the job first looks,
#: so every job here defers (whatever the machine's speed), and has ended once the driver lets time pass.
CLOCK = FakeClock()


def synced_clock() -> FakeClock:
    """
    ``CLOCK``, moved up to the real time if it fell behind it (it was made when the suite was collected, minutes
    ago): OpenAI's clock and the worker's agree (the create path's settle window relies on it), and the driver only
    ever moves it forward from there.
    """
    behind = time.time() - CLOCK()
    if behind > 0:
        CLOCK.advance(behind)
    return CLOCK


@pytest.fixture(scope="module")
def job_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(timings=FAST, clock=synced_clock()) as srv:
        previous = os.environ.get("AIRFLOW_CONN_OPENAI_DEFAULT")
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = connection_env(srv)
        try:
            yield srv
        finally:
            if previous is None:
                os.environ.pop("AIRFLOW_CONN_OPENAI_DEFAULT", None)
            else:
                os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = previous


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch):
    monkeypatch.setattr(idempotency, "RETRY_BASE_DELAY", 0.01)


def run_trigger(trigger: OpenAIBatchJobTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(first())


class Driver:
    """Airflow's part: tries, deferrals and resumes of one task instance, counting what the job did."""

    def __init__(self, make: Any, run_id: str, store: MemoryStateStore | None, max_deferrals: int = 20) -> None:
        self.make = make
        self.max_deferrals = max_deferrals
        self.ti = FakeTI(run_id)
        self.ti.task_id = "job"
        self.store = store
        self.deferrals = 0
        self.triggers: list[OpenAIBatchJobTrigger] = []

    def context(self) -> dict[str, Any]:
        context: dict[str, Any] = {"ti": self.ti}
        if self.store is not None:
            context["task_state_store"] = self.store
        return context

    def attempt(self, crash: str | None = None) -> dict[str, Any] | None:
        """One try: execute, then resume after each deferral, until it returns or the worker dies."""
        op = self.make()
        inject(op, crash)
        try:
            result = op.execute(self.context())
        except TaskDeferred as deferred:
            return self._resume(deferred, crash)
        except Crash:
            return None
        return dict(result)

    def _resume(self, deferred: TaskDeferred, crash: str | None) -> dict[str, Any] | None:
        while True:
            self.deferrals += 1
            assert self.deferrals <= self.max_deferrals, (
                "the job keeps deferring: each resume made new batches instead of finding them"
            )
            trigger = deferred.trigger
            assert isinstance(trigger, OpenAIBatchJobTrigger)
            self.triggers.append(trigger)
            if crash == "deferred":
                return None  # the worker died before the triggerer's event was consumed: the task is retried
            CLOCK.advance(60)  # OpenAI works while the task is deferred
            event = run_trigger(trigger)
            op = self.make()
            inject(op, crash)
            try:
                return dict(op.execute_complete(self.context(), event))
            except TaskDeferred as again:
                deferred = again
            except Crash:
                return None


def inject(op: OpenAIBatchJobOperator, point: str | None) -> None:
    """Make the worker die right after (or inside) one step of the job."""

    def after(name: str, when: Any = lambda *a: True) -> None:
        real = getattr(op, name)

        def crashed(*args: Any, **kwargs: Any) -> Any:
            value = real(*args, **kwargs)
            if when(*args):
                raise Crash()
            return value

        setattr(op, name, crashed)

    if point == "after_shard":
        after("_start")
    elif point == "after_upload":
        after("_upload")
    elif point == "after_create":
        after("_create")
    elif point == "after_record":
        after("_record")
    elif point == "after_download":
        after("_take_in")
    elif point == "after_ended":
        after("_collect")  # the ended batches are recorded as ended, their results not yet taken in
    elif point == "after_join":
        after("_take_in_ended")
    elif point == "round_2_create":
        after("_create", lambda path, folder, wave: any(":gen=1:" in str(w.input_identity) for w, _, _ in wave))
    elif point == "before_write":

        def finish_crash(*args: Any, **kwargs: Any) -> Any:
            raise Crash()

        op._finish = finish_crash  # type: ignore[method-assign]


def write_requests(folder: Path, n: int) -> Path:
    path = folder / "requests.jsonl"
    path.write_bytes(jsonl([request_line(i) for i in range(n)]))
    return path


def batches_by_key(server: FakeOpenAIServer, keys: set[str]) -> Counter[str]:
    return Counter(
        (b.metadata or {}).get(IDEMPOTENCY_METADATA_KEY)
        for b in server.state.batches.values()
        if (b.metadata or {}).get(IDEMPOTENCY_METADATA_KEY) in keys
    )


def job_keys(op: OpenAIBatchJobOperator, run_id: str, work: Path) -> set[str]:
    """The key of every piece (and queue attempt) the job ran, read back from its work folder's state."""
    from airflow_provider_openai_batch.batches import BatchWork
    from airflow_provider_openai_batch.idempotency import idempotency_key, task_identity

    ti = FakeTI(run_id)
    ti.task_id = "job"
    state = op._work({"ti": ti}).load()
    assert state is not None
    keys = set()
    for piece in state.pieces:
        work_of = BatchWork(None, op.endpoint, op.completion_window, op.metadata, None, piece.identity)
        keys.add(idempotency_key(task_identity({"ti": ti}), *work_of.key_parts()))
    return keys


def make_operator(source: Any, destination: Path, work: Path, **kwargs: Any) -> OpenAIBatchJobOperator:
    return OpenAIBatchJobOperator(
        task_id="job",
        source=source,
        endpoint="/v1/chat/completions",
        destination=str(destination),
        work_dir=str(work),
        keep_work_dir=True,
        max_requests_per_file=3,
        poll_interval=0.05,
        deferrable=True,
        **kwargs,
    )


def test_the_whole_job_defers_once_and_joins_in_input_order(job_server, tmp_path):
    source = write_requests(tmp_path, 7)
    destination = tmp_path / "joined.jsonl"
    before = job_server.batches_created
    driver = Driver(lambda: make_operator(source, destination, tmp_path / "work"), f"run-{uuid.uuid4()}", None)
    result = driver.attempt()
    assert result is not None
    assert result["counts"] == {"succeeded": 7, "failed": 0, "expired": 0, "cancelled": 0, "missing": 0}
    assert result["rounds"] == 1
    assert [b["shard"] for b in result["batches"]] == [0, 1, 2]
    assert job_server.batches_created - before == 3
    assert driver.deferrals == 1
    assert len(driver.triggers[0].batch_ids) == 3  # one trigger watches every batch
    rows = [json.loads(line) for line in destination.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(7)]
    assert {r["status"] for r in rows} == {"succeeded"}
    assert result["usage_totals"]["total_tokens"] > 0


def four_requests_into(destination: Any, **kwargs: Any) -> dict:
    """A job of four request dicts written to ``destination`` (its work folder beside it), run to its end."""

    def make() -> OpenAIBatchJobOperator:
        return OpenAIBatchJobOperator(
            task_id="job",
            source=[request_line(i) for i in range(4)],
            endpoint="/v1/chat/completions",
            destination=str(destination),
            poll_interval=0.05,
            deferrable=True,
            **kwargs,
        )

    result = Driver(make, f"run-{uuid.uuid4()}", None).attempt()
    assert result is not None and result["counts"]["succeeded"] == 4
    return result


def test_request_dicts_and_parquet_and_the_work_folder_removed(job_server, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    destination = tmp_path / "out" / "joined.parquet"
    four_requests_into(destination)
    assert pq.read_table(destination).column("custom_id").to_pylist() == [f"req-{i}" for i in range(4)]
    assert [p.name for p in destination.parent.iterdir()] == ["joined.parquet"]  # no work folder left behind


@pytest.mark.parametrize("name", ["nightly", "run [1]"], ids=["plain", "pattern-characters"])
def test_a_work_folder_on_object_storage_is_removed_with_everything_in_it(job_server, name):
    """The work folder beside an object-store destination holds copies of the requests: none is left behind."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    folder = ObjectStoragePath(f"memory://job-{uuid.uuid4().hex[:8]}/{name}")
    destination = folder / "joined.jsonl"
    four_requests_into(destination, max_requests_per_file=2)
    assert len(destination.read_bytes().splitlines()) == 4
    inside = folder.fs.find(folder.path, withdirs=True)
    assert sorted(path[len(folder.path) :] for path in inside if path != folder.path) == ["/joined.jsonl"]


def test_expired_requests_are_sent_again_in_a_second_round(job_server, tmp_path):
    source = write_requests(tmp_path, 6)
    destination = tmp_path / "joined.jsonl"
    job_server.script_batches("expire")  # the first shard's batch expires with half of its requests unrun
    driver = Driver(lambda: make_operator(source, destination, tmp_path / "work"), f"run-{uuid.uuid4()}", None)
    result = driver.attempt()
    assert result is not None
    assert result["rounds"] == 2
    assert result["counts"]["succeeded"] == 6
    assert [(b["round"], b["status"]) for b in result["batches"]][:2] == [(0, "expired"), (0, "completed")]
    rows = [json.loads(line) for line in destination.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(6)]
    assert any(r["round"] == 1 for r in rows)
    assert driver.deferrals == 2  # one per round


def test_bad_input_is_refused_before_anything_is_sent(job_server, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(jsonl([request_line(0), {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}]))
    before = job_server.count("files.create")
    op = make_operator(source, tmp_path / "joined.jsonl", tmp_path / "work")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*line 2.*body"):
        op.execute({"ti": FakeTI(f"run-{uuid.uuid4()}")})
    assert job_server.count("files.create") == before


POINTS = (
    "after_shard",
    "after_upload",
    "after_create",
    "lost_answer",
    "after_record",
    "deferred",
    "after_download",
    "after_ended",
    "after_join",
    "round_2_create",
    "before_write",
)
SEQUENCES = [(p,) for p in POINTS] + [s for s in itertools.permutations(POINTS, 2)][::7]


@pytest.mark.parametrize("with_store", [True, False], ids=["task_state_store", "metadata_scan_only"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=["-".join(s) for s in SEQUENCES])
def test_one_batch_per_shard_per_round_whatever_happens(sequence, with_store, job_server, tmp_path):
    source = write_requests(tmp_path, 5)
    destination, work = tmp_path / "joined.jsonl", tmp_path / "work"
    run_id = f"run-{uuid.uuid4()}"

    def make() -> OpenAIBatchJobOperator:
        return make_operator(source, destination, work)

    job_server.faults.clear()
    job_server.script_batches("expire")  # so that every job here has a second round
    driver = Driver(make, run_id, MemoryStateStore() if with_store else None)
    for n, point in enumerate(sequence):
        if point == "lost_answer":
            job_server.faults.script("batches.create", "drop_after")
        result = driver.attempt(point)
        job_server.faults.clear()
        # A first try always dies where told (a later one may find that step already done and skip it).
        assert n or point == "lost_answer" or result is None, f"{point} did not crash"
    final = driver.attempt()
    assert final is not None
    keys = job_keys(make(), run_id, work)
    made = batches_by_key(job_server, keys)
    assert set(made) == keys and set(made.values()) == {1}, made
    assert final["rounds"] == 2
    assert final["counts"]["succeeded"] == 5
    assert len(final["batches"]) == len(keys)
    rows = [json.loads(line) for line in destination.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(5)]


def test_enough_crash_cases():
    assert len(SEQUENCES) * 2 >= 40


def test_120k_requests_in_one_task_defer_once_like_the_five_task_example(job_server, tmp_path):
    """The sharded example's 120,000 embedding requests through the one-task path: the same 3 batches and rows."""
    source = tmp_path / "products.jsonl"
    with source.open("w") as out:
        for i in range(120_000):
            body = {"model": "text-embedding-3-small", "input": f"product {i} description"}
            out.write(
                json.dumps({"custom_id": f"product-{i:06d}", "method": "POST", "url": "/v1/embeddings", "body": body})
            )
            out.write("\n")
    destination = tmp_path / "joined.jsonl"

    def make() -> OpenAIBatchJobOperator:
        return OpenAIBatchJobOperator(
            task_id="job",
            source=str(source),
            endpoint="/v1/embeddings",
            destination=str(destination),
            poll_interval=0.05,
            deferrable=True,
        )

    before = set(job_server.state.batches)
    driver = Driver(make, f"run-{uuid.uuid4()}", None)
    result = driver.attempt()
    assert result is not None
    assert driver.deferrals == 1 and len(driver.triggers[0].batch_ids) == 3
    made = [b for key, b in job_server.state.batches.items() if key not in before]
    assert sorted(len(b.requests) for b in made) == [20_000, 50_000, 50_000]
    assert result["counts"]["succeeded"] == 120_000 and result["rounds"] == 1
    with destination.open() as rows:
        ids = [json.loads(line)["custom_id"] for line in rows]
    assert ids == [f"product-{i:06d}" for i in range(120_000)]


def test_the_job_trigger_reads_a_rotated_key_again_after_a_401(job_server, monkeypatch):
    """As every other wait (``polling.PollFailures``): one 401 re-reads the connection instead of failing the job."""
    import time

    from airflow_provider_openai_batch.hooks import openai_batch as hook_module
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    hook = OpenAIBatchHook()
    batch_id = hook.create_batch(hook.upload_file(jsonl([request_line(0)])).id, "/v1/chat/completions").id
    CLOCK.advance(60)
    fresh = json.loads(connection_env(job_server))
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps({**fresh, "password": "sk-revoked"}))
    base_hook = hook_module.BaseHook
    reads: list[str] = []

    async def rotating(cls: Any, conn_id: str) -> Any:  # the first read sees the old key; it is rotated right after
        conn = base_hook.get_connection(conn_id)
        reads.append(conn.password)
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(fresh))
        return conn

    monkeypatch.setattr(base_hook, "aget_connection", classmethod(rotating), raising=False)
    trigger = OpenAIBatchJobTrigger(
        batch_ids=[batch_id],
        conn_id="openai_default",
        poll_interval=0.05,
        end_times={batch_id: time.time() + 60},
        jitter_first_poll=False,
    )
    event = run_trigger(trigger)
    assert reads[:2] == ["sk-revoked", fresh["password"]]
    assert event["status"] == "ended"


@pytest.mark.parametrize("tolerated", [2, 5])
def test_a_blocking_job_wait_honours_max_poll_failures(tmp_path, monkeypatch, tolerated):
    """Waiting in the worker (deferrable=False), the job gives up after the failed polls its user tolerates."""
    from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    with FakeOpenAIServer(timings=FAST) as srv:
        # No SDK retries: each injected fault is one failed poll.
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv, max_retries=0))
        polling = OpenAIBatchHook.poll_batch
        scripted: list[bool] = []

        def three_failed_polls_first(self: OpenAIBatchHook, *args: Any, **kwargs: Any) -> Any:
            if not scripted:  # the blocking wait's first poll meets three failures in a row
                scripted.append(True)
                srv.faults.script("batches.retrieve", "500", "503", "500")
            return polling(self, *args, **kwargs)

        monkeypatch.setattr(OpenAIBatchHook, "poll_batch", three_failed_polls_first)
        op = OpenAIBatchJobOperator(
            task_id="job",
            source=[request_line(i) for i in range(2)],
            endpoint="/v1/chat/completions",
            destination=str(tmp_path / "joined.jsonl"),
            poll_interval=0.01,
            deferrable=False,
            max_poll_failures=tolerated,
        )
        context = {"ti": FakeTI(f"run-{uuid.uuid4()}")}
        if tolerated < 3:
            with pytest.raises(OpenAIBatchAPIError, match="500"):
                op.execute(context)
            assert not (tmp_path / "joined.jsonl").exists()
        else:
            assert op.execute(context)["counts"]["succeeded"] == 2
