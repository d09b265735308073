"""
Every outcome path through the real trigger over HTTP, judged by the sensor's execute_complete, as a
deferred sensor resumes in production: completed, failures under each policy, failed, expired, cancelled, timeout.
"""

from __future__ import annotations

import asyncio
import time
from importlib import import_module
from typing import Any

import pytest

from airflow_provider_openai_batch.exceptions import BatchFailedError, BatchTimeoutError, OpenAIBatchAPIError
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchTrigger
from tests.conftest import SUMMARY_KEYS, jsonl, request_line

FAIL = {"fake_error": {"status_code": 400, "code": "invalid_prompt"}}


def make_batch(hook, n: int = 10, failing: set[int] = frozenset(), **metadata: str) -> str:
    rows = [request_line(i, **(FAIL if i in failing else {})) for i in range(n)]
    file_id = hook.upload_file(jsonl(rows)).id
    return hook.create_batch(file_id, "/v1/chat/completions", metadata=metadata or None).id


def wait(batch_id: str, conn_id: str, *, end_time: float | None = None, **sensor_kwargs: Any) -> dict[str, Any]:
    trigger = OpenAIBatchTrigger(
        batch_id=batch_id, conn_id=conn_id, poll_interval=0.05, end_time=end_time or time.time() + 30
    )

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger yielded nothing")

    event = asyncio.run(first_event())
    sensor = OpenAIBatchSensor(task_id="wait", batch_id=batch_id, conn_id=conn_id, **sensor_kwargs)
    return sensor.execute_complete({}, event)


