"""
The one-task job lives within the account: a job ten times larger than the model's enqueued-token queue ends with
every request succeeded, the queue never over its limit, no request run twice and nothing refused charged; with
the budget declared and with the budget learned from OpenAI's ``token_limit_exceeded``. And the blocks meet the same
queue: a refused batch fails the sensor with its own error, a create that waits creates again.

Real HTTP to FakeOpenAIServer, whose account models OpenAI's queue (CONTRACT.md "The account"); the driver from
``test_job`` plays Airflow's part (execute, deferrals, resumes).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch import idempotency
from airflow_provider_openai_batch.batch_status import QUEUE_ERROR_CODE
from airflow_provider_openai_batch.exceptions import BatchFailedError
from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer
from airflow_provider_openai_batch.testing.tokens import request_tokens
from tests.conftest import FAST, connection_env, jsonl, request_line
from tests.test_job import Driver

MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
REQUESTS, PER_SHARD = 60, 6


def rows() -> list[dict[str, Any]]:
    return [request_line(i, model=MODEL) for i in range(REQUESTS)]


def shard_tokens() -> int:
    """The most queue tokens (the fake's own count) any one shard of the job holds."""
    lines = rows()
    return max(
        sum(request_tokens(ENDPOINT, line["body"]) for line in lines[i : i + PER_SHARD])
        for i in range(0, REQUESTS, PER_SHARD)
    )


@pytest.fixture
def queue(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    """An account whose queue for the model holds ``request.param`` shards' worth of tokens."""
    monkeypatch.setattr(idempotency, "RETRY_BASE_DELAY", 0.01)
    clock = FakeClock()
    limit = shard_tokens() * getattr(request, "param", 1)
    with FakeOpenAIServer(timings=FAST, clock=clock, queue_limits={MODEL: limit}) as srv:
        srv.clock_ = clock  # type: ignore[attr-defined]
        srv.limit_ = limit  # type: ignore[attr-defined]
        previous = os.environ.get("AIRFLOW_CONN_OPENAI_DEFAULT")
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        monkeypatch.setattr("tests.test_job.CLOCK", clock)
        yield srv
        if previous is not None:
            os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = previous


def run_job(server: FakeOpenAIServer, tmp_path: Path, **kwargs: Any) -> tuple[dict[str, Any] | None, Driver]:
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl(rows()))

    def make() -> OpenAIBatchJobOperator:
        return OpenAIBatchJobOperator(
            task_id="job",
            source=str(source),
            endpoint=ENDPOINT,
            destination=str(tmp_path / "joined.jsonl"),
            work_dir=str(tmp_path / "work"),
            max_requests_per_file=PER_SHARD,
            poll_interval=0.05,
            deferrable=True,
            **kwargs,
        )

    driver = Driver(make, f"run-{uuid.uuid4()}", None, max_deferrals=200)
    return driver.attempt(), driver


def ran(server: FakeOpenAIServer) -> Counter[str]:
    """How often each request was in a batch the queue admitted (refused batches run and charge nothing)."""
    refused = {r.batch_id for r in server.state.queue_refusals}
    return Counter(cid for b in server.state.batches.values() if b.id not in refused for cid, _ in b.requests)


def assert_every_request_ran_once(
    server: FakeOpenAIServer, result: dict[str, Any] | None, tmp_path: Path, limit: int
) -> None:
    assert result is not None
    assert result["counts"]["succeeded"] == REQUESTS
    assert set(ran(server).values()) == {1}, "a request ran twice (and was paid twice)"
    assert len(ran(server)) == REQUESTS
    assert 0 < server.state.peak_enqueued(MODEL) <= limit, "the account's queue went over its limit"
    joined = [json.loads(line) for line in (tmp_path / "joined.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in joined] == [f"req-{i}" for i in range(REQUESTS)]
    assert {r["status"] for r in joined} == {"succeeded"}


@pytest.mark.parametrize("queue", [1], indirect=True)
def test_a_job_ten_times_the_queue_with_a_declared_budget_is_never_refused(queue, tmp_path):
    """The user declares the organization's limit (the fake's): the job counts tokens as OpenAI does and fits."""
    result, driver = run_job(queue, tmp_path, max_enqueued_tokens=shard_tokens())
    assert_every_request_ran_once(queue, result, tmp_path, queue.limit_)  # type: ignore[attr-defined]
    assert queue.state.refusals(MODEL) == 0
    assert queue.state.peak_enqueued(MODEL) <= shard_tokens()
    assert driver.deferrals >= 10  # one shard at a time: the queue, not the job, sets the pace


@pytest.mark.parametrize("queue", [2], indirect=True)
def test_a_job_larger_than_the_queue_learns_the_limit_from_the_first_refusal(queue, tmp_path):
    result, _ = run_job(queue, tmp_path)
    assert_every_request_ran_once(queue, result, tmp_path, queue.limit_)  # type: ignore[attr-defined]
    refusals = queue.state.refusals(MODEL)
    assert refusals >= 1
    assert result is not None and result["queue_refusals"] == refusals
    # Refusals are not failed requests, and they use no round: every request succeeded in the first generation.
    assert result["rounds"] == 1
    first_wave = len(queue.state.queue_refusals)
    assert first_wave <= REQUESTS // PER_SHARD


@pytest.mark.parametrize("queue", [2], indirect=True)
def test_a_queue_refusal_is_never_a_green_job_with_missing_requests(queue, tmp_path):
    """Even with one round, refused requests are sent again (they never ran): the job ends with all of them."""
    result, _ = run_job(queue, tmp_path, max_rounds=1)
    assert_every_request_ran_once(queue, result, tmp_path, queue.limit_)  # type: ignore[attr-defined]


def test_azure_refuses_at_create_and_the_job_waits_for_capacity(tmp_path, monkeypatch):
    monkeypatch.setattr(idempotency, "RETRY_BASE_DELAY", 0.01)
    clock = FakeClock()
    with FakeOpenAIServer(
        timings=FAST, clock=clock, queue_limits={MODEL: shard_tokens() * 2}, queue_refusal="at_create"
    ) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        monkeypatch.setattr("tests.test_job.CLOCK", clock)
        result, _ = run_job(srv, tmp_path)
        assert result is not None and result["counts"]["succeeded"] == REQUESTS
        assert srv.state.refusals(MODEL) >= 1
        assert set(ran(srv).values()) == {1}


@pytest.mark.parametrize("queue", [2], indirect=True)
def test_the_first_waves_refusals_teach_one_budget_and_no_shard_is_cut(queue, tmp_path):
    """
    The first wave goes before the limit is known, so most of it is refused, each refusal naming the same limit.
    One of them sets the budget; the others teach nothing more: the budget stays at its share of the limit (two
    shards' worth here), no shard is cut smaller than the input's shards, and two run at a time.
    """
    result, _ = run_job(queue, tmp_path)
    assert_every_request_ran_once(queue, result, tmp_path, queue.limit_)  # type: ignore[attr-defined]
    assert result is not None
    assert queue.state.refusals(MODEL) >= 2
    parts = [b["part"] for b in result["batches"] if b["status"] == "completed"]
    assert sorted(parts) == [f"{i:05d}" for i in range(REQUESTS // PER_SHARD)], "a shard was cut to fit a shrunk budget"
    assert queue.state.peak_enqueued(MODEL) > shard_tokens(), "the queue held one shard at a time, not two"


# --- the blocks meet the same queue ---------------------------------------------------------------------------


@pytest.fixture
def tight(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    clock = FakeClock()
    with FakeOpenAIServer(timings=FAST, clock=clock, queue_limits={MODEL: shard_tokens()}) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        srv.clock_ = clock  # type: ignore[attr-defined]
        yield srv


def test_a_refused_batch_fails_the_sensor_with_what_to_do(tight):
    from airflow_provider_openai_batch.exceptions import BatchQueueFullError
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor
    from tests.test_lifecycle import TI

    hook = OpenAIBatchHook()
    big = hook.upload_file(jsonl(rows()[:12])).id  # two shards' worth: more than the queue holds
    batch_id = hook.create_batch(big, ENDPOINT).id
    tight.clock_.advance(5)  # type: ignore[attr-defined]
    sensor = OpenAIBatchSensor(task_id="wait", batch_id=batch_id, deferrable=False, poke_interval=0.01)
    with pytest.raises(BatchQueueFullError, match=rf"{MODEL}.*Limit.*queue") as refused:
        sensor.execute({"ti": TI("r")})
    assert isinstance(refused.value, BatchFailedError)
    assert refused.value.limit == shard_tokens()
    assert QUEUE_ERROR_CODE in str(refused.value)


def test_a_waiting_create_creates_again_once_the_queue_has_room(tight, monkeypatch):
    """Refusals are not charged: a create that waits sends its batch again (a new batch) until it is admitted."""
    import threading
    import time

    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.operators import openai_batch
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchCreateOperator
    from tests.test_lifecycle import TI

    monkeypatch.setattr(openai_batch, "QUEUE_RETRY_DELAY", 0.05)
    hook = OpenAIBatchHook()
    blocker = hook.create_batch(hook.upload_file(jsonl(rows()[:PER_SHARD])).id, ENDPOINT, metadata=None)
    file_id = hook.upload_file(jsonl(rows()[PER_SHARD : 2 * PER_SHARD])).id
    op = OpenAIBatchCreateOperator(
        task_id="create",
        input_file_id=file_id,
        endpoint=ENDPOINT,
        wait_for_completion=True,
        deferrable=False,
        poll_interval=0.05,
        max_poll_interval=None,
    )
    clock = tight.clock_  # type: ignore[attr-defined]
    stop = threading.Event()

    def time_passes() -> None:  # OpenAI's clock: the blocker runs, and ends after a while
        while not stop.is_set():
            clock.advance(0.05)
            time.sleep(0.01)

    ticker = threading.Thread(target=time_passes, daemon=True)
    real_create = op.hook.create_batch

    def created_then_time_runs(*args: Any, **kwargs: Any) -> Any:
        batch = real_create(*args, **kwargs)
        if not ticker.is_alive():  # both batches end validation together: the blocker holds the queue
            ticker.start()
        return batch

    op.hook.create_batch = created_then_time_runs  # type: ignore[method-assign]
    try:
        batch_id = op.execute({"ti": TI(f"r-{uuid.uuid4()}")})
    finally:
        stop.set()
    assert tight.state.status(tight.state.batches[batch_id]) == "completed"
    assert tight.state.refusals(MODEL) >= 1
    assert blocker.id != batch_id


@pytest.mark.parametrize("declared", [False, True], ids=["learned", "declared"])
def test_in_a_real_dag_run_a_job_ten_times_the_queue_ends_with_everything(airflow_db, tmp_path, monkeypatch, declared):
    """
    ``dag.test()``: @task.openai_batch, a queue of one shard's tokens, the budget learned from the first refusal or
    declared (``max_enqueued_tokens``, then never refused): every request runs once, the queue never over its limit.
    """
    from airflow.sdk import task

    from tests.conftest import run_dag, task_states, xcoms

    monkeypatch.setattr(idempotency, "RETRY_BASE_DELAY", 0.01)
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl(rows()))
    destination = tmp_path / "joined.jsonl"
    limit = shard_tokens()
    budget = {"max_enqueued_tokens": limit} if declared else {}
    with FakeOpenAIServer(timings=FAST, queue_limits={MODEL: limit}) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))

        def build() -> None:
            @task.openai_batch(
                endpoint=ENDPOINT,
                destination=str(destination),
                max_requests_per_file=PER_SHARD,
                poll_interval=0.05,
                max_poll_interval=None,
                deferrable=True,
                **budget,
            )
            def nightly() -> str:
                return str(source)

            nightly()

        run = run_dag(build)
        assert task_states(run) == {"nightly": "success"}
        result = xcoms(run, "nightly")[-1]
        assert result["counts"]["succeeded"] == REQUESTS  # type: ignore[index]
        if declared:
            assert srv.state.refusals(MODEL) == 0
        else:
            assert srv.state.refusals(MODEL) >= 1
        assert set(ran(srv).values()) == {1}, "a request ran twice (and was paid twice)"
        assert len(ran(srv)) == REQUESTS
        assert 0 < srv.state.peak_enqueued(MODEL) <= limit, "the account's queue went over its limit"
    joined = [json.loads(line) for line in destination.read_text().splitlines()]
    assert [r["custom_id"] for r in joined] == [f"req-{i}" for i in range(REQUESTS)]
