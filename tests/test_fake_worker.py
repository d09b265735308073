"""
The fake's worker: a create answers before its input is read, a batch's answers are written while it runs, and
neither changes what any read answers (statuses, counts, errors, result files) or when.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Timings
from airflow_provider_openai_batch.testing import state as state_module
from airflow_provider_openai_batch.testing.input_rules import check_input
from airflow_provider_openai_batch.testing.state import FakeState, StoredBatch
from tests.conftest import jsonl, request_line

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
TIMINGS = Timings()
#: A start between two seconds, so an answer's ``created`` is the floor of a fractional finalized moment.
START = 1_000_000.5
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "label",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["a", "b"]}, "score": {"type": "number"}},
            "required": ["label", "score"],
            "additionalProperties": False,
        },
    },
}


def mixed_chat_rows() -> list[dict[str, Any]]:
    """Plain requests, requests that always fail, transient failures, and structured outputs with shares of fates."""
    fates = {"invalid": 0.2, "refused": 0.2, "truncated": 0.2}
    rows = []
    for i in range(60):
        body: dict[str, Any] = {}
        if i % 10 == 3:
            body["fake_error"] = {"status_code": 400, "code": "invalid_request", "message": "no"}
        elif i % 10 == 5:
            body["fake_error"] = {"status_code": 500, "code": "server_error", "times": 1}
        elif i % 3 == 0:
            body.update(response_format=SCHEMA, fake_output=fates)
        rows.append(request_line(i, **body))
    return rows


def embedding_rows() -> list[dict[str, Any]]:
    return [request_line(i, url=EMBEDDINGS, model="text-embedding-3-small") for i in range(40)]


def upload(state: FakeState, content: bytes) -> str:
    return state.add_file("in.jsonl", "batch", lambda out: out.write(content)).id


def json_of(state: FakeState, batch: StoredBatch) -> dict[str, Any]:
    """A batch as the API shows it, less what differs between two servers (ids)."""
    shown = state.batch_json(batch)
    return {key: value for key, value in shown.items() if not key.endswith("id")}


def file_bytes(state: FakeState, file_id: str | None) -> bytes | None:
    return None if file_id is None else state.files[file_id].path.read_bytes()


def run_to_the_end(state: FakeState, clock: FakeClock, content: bytes, endpoint: str, wait_ahead: bool) -> StoredBatch:
    """Create a batch, let it validate and run on the clock, and read it once it has ended."""
    batch = state.create_batch(upload(state, content), endpoint, "24h", None)
    clock.advance(TIMINGS.validating)
    assert state.batch_json(batch)["status"] == "in_progress"  # decided: admitted to its queue, or not queued
    if wait_ahead:
        assert batch.written is not None
        batch.written.result()  # written ahead while it ran
    else:
        assert batch.written is None
    clock.advance(TIMINGS.in_progress + TIMINGS.finalizing)
    return batch


@pytest.fixture
def computed_inline(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many answers have been computed one by one so far: at a batch's end, not written ahead in a batch."""
    calls = 0
    answer = state_module._answer

    def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return answer(*args)

    monkeypatch.setattr(state_module, "_answer", counting)
    return lambda: calls


@pytest.mark.parametrize("quirks", [False, True], ids=["openai", "compatible-quirks"])
@pytest.mark.parametrize("queue_limits", [None, {}], ids=["no-account", "queued"])
def test_answers_written_ahead_are_byte_for_byte_those_written_at_the_end(queue_limits, quirks, computed_inline):
    chat, embeddings = jsonl(mixed_chat_rows()), jsonl(embedding_rows())
    clocks = FakeClock(START), FakeClock(START)
    ahead, at_end = (
        FakeState(clock=clock, timings=TIMINGS, queue_limits=queue_limits, compatible_quirks=quirks) for clock in clocks
    )
    at_end._answers_due = lambda batch: False  # type: ignore[method-assign]  # never written ahead: all at the end
    try:
        # The chat file twice: its transient failures fail the first time and succeed the second.
        for content, endpoint in ((chat, CHAT), (chat, CHAT), (embeddings, EMBEDDINGS)):
            expected = run_to_the_end(at_end, clocks[1], content, endpoint, wait_ahead=False)
            got = run_to_the_end(ahead, clocks[0], content, endpoint, wait_ahead=True)
            transient_retried = content == chat and got.seq == 2
            before = computed_inline()
            shown = json_of(ahead, got)
            # Only the transient failures that succeed this time are answered at the end.
            assert computed_inline() - before == (6 if transient_retried else 0)
            assert shown == json_of(at_end, expected)
            assert shown["status"] == "completed"
            assert file_bytes(ahead, got.output_file_id) == file_bytes(at_end, expected.output_file_id)
            assert file_bytes(ahead, got.error_file_id) == file_bytes(at_end, expected.error_file_id)
            assert got.written is None  # freed once used
        assert ahead.failures == at_end.failures
    finally:
        ahead.close()
        at_end.close()


