"""
The trigger's poll (``hook.aget_batch_summary``: the SDK's raw answer read with a small struct) against the SDK's full
model, over real HTTP against the fake server: the same summary for every status, and the same error handling.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_openai_batch.batch_status import BatchSummary, summarize, summarize_json
from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Fault, Timings
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchTrigger
from tests.conftest import SUMMARY_KEYS, connection_env, jsonl, request_line

#: Seconds on the fake clock: each phase lasts long enough to be polled in the middle of it.
PHASES = Timings(validating=10, in_progress=100, finalizing=10, cancelling=10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _serve(clock: FakeClock, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(clock=clock, timings=PHASES, **kwargs) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv, max_retries=3))
        yield srv


@pytest.fixture
def stepped(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    yield from _serve(clock, monkeypatch)


@pytest.fixture
def azure_like(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    """A compatible server that sends ``""`` for missing file ids and no counts while validating."""
    yield from _serve(clock, monkeypatch, azure_quirks=True)


def _create(rows: list[dict[str, Any]], **metadata: str) -> str:
    hook = OpenAIBatchHook()
    file_id = hook.upload_file(jsonl(rows)).id
    return hook.create_batch(file_id, "/v1/chat/completions", metadata=metadata or None).id


def _poll_both_ways(batch_id: str) -> BatchSummary:
    """The poll's summary, checked against the SDK model's (async, and sync with strict validation of the shape)."""

    async def both() -> tuple[BatchSummary, BatchSummary]:
        hook = OpenAIBatchHook()
        return await hook.aget_batch_summary(batch_id), summarize(await hook.aget_batch(batch_id))

    lean, full = asyncio.run(both())
    strict = summarize(OpenAIBatchHook(strict_response_validation=True).get_batch(batch_id))
    assert lean == full == strict
    assert set(lean) == SUMMARY_KEYS
    return lean


def _walk(clock: FakeClock, batch_id: str, steps: list[tuple[float, str]]) -> list[BatchSummary]:
    seen = []
    for seconds, status in steps:
        clock.advance(seconds)
        summary = _poll_both_ways(batch_id)
        assert summary["status"] == status
        seen.append(summary)
    return seen


def test_a_completed_batch_reads_the_same_at_every_status(stepped, clock):
    batch_id = _create([request_line(i) for i in range(10)])
    _, running, _, completed = _walk(
        clock, batch_id, [(1, "validating"), (59, "in_progress"), (55, "finalizing"), (20, "completed")]
    )
    assert running["request_counts"]["completed"] == 5
    assert completed["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert completed["usage"]["total_tokens"] > 0 and completed["output_file_id"]


def test_failed_requests_read_the_same(stepped, clock):
    fail = {"fake_error": {"status_code": 400, "code": "invalid_prompt"}}
    batch_id = _create([request_line(i, **(fail if i % 2 else {})) for i in range(6)])
    *_, completed = _walk(clock, batch_id, [(60, "in_progress"), (100, "completed")])
    assert completed["request_counts"]["failed"] == 3 and completed["error_file_id"]


def test_a_failed_batch_reads_the_same_with_its_errors(stepped, clock):
    bad = {"custom_id": "bad", "method": "GET", "url": "/v1/chat/completions", "body": {}}
    batch_id = _create([request_line(0), bad, request_line(1)])
    (failed,) = _walk(clock, batch_id, [(20, "failed")])
    assert failed["errors"] and failed["errors"][0]["line"] == 2 and failed["errors"][0]["param"] == "method"


@pytest.mark.parametrize(("scenario", "status"), [("fail", "failed"), ("expire", "expired")])
def test_scenario_endings_read_the_same(stepped, clock, scenario, status):
    batch_id = _create([request_line(i) for i in range(4)], fake_scenario=scenario)
    _walk(clock, batch_id, [(5, "validating"), (200, status)])


def test_a_cancelled_batch_reads_the_same_while_cancelling_and_after(stepped, clock):
    batch_id = _create([request_line(i) for i in range(9)], fake_scenario="stall")
    _walk(clock, batch_id, [(30, "in_progress")])
    OpenAIBatchHook().cancel_batch(batch_id)
    *_, cancelled = _walk(clock, batch_id, [(1, "cancelling"), (20, "cancelled")])
    assert cancelled["request_counts"]["completed"] == 3


def test_a_compatible_servers_quirks_read_the_same(azure_like, clock):
    batch_id = _create([request_line(i) for i in range(4)])
    validating, *_, completed = _walk(clock, batch_id, [(1, "validating"), (60, "in_progress"), (100, "completed")])
    assert validating["request_counts"] == {"total": 0, "completed": 0, "failed": 0}  # counts: null
    assert validating["output_file_id"] is None  # ""
    assert completed["error_file_id"] is not None  # an empty error file, still a file


# --- answers the fake server does not send: the lean reader agrees with the SDK's model or steps aside ----------

_BATCH = {
    "id": "batch_1",
    "object": "batch",
    "endpoint": "/v1/embeddings",
    "input_file_id": "file-1",
    "completion_window": "24h",
    "status": "completed",
    "created_at": 1_700_000_000,
}


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"usage": {"input_tokens": 3}}, id="usage-partial"),
        pytest.param(
            {"usage": {"input_tokens": 3, "input_tokens_details": {}, "batch_discount": 0.5}}, id="usage-extra"
        ),
        pytest.param({"usage": {"input_tokens": 3, "output_tokens_details": None}}, id="usage-null-details"),
        pytest.param({"errors": {"object": "list", "data": [{"message": "m"}, {"type": "t", "line": 3}]}}, id="errors"),
        pytest.param({"errors": {"object": "list"}}, id="errors-without-data"),
        pytest.param({"request_counts": {"total": 5}}, id="counts-partial"),
        pytest.param({"request_counts": {"total": 5, "completed": None}}, id="counts-null"),
        pytest.param({"output_file_id": "", "error_file_id": None, "model": "gpt-4o-mini"}, id="ids"),
        pytest.param({"status": "paused"}, id="unknown-status"),
    ],
)
def test_the_reader_agrees_with_the_sdk_model(fields):
    from openai._models import construct_type  # what the SDK itself builds an answer with (non-strict)
    from openai.types import Batch

    body = json.dumps({**_BATCH, **fields}).encode()
    lean = summarize_json(body)
    assert lean is not None
    assert lean == summarize(construct_type(type_=Batch, value=json.loads(body)))


@pytest.mark.parametrize(
    "body",
    [
        b"<html>Bad gateway</html>",
        json.dumps({**_BATCH, "status": None}).encode(),
        json.dumps({**_BATCH, "request_counts": {"total": "5"}}).encode(),
        json.dumps({**_BATCH, "usage": "n/a"}).encode(),
        json.dumps({**_BATCH, "errors": {"data": "none"}}).encode(),
    ],
)
def test_the_reader_steps_aside_for_answers_of_another_shape(body):
    assert summarize_json(body) is None  # the hook then reads the answer with the SDK's model, as before


# --- errors: the same through the lean poll as through any other call --------------------------------------------


def _trigger_event(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    return asyncio.run(first())


@pytest.fixture
def batch_id(hook) -> str:
    return hook.create_batch(hook.upload_file(jsonl([request_line(0)])).id, "/v1/chat/completions").id


@pytest.mark.parametrize("kind", ["429", "500", "503", "drop", "truncate"])
def test_transient_failures_are_retried_by_the_sdk(kind, batch_id, conn_id, server):
    server.faults.script("batches.retrieve", Fault(kind, retry_after=0.01), Fault(kind, retry_after=0.01))
    summary = asyncio.run(OpenAIBatchHook(conn_id).aget_batch_summary(batch_id))
    assert summary["batch_id"] == batch_id
    assert server.count("batches.retrieve") == 3  # two failures, then the SDK's third try


def test_not_found_is_an_api_error_without_retries(conn_id, server):
    with pytest.raises(OpenAIBatchAPIError) as raised:
        asyncio.run(OpenAIBatchHook(conn_id).aget_batch_summary("batch_missing"))
    assert raised.value.http_status == 404 and not raised.value.retryable
    assert "No such Batch object: batch_missing" in str(raised.value)
    assert server.count("batches.retrieve") == 1


def test_a_rotated_key_is_read_again_after_a_401(batch_id, server, monkeypatch):
    """A triggerer keeps one client per connection; after a 401 the next wait reads the fixed connection."""
    monkeypatch.setenv("AIRFLOW_CONN_ROTATING", connection_env(server).replace(server.api_key, "sk-revoked"))

    async def two_waits() -> tuple[dict[str, Any], dict[str, Any]]:
        def wait() -> OpenAIBatchTrigger:
            return OpenAIBatchTrigger(batch_id, "rotating", 0.05, time.time() + 30, jitter_first_poll=False)

        async def first_event(trigger: OpenAIBatchTrigger) -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise AssertionError("no event")

        before = await first_event(wait())
        monkeypatch.setenv("AIRFLOW_CONN_ROTATING", connection_env(server))  # the user fixes the connection
        return before, await first_event(wait())

    before, after = asyncio.run(two_waits())  # one loop: the same triggerer process
    assert before["status"] == "error" and "HTTP 401" in before["message"]
    assert after["status"] == "terminal" and after["summary"]["status"] == "completed"


def test_a_403_keeps_the_client(batch_id, conn_id, server):
    """Only a 401 means the key may have changed; other errors keep the shared client (and its connections)."""

    async def clients() -> tuple[object, object]:
        hook = OpenAIBatchHook(conn_id)
        first = await hook.get_async_conn()
        server.faults.script("batches.retrieve", "403")
        with pytest.raises(OpenAIBatchAPIError, match="HTTP 403"):
            await hook.aget_batch_summary(batch_id)
        return first, await hook.get_async_conn()

    first, second = asyncio.run(clients())
    assert first is second


def test_the_trigger_event_carries_the_sdk_models_summary(batch_id, conn_id, hook):
    event = _trigger_event(OpenAIBatchTrigger(batch_id, conn_id, 0.05, time.time() + 30))
    assert event["status"] == "terminal"
    assert event["summary"] == summarize(hook.get_batch(batch_id))
