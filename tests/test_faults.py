"""The trigger, sensor and operators under faults injected by FakeOpenAIServer, judged by what the server saw."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchCreateOperator
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Fault
from airflow_provider_openai_batch.testing.server import redacted_header
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchTrigger
from tests.conftest import FAST, connection_env, jsonl, request_line


def _event(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    return asyncio.run(first())


def _trigger(batch_id: str, conn_id: str, **kwargs: Any) -> OpenAIBatchTrigger:
    kwargs.setdefault("end_time", time.time() + 30)
    return OpenAIBatchTrigger(batch_id=batch_id, conn_id=conn_id, poll_interval=0.05, **kwargs)


@pytest.fixture
def batch_id(hook) -> str:
    return hook.create_batch(hook.upload_file(jsonl([request_line(i) for i in range(4)])).id, "/v1/chat/completions").id


def test_429_retry_after_is_honoured(batch_id, conn_id, server):
    server.faults.script("batches.retrieve", Fault("429", retry_after=0.3), Fault("429", retry_after=0.3))
    started = time.monotonic()
    event = _event(_trigger(batch_id, conn_id, jitter_first_poll=False))
    assert event["status"] == "terminal"
    assert time.monotonic() - started >= 0.6  # the SDK waited as the server asked, twice
    assert ("batches.retrieve", "429") in server.faults.injected


@pytest.mark.parametrize("kind", ["500", "502", "503", "drop"])
def test_transient_faults_are_ridden_out(kind, batch_id, conn_id, server):
    server.faults.script("batches.retrieve", *[kind] * 6)
    event = _event(_trigger(batch_id, conn_id))
    assert event["status"] == "terminal"
    assert event["summary"]["status"] == "completed"


def test_timeouts_are_retried(batch_id, server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SLOWPOKE", connection_env(server, timeout=0.3, max_retries=1))
    server.faults.script("batches.retrieve", Fault("slow", delay=1.0))
    assert _event(_trigger(batch_id, "slowpoke"))["status"] == "terminal"


def test_the_failure_bound_ends_the_wait_with_a_clear_error(batch_id, server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FRAGILE", connection_env(server, max_retries=0))
    server.faults.script("batches.retrieve", *["503"] * 10)
    event = _event(_trigger(batch_id, "fragile", max_poll_failures=3))
    assert event["status"] == "error"
    assert "HTTP 503" in event["message"] and batch_id in event["message"]
    assert server.count("batches.retrieve") == 4  # 1 + 3 tolerated failures, then give up
    sensor = OpenAIBatchSensor(task_id="wait", batch_id=batch_id, conn_id="fragile")
    # The same error a blocking wait raises when it gives up: the API error, with its status and request id.
    with pytest.raises(OpenAIBatchAPIError, match="HTTP 503") as raised:
        sensor.execute_complete({}, event)
    assert raised.value.http_status == 503 and raised.value.request_id


@pytest.mark.parametrize("status", [401, 403, 404])
def test_permanent_errors_end_at_once(status, batch_id, conn_id, server, monkeypatch):
    if status == 401:
        monkeypatch.setenv(
            "AIRFLOW_CONN_WRONGKEY",
            json.dumps({"conn_type": "openai_batch", "host": server.base_url, "password": "sk-not-the-key"}),
        )
        conn = "wrongkey"
        target = batch_id
    elif status == 403:
        conn, target = conn_id, batch_id
        server.faults.script("batches.retrieve", "403")
    else:
        conn, target = conn_id, "batch_gone"
    event = _event(_trigger(target, conn))
    assert event["status"] == "error"
    assert f"HTTP {status}" in event["message"]
    # A 401 is retried once with a fresh read of the connection (the key may have just been rotated).
    assert server.count("batches.retrieve") == (2 if status == 401 else 1)


ROTATED_KEY = "sk-rotated-after-the-first-poll"


def _rotate_key(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The key is revoked at OpenAI and its successor put into the connection, while a wait is under way."""
    old = str(server.api_key)
    server.api_key = ROTATED_KEY
    monkeypatch.setenv("AIRFLOW_CONN_ROTATING", connection_env(server))
    server.reset_counters()
    return old


def _keys_sent(server: FakeOpenAIServer) -> list[str]:
    keys = {redacted_header(f"Bearer {key}"): key for key in (ROTATED_KEY, "sk-fake-test-key")}
    return [keys.get(seen["authorization"], "?") for seen in server.headers_seen["batches.retrieve"]]