def test_completed(hook, conn_id):
    summary = wait(make_batch(hook), conn_id)
    assert summary["status"] == "completed"
    assert summary["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert summary["usage"]["total_tokens"] > 0
    assert set(summary) == SUMMARY_KEYS


def test_partial_failures_warn_by_default(hook, conn_id):
    summary = wait(make_batch(hook, failing={1, 2}), conn_id)
    assert summary["request_counts"]["failed"] == 2
    assert summary["error_file_id"]


def test_every_request_failed_fails_by_default(hook, conn_id):
    with pytest.raises(BatchFailedError, match="every request failed"):
        wait(make_batch(hook, n=3, failing={0, 1, 2}), conn_id)


@pytest.mark.parametrize(
    ("policy", "fails"),
    [
        ({"max_failed_requests": 1}, True),
        ({"max_failed_requests": 2}, False),
        ({"max_failed_ratio": 0.1}, True),
        ({"max_failed_ratio": 0.2}, False),
        ({"max_failed_requests": 5, "max_failed_ratio": 0.1}, True),
    ],
)
def test_failure_thresholds(hook, conn_id, policy, fails):
    batch_id = make_batch(hook, failing={3, 7})
    if fails:
        with pytest.raises(BatchFailedError, match="2 of 10 requests failed"):
            wait(batch_id, conn_id, **policy)
    else:
        assert wait(batch_id, conn_id, **policy)["request_counts"]["failed"] == 2


def test_failed_batch_lists_its_errors(hook, conn_id):
    rows = [request_line(0), {"custom_id": "bad", "method": "GET", "url": "/v1/chat/completions", "body": {}}]
    batch_id = hook.create_batch(hook.upload_file(jsonl(rows)).id, "/v1/chat/completions").id
    with pytest.raises(BatchFailedError) as raised:
        wait(batch_id, conn_id)
    text = str(raised.value)
    assert f"Batch {batch_id} failed" in text
    assert "line 2, field 'method'" in text
    assert raised.value.summary is not None and raised.value.summary["status"] == "failed"


def test_expired_fails_unless_accepted(hook, conn_id):
    batch_id = make_batch(hook, fake_scenario="expire")
    with pytest.raises(BatchFailedError, match="accept_expired=True"):
        wait(batch_id, conn_id)
    summary = wait(batch_id, conn_id, accept_expired=True)
    assert summary["status"] == "expired"
    assert summary["request_counts"]["completed"] == 5
    assert summary["output_file_id"]


def test_cancelled_fails_unless_accepted(hook, conn_id, server):
    batch_id = make_batch(hook, fake_scenario="stall")
    hook.cancel_batch(batch_id)
    with pytest.raises(BatchFailedError, match="accept_cancelled=True"):
        wait(batch_id, conn_id)
    assert wait(batch_id, conn_id, accept_cancelled=True)["status"] == "cancelled"


def test_timeout_cancels_the_batch(hook, conn_id, server):
    batch_id = make_batch(hook, fake_scenario="stall")
    with pytest.raises(BatchTimeoutError, match="was cancelled"):
        wait(batch_id, conn_id, end_time=time.time() + 0.3)
    assert server.count("batches.cancel") == 1
    assert hook.get_batch(batch_id).status in ("cancelling", "cancelled")


def test_timeout_without_cancel(hook, conn_id, server):
    batch_id = make_batch(hook, fake_scenario="stall")
    with pytest.raises(BatchTimeoutError):
        wait(batch_id, conn_id, end_time=time.time() + 0.2, cancel_on_timeout=False)
    assert server.count("batches.cancel") == 0


def test_trigger_survives_transient_errors(hook, conn_id, server):
    batch_id = make_batch(hook)
    # Each poll's SDK retries (3 here) are spent, then the trigger itself tolerates the failed poll.
    server.faults.script("batches.retrieve", *["503"] * 8)
    assert wait(batch_id, conn_id)["status"] == "completed"


def test_trigger_gives_up_on_not_found(conn_id, server):
    """A deferred wait that gives up raises what a blocking one raises: the API error, status and request id."""
    with pytest.raises(OpenAIBatchAPIError, match="HTTP 404") as deferred:
        wait("batch_does_not_exist", conn_id)
    assert server.count("batches.retrieve") == 1
    assert deferred.value.not_found and deferred.value.request_id
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.polling import PollFailures, PollPolicy

    with pytest.raises(OpenAIBatchAPIError) as blocking:
        OpenAIBatchHook().poll_batch("batch_does_not_exist", PollFailures(PollPolicy(0.01)))
    assert type(blocking.value) is type(deferred.value)
    assert blocking.value.http_status == deferred.value.http_status == 404


def test_trigger_serialize_round_trip():
    trigger = OpenAIBatchTrigger(
        batch_id="batch_1", conn_id="c", poll_interval=30, end_time=1_900_000_000.5, cancel_on_kill=False
    )
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    rebuilt = getattr(import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)
    assert kwargs["end_time"] == 1_900_000_000.5  # absolute: a restarted triggerer keeps the same deadline
    # What the metadata DB stores for a deferred task: ids and timings only, never a connection field. (A full run
    # with a real key is checked against the stored trigger rows in test_secrets.)
    assert set(kwargs) <= {
        "batch_id",
        "conn_id",
        "poll_interval",
        "end_time",
        "cancel_on_kill",
        "max_poll_failures",
        "jitter_first_poll",
        "created_at",
        "max_poll_interval",
        "sibling_look",  # the batch's idempotency key (a hash), first try and when its try started looking
    }


def test_on_kill_cancels_the_batch(hook, conn_id, server, monkeypatch):
    batch_id = make_batch(hook, fake_scenario="stall")
    trigger = OpenAIBatchTrigger(batch_id=batch_id, conn_id=conn_id, poll_interval=0.05, end_time=time.time() + 30)

    async def marked_failed() -> str:
        return "failed"

    monkeypatch.setattr(trigger, "task_state", marked_failed)
    asyncio.run(trigger.on_kill())
    assert server.count("batches.cancel") == 1
    assert hook.get_batch(batch_id).status in ("cancelling", "cancelled")  # how far it got depends on the machine


def test_on_kill_can_be_switched_off(hook, conn_id, server):
    batch_id = make_batch(hook, fake_scenario="stall")
    trigger = OpenAIBatchTrigger(batch_id, conn_id, 0.05, time.time() + 30, cancel_on_kill=False)
    asyncio.run(trigger.on_kill())
    assert server.count("batches.cancel") == 0


def test_polls_relax_as_the_batch_ages():
    from airflow_provider_openai_batch.polling import PollPolicy

    assert PollPolicy(60, 600).delay(batch_age=30) == 60
    assert PollPolicy(60, 600).delay(batch_age=3_000) == 300
    assert PollPolicy(60, 600).delay(batch_age=86_400) == 600
    assert PollPolicy(60, None).delay(batch_age=86_400) == 60