def test_answers_written_for_another_ending_are_not_used(computed_inline):
    """A batch cancelled or finished at another moment than planned has its answers computed at its end."""
    clock = FakeClock(START)
    state = FakeState(clock=clock, timings=TIMINGS)
    try:
        batch = state.create_batch(upload(state, jsonl(mixed_chat_rows())), CHAT, "24h", None)
        clock.advance(TIMINGS.validating + TIMINGS.in_progress / 2)
        assert state.batch_json(batch)["status"] == "in_progress"
        cancelled = state.cancel(batch.id)
        assert cancelled.written is None  # dropped at the cancel
        clock.advance(TIMINGS.cancelling)
        before = computed_inline()
        assert state.batch_json(batch)["status"] == "cancelled"
        assert computed_inline() - before == state.batch_json(batch)["request_counts"]["completed"] > 0
    finally:
        state.close()


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The worker's validation waits for ``release``; ``started`` tells it began. Released at the end whatever."""
    started, release = threading.Event(), threading.Event()

    def check(source: Any, endpoint: str) -> Any:
        started.set()
        release.wait(30)
        return check_input(source, endpoint)

    monkeypatch.setattr(state_module, "check_input", check)
    yield started, release
    release.set()


def test_a_create_answers_before_its_input_is_validated(gated):
    started, release = gated
    rows = [request_line(i, url=EMBEDDINGS, model="text-embedding-3-small") for i in range(5_000)]
    clock = FakeClock(START)
    with FakeOpenAIServer(clock=clock, timings=TIMINGS) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key=srv.api_key, max_retries=0)
        uploaded = client.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
        created = client.batches.create(input_file_id=uploaded.id, endpoint=EMBEDDINGS, completion_window="24h")
        assert started.wait(30)  # the worker is at it, and held there
        assert not srv.state.batches[created.id].validation.done()
        assert created.status == "validating"
        # What the batch shows while it validates comes from a glance at the file, not from the validation.
        assert created.request_counts is not None and created.request_counts.total == 5_000
        assert created.model == "text-embedding-3-small" and created.errors is None
        listed = client.batches.list()  # a listing answers while the validation is held
        assert [(batch.id, batch.status) for batch in listed] == [(created.id, "validating")]
        assert client.batches.retrieve(created.id).status == "validating"
        release.set()
        clock.advance(TIMINGS.validating + TIMINGS.in_progress + TIMINGS.finalizing)
        done = client.batches.retrieve(created.id)
        assert done.status == "completed"
        assert done.request_counts is not None and done.request_counts.completed == 5_000


@pytest.mark.parametrize("queue_limits", [None, {}], ids=["no-account", "queued"])
def test_an_invalid_input_fails_with_the_same_errors_once_validated(tmp_path: Path, queue_limits):
    rows = [
        request_line(0),
        {"custom_id": "x", "method": "GET", "url": CHAT, "body": {}},
        request_line(0),  # a duplicate custom_id
        request_line(3, model="gpt-4o"),  # a second model
    ]
    content = jsonl(rows) + b"\n" + b"not json\n"
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    expected = check_input(path, CHAT).errors
    assert len(expected) >= 5
    clock = FakeClock(START)
    state = FakeState(clock=clock, timings=TIMINGS, queue_limits=queue_limits)
    try:
        batch = state.create_batch(upload(state, content), CHAT, "24h", None)
        validating = state.batch_json(batch)
        assert (validating["status"], validating["errors"], validating["model"]) == ("validating", None, "gpt-4o-mini")
        assert validating["request_counts"] == {"total": 6, "completed": 0, "failed": 0}  # the file's lines
        clock.advance(TIMINGS.validating)
        failed = state.batch_json(batch)
        assert failed["status"] == "failed"
        assert failed["errors"] == {"object": "list", "data": expected}
        assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert failed["in_progress_at"] is None and failed["usage"] is None
        assert batch.queue == "none" and batch.written is None and not state.queue_refusals
    finally:
        state.close()


def test_no_answers_are_written_for_batches_the_queue_refuses(monkeypatch: pytest.MonkeyPatch):
    written: list[int] = []
    answers = state_module._answers

    def counting(endpoint: str, requests: Any, created: int, quirks: bool) -> Any:
        requests = list(requests)
        written.append(len(requests))
        return answers(endpoint, requests, created, quirks)

    monkeypatch.setattr(state_module, "_answers", counting)
    clock = FakeClock(START)
    rows = embedding_rows()
    state = FakeState(clock=clock, timings=TIMINGS, request_queue_limits={"text-embedding-3-small": len(rows)})
    try:
        batches = [state.create_batch(upload(state, jsonl(rows)), EMBEDDINGS, "24h", None) for _ in range(3)]
        clock.advance(TIMINGS.validating)
        assert [state.batch_json(batch)["status"] for batch in batches] == ["in_progress", "failed", "failed"]
        assert [batch.written is not None for batch in batches] == [True, False, False]
        batches[0].written.result(timeout=60)  # type: ignore[union-attr]  # written ahead (the worker ran meanwhile)
        clock.advance(TIMINGS.in_progress + TIMINGS.finalizing)
        assert state.batch_json(batches[0])["status"] == "completed"
        assert written == [len(rows)]  # the admitted batch's answers only, once
        assert batches[0].written is None
    finally:
        state.close()


def test_closing_the_state_stops_its_worker():
    clock = FakeClock(START)
    state = FakeState(clock=clock, timings=TIMINGS)
    batch = state.create_batch(upload(state, jsonl(mixed_chat_rows())), CHAT, "24h", None)
    threads = list(state._worker._threads)
    assert threads
    state.close()
    assert not any(thread.is_alive() for thread in threads)
    assert len(batch.requests) == 60  # validated before the worker stopped: the batch stays readable
