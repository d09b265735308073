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
from airflow_provider_openai_batch.testing.server import redacted_header
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


async def _poll_both_ways(hook: OpenAIBatchHook, batch_id: str) -> BatchSummary:
    """The poll's summary, checked against the SDK model's (async, and sync with strict validation of the shape)."""
    lean = await hook.aget_batch_summary(batch_id)
    full = summarize(await hook.aget_batch(batch_id))
    strict = summarize(OpenAIBatchHook(strict_response_validation=True).get_batch(batch_id))
    assert lean == full == strict
    assert set(lean) == SUMMARY_KEYS
    return lean


def _walk(clock: FakeClock, batch_id: str, steps: list[tuple[float, str]]) -> list[BatchSummary]:
    """
    Poll as a trigger does: one hook on one loop, so every read after the first sends again the request the SDK
    sent for the first (``hooks.poll_request``); each read is checked against the SDK's full model.
    """

    async def walk() -> list[BatchSummary]:
        hook = OpenAIBatchHook()
        seen = [await _poll_both_ways(hook, batch_id)]
        assert batch_id in hook._repeated_polls  # the reads below really are repeats
        for seconds, status in steps:
            clock.advance(seconds)
            summary = await _poll_both_ways(hook, batch_id)
            assert summary["status"] == status
            seen.append(summary)
        return seen[1:]

    return asyncio.run(walk())


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


# --- a poll sent again as the SDK sent it (hooks/poll_request.py): the same request, the same errors --------------


async def _reads(hook: OpenAIBatchHook, batch_id: str, n: int) -> list[BatchSummary]:
    return [await hook.aget_batch_summary(batch_id) for _ in range(n)]


def test_every_poll_carries_the_key_organization_project_and_custom_headers(batch_id, server, monkeypatch):
    extra = {"organization": "org-etl", "project": "proj-nightly", "default_headers": {"X-Team": "data-platform"}}
    monkeypatch.setenv("AIRFLOW_CONN_TEAM", connection_env(server, **extra))
    server.reset_counters()
    asyncio.run(_reads(OpenAIBatchHook("team"), batch_id, 4))
    seen = list(server.headers_seen["batches.retrieve"])
    assert len(seen) == 4  # one request a poll, no more
    for headers in seen:
        assert headers["authorization"] == redacted_header(f"Bearer {server.api_key}")  # kept redacted
        assert headers["openai-organization"] == "org-etl" and headers["openai-project"] == "proj-nightly"
        assert headers["x-team"] == redacted_header("data-platform")
        assert headers["user-agent"].startswith("AsyncOpenAI/")
    assert seen[1:] == seen[:1] * 3  # the repeats send what the SDK sent for the first


@pytest.mark.parametrize("kind", ["429", "500", "503", "drop", "truncate"])
def test_a_transient_failure_of_a_repeated_poll_is_retried_by_the_sdk(kind, batch_id, conn_id, server):
    async def polls() -> list[BatchSummary]:
        hook = OpenAIBatchHook(conn_id)
        first = await _reads(hook, batch_id, 2)
        server.faults.script("batches.retrieve", Fault(kind, retry_after=0.01))
        return first + await _reads(hook, batch_id, 3)

    server.reset_counters()
    summaries = asyncio.run(polls())
    assert all(summary["batch_id"] == batch_id for summary in summaries)
    # 5 polls, 6 requests: the repeat that failed, then the SDK's read right after it; that read is kept, so the
    # polls after it are repeats again.
    assert server.count("batches.retrieve") == 6


@pytest.mark.parametrize(("status", "retried"), [("403", False), ("404", False), ("500", True)])
def test_an_error_on_a_repeated_poll_is_the_sdks_error(status, retried, batch_id, conn_id, server):
    async def polls() -> list[OpenAIBatchAPIError]:
        hook = OpenAIBatchHook(conn_id)
        await _reads(hook, batch_id, 2)
        server.faults.script("batches.retrieve", *[status] * 20)
        errors = []
        for _ in range(2):  # the error lasts: two polls in a row fail
            with pytest.raises(OpenAIBatchAPIError) as raised:
                await hook.aget_batch_summary(batch_id)
            errors.append(raised.value)
        return errors

    server.reset_counters()
    errors = asyncio.run(polls())
    assert all(error.http_status == int(status) and error.retryable is retried for error in errors)
    tries = 1 + OpenAIBatchHook(conn_id).get_conn().max_retries if retried else 1
    # Two good polls; the failing repeat and the SDK's tries; then the SDK's tries alone: one extra request, once.
    assert server.count("batches.retrieve") == 2 + (1 + tries) + tries


def test_a_key_revoked_between_polls_is_a_401_and_the_fixed_connection_is_read_again(batch_id, server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_ROTATING", connection_env(server))

    async def polls() -> tuple[OpenAIBatchAPIError, BatchSummary, bool]:
        hook = OpenAIBatchHook("rotating")
        await _reads(hook, batch_id, 2)
        first_client = await hook.get_async_conn()
        server.api_key = "sk-rotated"  # the old key is revoked at OpenAI
        with pytest.raises(OpenAIBatchAPIError) as raised:
            await hook.aget_batch_summary(batch_id)
        monkeypatch.setenv("AIRFLOW_CONN_ROTATING", connection_env(server))  # the user puts in the new key
        after = await hook.aget_batch_summary(batch_id)
        return raised.value, after, first_client is await hook.get_async_conn()

    error, after, same_client = asyncio.run(polls())
    assert error.http_status == 401 and "HTTP 401" in str(error) and "sk-rotated" not in str(error)
    assert after["batch_id"] == batch_id and not same_client


def test_a_poll_the_sdk_had_to_retry_is_not_repeated_as_a_retry(batch_id, conn_id, server):
    server.faults.script("batches.retrieve", Fault("500"))
    server.reset_counters()
    asyncio.run(_reads(OpenAIBatchHook(conn_id), batch_id, 3))
    retry_counts = [headers["x-stainless-retry-count"] for headers in server.headers_seen["batches.retrieve"]]
    # The first poll: a 500, then the SDK's retry; the second goes through the SDK again and is the one repeated.
    assert retry_counts == ["0", "1", "0", "0"]
