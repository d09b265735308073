"""FakeOpenAIServer speaks OpenAI: its answers parse into the SDK's own types with strict validation on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import openai
import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from openai.types.create_embedding_response import CreateEmbeddingResponse
from openai.types.images_response import ImagesResponse
from openai.types.moderation_create_response import ModerationCreateResponse
from openai.types.responses import Response
from openai.types.video import Video

from airflow_provider_openai_batch.endpoints import batch_endpoints
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Timings
from tests.conftest import jsonl, request_line

BODY_TYPES = {
    "/v1/chat/completions": ChatCompletion,
    "/v1/responses": Response,
    "/v1/embeddings": CreateEmbeddingResponse,
    "/v1/completions": Completion,
    "/v1/moderations": ModerationCreateResponse,
    "/v1/images/generations": ImagesResponse,
    "/v1/images/edits": ImagesResponse,
    "/v1/videos": Video,
}


def test_every_endpoint_the_sdk_lists_has_an_answer_shape():
    assert set(batch_endpoints()) == set(BODY_TYPES)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock):
    with FakeOpenAIServer(clock=clock, timings=Timings()) as srv:
        yield srv


@pytest.fixture
def client(fake: FakeOpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, _strict_response_validation=True, max_retries=0)


def _run(client: openai.OpenAI, clock: FakeClock, rows: list[dict], endpoint: str, **kwargs) -> Batch:
    uploaded = client.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **kwargs)
    clock.advance(3600)
    return client.batches.retrieve(batch.id)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.mark.parametrize("endpoint", sorted(BODY_TYPES))
def test_each_endpoint_answers_in_openai_shapes(client, clock, endpoint):
    rows = [request_line(i, url=endpoint) for i in range(6)]
    if "/images/" in endpoint or endpoint == "/v1/videos":
        for i, row in enumerate(rows):
            row["body"] = {"model": row["body"]["model"], "prompt": f"a picture {i}"}
            if endpoint == "/v1/images/edits":
                row["body"]["image"] = {"file_id": "file-abc"}
    batch = _run(client, clock, rows, endpoint)
    assert isinstance(batch, Batch)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        6,
        6,
        0,
    )
    lines = _lines(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(r["custom_id"] for r in rows)
    for line in lines:
        assert line["response"]["status_code"] == 200
        BODY_TYPES[endpoint].model_validate(line["response"]["body"], strict=False)
    assert batch.usage is not None
    if endpoint not in ("/v1/moderations", "/v1/videos"):
        assert batch.usage.input_tokens > 0


def test_answers_are_deterministic_and_out_of_input_order(client, clock):
    rows = [request_line(i) for i in range(30)]
    first = _lines(client, _run(client, clock, rows, "/v1/chat/completions").output_file_id)
    second = _lines(client, _run(client, clock, rows, "/v1/chat/completions").output_file_id)
    assert [line["response"]["body"]["choices"] for line in first] == [
        line["response"]["body"]["choices"] for line in second
    ]
    assert [line["custom_id"] for line in first] != [r["custom_id"] for r in rows]


def test_status_machine_follows_the_clock(client, clock, fake):
    uploaded = client.files.create(file=("in.jsonl", jsonl([request_line(i) for i in range(4)])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    seen = [batch.status]
    for _ in range(12):
        clock.advance(0.1)
        seen.append(client.batches.retrieve(batch.id).status)
    assert seen[0] == "validating"
    assert "in_progress" in seen and "finalizing" in seen
    assert seen[-1] == "completed"
    assert seen.index("in_progress") < seen.index("finalizing") < seen.index("completed")


def test_a_request_timeout_is_an_error_line_counted_as_failed(client, clock):
    rows = [request_line(i, **({"fake_error": {"error_code": "request_timeout"}} if i == 1 else {})) for i in range(3)]
    batch = _run(client, clock, rows, "/v1/chat/completions")
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    (line,) = _lines(client, batch.error_file_id)
    assert line["custom_id"] == "req-1" and line["response"] is None
    assert line["error"]["code"] == "request_timeout"


def test_a_batch_where_every_request_failed_has_no_output_file(client, clock):
    rows = [request_line(i, fake_error={"status_code": 400}) for i in range(3)]
    batch = _run(client, clock, rows, "/v1/chat/completions")
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert len(_lines(client, batch.error_file_id)) == 3
    assert batch.request_counts is not None and batch.request_counts.failed == 3


def test_embeddings_batches_hold_at_most_50000_inputs(client, clock):
    rows = [request_line(i, url="/v1/embeddings", input=[f"t{i}-{k}" for k in range(10)]) for i in range(5_001)]
    batch = _run(client, clock, rows, "/v1/embeddings")
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "too_many_embedding_inputs"
    # A token array is one input: 5,001 requests of one token array each are fine.
    tokens = [request_line(i, url="/v1/embeddings", input=[1, 2, 3]) for i in range(5_001)]
    assert _run(client, clock, tokens, "/v1/embeddings").status == "completed"


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {"input": "x"}}\r\n', "completed"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {"input": "x"}}', "completed"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {"input": "x"}}\n\n', "failed"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {}}\n', "failed"),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {"input": "x", "model": "m1"}}\n'
            b'{"custom_id": "b", "method": "POST", "url": "/v1/moderations", "body": {"input": "x", "model": "m2"}}\n',
            "failed",
        ),
        (b"", "failed"),
    ],
    ids=["crlf", "no-final-newline", "trailing-empty-line", "missing-required-input", "two-models", "empty-file"],
)
def test_input_line_rules(client, clock, content, status):
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations", completion_window="24h")
    clock.advance(3600)
    assert client.batches.retrieve(batch.id).status == status


@pytest.mark.parametrize(("seconds", "ok"), [(3_599, False), (3_600, True), (2_592_000, True), (2_592_001, False)])
def test_expiry_bounds(client, seconds, ok):
    expires = {"anchor": "created_at", "seconds": seconds}
    try:
        uploaded = client.files.create(
            file=("in.jsonl", jsonl([request_line(0)])), purpose="batch", expires_after=expires
        )
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after=expires,
        )
    except openai.BadRequestError as error:
        assert not ok, error
    else:
        assert ok


def test_lists_paginate_as_the_sdk_expects(client):
    made = [client.files.create(file=(f"f{i}.jsonl", jsonl([request_line(i)])), purpose="batch").id for i in range(5)]
    page = client.files.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    assert [f.id for f in client.files.list(limit=2)] == made[::-1]  # all pages, newest first
    batches = [
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for file_id in made
    ]
    first = client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    assert [b.id for b in client.batches.list(limit=2)] == batches[::-1]


def test_a_compressing_proxy_sends_gzip_with_the_compressed_length(clock):
    with FakeOpenAIServer(clock=clock, compress_content=True) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        content = jsonl([request_line(i) for i in range(200)])
        uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
        with client.files.with_streaming_response.content(uploaded.id) as response:
            assert response.headers["content-encoding"] == "gzip"
            assert int(response.headers["content-length"]) < len(content)
            assert b"".join(response.iter_bytes()) == content


def test_compatible_quirks(clock):
    with FakeOpenAIServer(clock=clock, compatible_quirks=True) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        batch = _run(
            client, clock, [request_line(0), request_line(1, fake_error={"status_code": 429})], "/v1/chat/completions"
        )
        (ok,) = _lines(client, batch.output_file_id)
        assert isinstance(ok["response"]["body"], str)
        (failed,) = _lines(client, batch.error_file_id)
        assert "code" not in failed["response"]["body"]["error"] and failed["response"]["body"]["error"]["type"]
        clean = _run(client, clock, [request_line(0)], "/v1/chat/completions")
        assert clean.error_file_id and client.files.retrieve(clean.error_file_id).bytes == 0


def test_marked_requests_go_to_the_error_file(client, clock):
    rows = [
        request_line(i, **({"fake_error": {"status_code": 400, "code": "bad"}} if i in (2, 5) else {}))
        for i in range(8)
    ]
    batch = _run(client, clock, rows, "/v1/chat/completions")
    assert batch.request_counts is not None and batch.request_counts.failed == 2
    errors = _lines(client, batch.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == ["req-2", "req-5"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "bad"


def test_invalid_input_fails_the_batch_with_line_errors(client, clock):
    rows = [request_line(0), {"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}]
    batch = _run(client, clock, rows, "/v1/chat/completions")
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    by_param = {(e.line, e.param) for e in batch.errors.data}
    assert (2, "method") in by_param and (2, "body.model") in by_param


def test_expiry_keeps_partial_results(client, clock):
    rows = [request_line(i) for i in range(10)]
    batch = _run(client, clock, rows, "/v1/chat/completions", metadata={"fake_scenario": "expire"})
    assert batch.status == "expired"
    assert batch.request_counts is not None
    # Requests that never ran are in the error file but not counted as failed (as OpenAI reports them).
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 5, 0)
    assert len(_lines(client, batch.output_file_id)) == 5
    expired = _lines(client, batch.error_file_id)
    assert {e["error"]["code"] for e in expired} == {"batch_expired"}


def test_cancel_walks_through_cancelling(client, clock):
    uploaded = client.files.create(file=("in.jsonl", jsonl([request_line(i) for i in range(10)])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    clock.advance(0.2 + 0.3)  # half processed
    assert client.batches.cancel(batch.id).status == "cancelling"
    clock.advance(1)
    done = client.batches.retrieve(batch.id)
    assert done.status == "cancelled"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)
    assert len(_lines(client, done.output_file_id)) == 5
    assert {e["error"]["code"] for e in _lines(client, done.error_file_id)} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(_run(client, clock, [request_line(0)], "/v1/chat/completions").id)


def test_bearer_key_is_checked(fake):
    bad = openai.OpenAI(base_url=fake.base_url, api_key="sk-other", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.batches.list()
    assert fake.count("batches.list") == 1


def test_metadata_limits(client):
    uploaded = client.files.create(file=("in.jsonl", jsonl([request_line(0)])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="at most 16"):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )


def test_faults_by_script_and_by_probability(fake):
    client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
    fake.faults.script("batches.list", "429")
    with pytest.raises(openai.RateLimitError) as raised:
        client.batches.list()
    assert raised.value.response.headers["retry-after-ms"] == "50"
    fake.faults.script("batches.list", "drop")
    with pytest.raises(openai.APIConnectionError):
        client.batches.list()
    fake.faults.chaos(0.5, kinds=("500",), seed=1)
    outcomes = []
    for _ in range(40):
        try:
            client.batches.list()
            outcomes.append("ok")
        except openai.InternalServerError:
            outcomes.append("500")
    assert 8 < outcomes.count("500") < 32


def test_slow_fault_trips_the_client_timeout(fake):
    client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0, timeout=0.3)
    fake.faults.script("batches.list", "slow")
    with pytest.raises(openai.APITimeoutError):
        client.batches.list()


def test_runs_as_a_module():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_openai_batch.testing", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = ""
        while f":{port}/v1" not in banner:
            banner = proc.stdout.readline()
            assert banner, "the server exited before printing its address"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-fake-test-key")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert isinstance(client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch"), FileObject)
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)


def test_create_rejects_what_openai_rejects(client):
    uploaded = client.files.create(file=("in.jsonl", jsonl([request_line(0)])), purpose="batch")
    for bad in (
        {"endpoint": "/v1/audio/speech"},  # not in BatchCreateParams.endpoint
        {"completion_window": "48h"},  # "Currently only 24h is supported"
        {"output_expires_after": {"anchor": "last_active_at", "seconds": 3600}},  # anchor: created_at only
    ):
        params = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **bad}
        with pytest.raises(openai.BadRequestError):
            client.batches.create(**params)  # type: ignore[arg-type]
    other = client.files.create(file=("x.jsonl", b"{}\n"), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")


def test_batch_input_files_hold_at_most_200_mb(client, monkeypatch):
    from airflow_provider_openai_batch.testing import server as server_module

    monkeypatch.setattr(server_module, "MAX_BATCH_FILE_BYTES", 1_000)  # the rule, at a size a test can send
    with pytest.raises(openai.BadRequestError, match="too large"):
        client.files.create(file=("in.jsonl", jsonl([request_line(i) for i in range(50)])), purpose="batch")
    assert client.files.create(file=("in.jsonl", jsonl([request_line(0)])), purpose="batch").bytes < 1_000


def test_a_listing_can_lag_a_create():
    """The documented knob (CONTRACT.md L13): a new batch is listed only ``list_lag`` seconds after its create."""
    with FakeOpenAIServer(timings=Timings(), list_lag=1.0) as srv:
        client = openai.OpenAI(api_key=srv.api_key, base_url=srv.base_url, max_retries=0)
        file_id = client.files.create(file=("a.jsonl", jsonl([request_line(0)])), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.id not in [b.id for b in client.batches.list()]
        assert client.batches.retrieve(batch.id).id == batch.id  # retrieving it by id is not delayed
        deadline = time.monotonic() + 30
        while batch.id not in [b.id for b in client.batches.list()]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