def test_a_blocking_wait_reads_a_rotated_key_again_after_a_401(batch_id, server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_ROTATING", connection_env(server))
    hook = OpenAIBatchHook("rotating")
    hook.get_batch(batch_id)  # the hook holds a client with the old key
    old = _rotate_key(server, monkeypatch)
    batch = hook.wait_for_batch(batch_id, poll_interval=0.05, timeout=30)
    assert batch.status == "completed"
    # One refused poll with the old key, then the connection read again: every later poll sends the new key.
    keys = _keys_sent(server)
    assert keys[0] == old and len(keys) >= 2 and set(keys[1:]) == {ROTATED_KEY}


def test_a_poking_sensor_reads_a_rotated_key_again_after_a_401(batch_id, server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_ROTATING", connection_env(server))
    sensor = OpenAIBatchSensor(
        task_id="wait", batch_id=batch_id, conn_id="rotating", mode="poke", deferrable=False, poke_interval=0.05
    )
    sensor.poke({})  # the sensor's hook holds a client with the old key
    old = _rotate_key(server, monkeypatch)
    deadline = time.monotonic() + 30
    while not sensor.poke({}):  # a refused poke would raise: the 401 is followed by one fresh read, not a failure
        assert time.monotonic() < deadline
        time.sleep(0.05)
    keys = _keys_sent(server)
    assert keys[0] == old and len(keys) >= 2 and set(keys[1:]) == {ROTATED_KEY}


def test_a_deferred_job_whose_polls_give_up_fails_with_the_api_error(tmp_path, monkeypatch):
    """The job's trigger gives up polling; the job resumes into the error a blocking wait raises, status and all."""
    from airflow.providers.common.compat.sdk import TaskDeferred

    from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
    from airflow_provider_openai_batch.triggers.job import OpenAIBatchJobTrigger
    from tests.test_idempotency import FakeTI

    def job() -> OpenAIBatchJobOperator:
        return OpenAIBatchJobOperator(
            task_id="job",
            source=[request_line(i) for i in range(3)],
            endpoint="/v1/chat/completions",
            destination=str(tmp_path / "joined.jsonl"),
            work_dir=str(tmp_path / "work"),
            poll_interval=0.05,
            max_poll_failures=2,
            deferrable=True,
        )

    ti = FakeTI("run-gives-up")
    ti.task_id = "job"
    # The clock stands still: the batch is still running when the job first looks, so the job defers.
    with FakeOpenAIServer(timings=FAST, clock=FakeClock()) as server:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server, max_retries=0))
        with pytest.raises(TaskDeferred) as deferred:
            job().execute({"ti": ti})
        trigger = deferred.value.trigger
        assert isinstance(trigger, OpenAIBatchJobTrigger)
        server.reset_counters()
        server.faults.script("batches.retrieve", *["503"] * 10)  # OpenAI down for longer than the job tolerates

        async def first_event() -> dict[str, Any]:
            async for event in trigger.run():
                return dict(event.payload)
            raise AssertionError("no event")

        event = asyncio.run(asyncio.wait_for(first_event(), 60))  # a trigger that never gives up fails here
        assert event["status"] == "error"
        assert server.count("batches.retrieve") == 3  # 1 + the 2 tolerated failures, then it gave up
        with pytest.raises(OpenAIBatchAPIError, match="HTTP 503") as raised:
            job().execute_complete({"ti": ti}, event)  # a fresh worker resumes the task
    assert raised.value.http_status == 503 and raised.value.retryable
    assert str(raised.value.request_id).startswith("req_")  # the id the server gave the failed poll


def test_restart_keeps_the_absolute_deadline(batch_id, conn_id, hook):
    stalled = hook.create_batch(
        hook.upload_file(jsonl([request_line(0)])).id, "/v1/chat/completions", metadata={"fake_scenario": "stall"}
    ).id
    end_time = time.time() + 0.5
    original = _trigger(stalled, conn_id, end_time=end_time)
    _, kwargs = original.serialize()
    time.sleep(0.3)  # the triggerer restarts; the trigger is rebuilt from its serialized form
    rebuilt = OpenAIBatchTrigger(**kwargs)
    started = time.monotonic()
    event = _event(rebuilt)
    assert event["status"] == "timeout"
    assert time.monotonic() - started < 0.5  # the remaining 0.2 s, not a fresh 0.5 s
    assert rebuilt.end_time == end_time


def test_operator_on_kill_cancels_in_the_blocking_path(hook, conn_id, server, monkeypatch):
    from airflow_provider_openai_batch.operators import base

    monkeypatch.setattr(base, "task_instance_state", lambda ti: "failed")  # the user marked the task failed
    file_id = hook.upload_file(jsonl([request_line(0)])).id
    op = OpenAIBatchCreateOperator(
        task_id="create",
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        metadata={"fake_scenario": "stall"},
        wait_for_completion=True,
        deferrable=False,
        poll_interval=0.05,
        cancel_on_timeout=False,
    )

    class TI:
        dag_id, task_id, run_id, map_index = "d", "create", "r", -1

        def xcom_push(self, key: str, value: Any) -> None:
            pass

    errors: list[BaseException] = []

    def run() -> None:
        try:
            op.execute({"ti": TI()})
        except BaseException as error:  # the batch ends cancelled: the policy fails the task
            errors.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 5
    while op._waiting_on is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    op.on_kill()
    worker.join(10)
    assert server.count("batches.cancel") == 1
    assert errors and "cancelled" in str(errors[0])
