"""The fake's account: each model's enqueued-token queue, refused as OpenAI (or Azure) refuses, through the real SDK."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types import Batch

from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, QueueRefusal, Timings, tokens
from tests.conftest import jsonl, request_line

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


def openai_message(model: str, limit: str, unit: str = "tokens") -> str:
    kind = "token" if unit == "tokens" else "request"
    return (
        f"Enqueued {kind} limit reached for {model} in organization org-fake. Limit: {limit} enqueued {unit}. "
        "Please try again once some in_progress batches have been completed."
    )


def rows(count: int, *, start: int = 0, url: str = CHAT, model: str = MODEL, **body: object) -> list[dict]:
    return [request_line(i, url=url, model=model, **body) for i in range(start, start + count)]


def tokens_of_rows(rows_: list[dict], url: str = CHAT) -> int:
    return tokens.batch_tokens(url, [row["body"] for row in rows_])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _client(srv: FakeOpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=srv.api_key, _strict_response_validation=True, max_retries=0)


@pytest.fixture
def account(clock: FakeClock) -> Iterator[tuple[FakeOpenAIServer, openai.OpenAI]]:
    """A server whose gpt-4o-mini queue holds what two of ``rows(10)``'s batches need, less one token."""
    limit = 2 * tokens_of_rows(rows(10)) - 1
    with FakeOpenAIServer(clock=clock, timings=Timings(), queue_limits={MODEL: limit}) as srv:
        yield srv, _client(srv)


def submit(client: openai.OpenAI, rows_: list[dict], url: str = CHAT) -> Batch:
    uploaded = client.files.create(file=("in.jsonl", jsonl(rows_)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=url, completion_window="24h")  # type: ignore[arg-type]


def assert_refused_unbilled(batch: Batch, message: str) -> None:
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [error.model_dump() for error in batch.errors.data] == [
        {"code": "token_limit_exceeded", "line": None, "message": message, "param": None}
    ]
    # Failed before any request ran: nothing to download, nothing charged.
    assert batch.in_progress_at is None and batch.failed_at is not None
    assert (batch.output_file_id, batch.error_file_id, batch.usage) == (None, None, None)
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}


def test_a_batch_over_the_limit_fails_at_the_end_of_validation(clock):
    big = rows(10, messages=[{"role": "user", "content": "word " * 300}])
    assert tokens_of_rows(big) > 2_000
    with FakeOpenAIServer(clock=clock, queue_limits={MODEL: 2_000}) as srv:
        client = _client(srv)
        created = submit(client, big)
        assert created.status == "validating" and created.errors is None  # create answers 200
        clock.advance(0.1)
        assert client.batches.retrieve(created.id).status == "validating"
        clock.advance(3600)
        batch = client.batches.retrieve(created.id)
        assert_refused_unbilled(batch, openai_message(MODEL, "2,000"))
        assert batch.failed_at is not None and 0 <= batch.failed_at - created.created_at <= 1  # as validation ended
        assert client.batches.list().data[0].status == "failed"  # the list parses strictly too
        assert srv.state.refusals() == 1 and srv.state.peak_enqueued(MODEL) == 0


def test_two_batches_that_fit_alone_but_not_together_the_second_fails(account, clock):
    _, client = account
    first, second = submit(client, rows(10)), submit(client, rows(10, start=10))
    clock.advance(3600)
    assert client.batches.retrieve(first.id).status == "completed"
    limit = 2 * tokens_of_rows(rows(10)) - 1
    assert_refused_unbilled(client.batches.retrieve(second.id), openai_message(MODEL, f"{limit:,}"))


def test_a_batch_is_admitted_once_an_earlier_one_ended(account, clock):
    srv, client = account
    first = submit(client, rows(10))
    clock.advance(0.3)  # the first is in progress: it holds its tokens
    assert client.batches.retrieve(first.id).status == "in_progress"
    assert srv.state.enqueued(MODEL) == tokens_of_rows(rows(10))
    refused = submit(client, rows(10, start=10))
    clock.advance(3600)
    assert client.batches.retrieve(first.id).status == "completed"
    assert client.batches.retrieve(refused.id).status == "failed"
    assert srv.state.enqueued(MODEL) == 0  # the first ended: its tokens are free again
    again = submit(client, rows(10, start=10))
    clock.advance(3600)
    assert client.batches.retrieve(again.id).status == "completed"


def test_cancelled_batches_free_their_tokens_once_cancelled(clock):
    limit = 2 * tokens_of_rows(rows(10)) - 1
    with FakeOpenAIServer(clock=clock, timings=Timings(cancelling=1.0), queue_limits={MODEL: limit}) as srv:
        client = _client(srv)
        srv.script_batches("stall")  # never ends by itself
        stalled = submit(client, rows(10))
        clock.advance(0.3)
        client.batches.cancel(stalled.id)
        while_cancelling = submit(client, rows(10, start=10))
        clock.advance(0.5)  # its validation ended while the other was still cancelling: that one still held
        assert client.batches.retrieve(stalled.id).status == "cancelling"
        assert client.batches.retrieve(while_cancelling.id).status == "failed"
        clock.advance(1.0)
        assert client.batches.retrieve(stalled.id).status == "cancelled"
        after = submit(client, rows(10, start=10))
        clock.advance(3600)
        assert client.batches.retrieve(after.id).status == "completed"
        assert srv.state.refusals(MODEL) == 1


def test_a_batch_cancelled_while_validating_never_holds_the_queue(account, clock):
    _, client = account
    cancelled = submit(client, rows(10))
    client.batches.cancel(cancelled.id)
    first, second = submit(client, rows(10, start=10)), submit(client, rows(10, start=20))
    clock.advance(3600)
    assert client.batches.retrieve(cancelled.id).status == "cancelled"
    assert [client.batches.retrieve(b.id).status for b in (first, second)] == ["completed", "failed"]


def test_an_embeddings_queue_limits_enqueued_requests(clock):
    url, model = "/v1/embeddings", "text-embedding-3-small"
    with FakeOpenAIServer(clock=clock, request_queue_limits={model: 5}) as srv:
        client = _client(srv)
        first = submit(client, rows(3, url=url, model=model), url)
        second = submit(client, rows(3, start=3, url=url, model=model), url)
        clock.advance(3600)
        assert client.batches.retrieve(first.id).status == "completed"
        assert_refused_unbilled(client.batches.retrieve(second.id), openai_message(model, "5", "requests"))
        assert srv.state.peak_enqueued_requests(model) == 3
        assert srv.state.queue_refusals[0].unit == "requests"


def test_azure_refuses_at_create_with_a_400(clock):
    limit = 2 * tokens_of_rows(rows(10)) - 1
    with FakeOpenAIServer(clock=clock, azure_quirks=True, queue_limits={MODEL: limit}) as srv:
        client = openai.AzureOpenAI(
            azure_endpoint=srv.azure_endpoint,
            api_key=srv.api_key,
            api_version="2024-10-21",
            _strict_response_validation=True,
            max_retries=0,
        )
        first = submit(client, rows(10))
        assert first.status == "validating"
        # The first is still validating, and already holds its tokens: Azure counts every enqueued job.
        with pytest.raises(openai.BadRequestError) as refused:
            submit(client, rows(10, start=10))
        assert refused.value.status_code == 400 and refused.value.code == "token_limit_exceeded"
        assert isinstance(refused.value.body, dict)
        assert f"configured limit of {limit} for the deployment '{MODEL}'" in refused.value.body["message"]
        assert srv.batches_created == 1
        assert srv.state.queue_refusals[0].batch_id is None
        clock.advance(3600)
        assert client.batches.retrieve(first.id).status == "completed"
        assert submit(client, rows(10, start=10)).status == "validating"  # room again once the first ended


def test_the_refusal_mode_is_chosen_apart_from_azure_quirks(clock):
    limit = 2 * tokens_of_rows(rows(10)) - 1
    with FakeOpenAIServer(clock=clock, queue_limits={MODEL: limit}, queue_refusal="at_create") as srv:
        client = _client(srv)
        submit(client, rows(10))
        with pytest.raises(openai.BadRequestError) as refused:
            submit(client, rows(10, start=10))
        assert refused.value.code == "token_limit_exceeded"
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["message"] == openai_message(MODEL, f"{limit:,}")
    with FakeOpenAIServer(
        clock=clock, azure_quirks=True, queue_limits={MODEL: limit}, queue_refusal="at_validation"
    ) as srv:
        client = _client(srv)
        submit(client, rows(10))
        second = submit(client, rows(10, start=10))  # accepted: the refusal comes as its validation ends
        clock.advance(3600)
        batch = client.batches.retrieve(second.id)
        assert batch.status == "failed" and batch.errors is not None and batch.errors.data
        assert batch.errors.data[0].code == "token_limit_exceeded"
        assert (batch.errors.data[0].message or "").startswith("The number of enqueued tokens has surpassed")


def test_admission_does_not_depend_on_the_order_batches_are_read(clock):
    """Each batch is judged against the queue at the moment its validation ended, however late it is read."""
    outcomes = []
    for reading in ("in order", "last first", "listed"):
        limit = 2 * tokens_of_rows(rows(10)) - 1
        with FakeOpenAIServer(clock=clock, queue_limits={MODEL: limit}) as srv:
            client = _client(srv)
            first = submit(client, rows(10))
            clock.advance(0.3)
            second = submit(client, rows(10, start=10))  # its validation ends while the first is in progress ...
            clock.advance(3600)  # ... but nothing reads either batch until both would have ended
            if reading == "listed":
                statuses = {b.id: b.status for b in client.batches.list().data}  # newest first
            else:
                order = [first, second] if reading == "in order" else [second, first]
                statuses = {b.id: client.batches.retrieve(b.id).status for b in order}
            outcomes.append([statuses[first.id], statuses[second.id]])
            assert srv.state.peak_enqueued(MODEL) == tokens_of_rows(rows(10))
    assert outcomes == [["completed", "failed"]] * 3


def test_peak_enqueued_and_refusals_are_instrumented(clock):
    one = tokens_of_rows(rows(10))
    with FakeOpenAIServer(clock=clock, queue_limits={MODEL: 3 * one}) as srv:
        client = _client(srv)
        batches = [submit(client, rows(10, start=10 * i)) for i in range(4)]
        assert srv.state.tokens_of(batches[0].id) == one
        clock.advance(0.3)
        assert srv.state.enqueued(MODEL) == 3 * one
        clock.advance(3600)
        assert [client.batches.retrieve(b.id).status for b in batches] == ["completed"] * 3 + ["failed"]
        assert srv.state.peak_enqueued(MODEL) == 3 * one
        assert srv.state.peak_enqueued_requests(MODEL) == 30
        assert srv.state.refusals() == 1 and srv.state.refusals("gpt-4o") == 0
        assert srv.state.queue_refusals == [
            QueueRefusal(
                model=MODEL,
                unit="tokens",
                asked=one,
                enqueued=3 * one,
                limit=3 * one,
                at=srv.state.batches[batches[3].id].created_at + Timings().validating,
                batch_id=batches[3].id,
                message=openai_message(MODEL, f"{3 * one:,}"),
            )
        ]
    # An empty mapping tracks the queue without limiting it.
    with FakeOpenAIServer(clock=clock, queue_limits={}) as srv:
        client = _client(srv)
        for i in range(4):
            submit(client, rows(10, start=10 * i))
        clock.advance(3600)
        assert srv.state.peak_enqueued(MODEL) == 4 * one and srv.state.refusals() == 0


def test_the_output_cap_counts_toward_the_queue(clock):
    plain, capped = rows(10), rows(10, start=10, max_tokens=500)
    assert tokens_of_rows(capped) == tokens_of_rows(rows(10, start=10)) + 10 * 500
    limit = tokens_of_rows(plain) + 10 * 500 - 1  # the capped batch alone fits only if its cap did not count
    for count_cap, expected in ((True, "failed"), (False, "completed")):
        with FakeOpenAIServer(clock=clock, queue_limits={MODEL: limit}, count_output_cap=count_cap) as srv:
            client = _client(srv)
            batch = submit(client, capped)
            clock.advance(3600)
            assert client.batches.retrieve(batch.id).status == expected


def test_token_counts_follow_openais_encodings(monkeypatch):
    assert tokens.tokenizer_name() == "bpe-openai"
    assert tokens.encoding_for("gpt-4o-mini") == tokens.encoding_for("gpt-5") == "o200k_base"
    assert tokens.encoding_for("gpt-4-turbo") == tokens.encoding_for("text-embedding-3-small") == "cl100k_base"
    assert tokens.count_text("hello world") == 2
    assert tokens.count_text("<|endoftext|>") > 1  # a special token's text is counted as text
    hello = {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}]}
    assert tokens.request_tokens(CHAT, hello) == 3 + 3 + 1 + 2  # priming, message, "user", "hello world"
    assert tokens.request_tokens(CHAT, {**hello, "max_completion_tokens": 50, "n": 2}) == 9 + 100
    assert tokens.request_tokens(CHAT, {**hello, "max_tokens": 50}, with_cap=False) == 9
    responses = {"model": MODEL, "input": "hello world", "max_output_tokens": 40}
    assert tokens.request_tokens("/v1/responses", responses) == 9 + 40
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
    assert tokens.request_tokens(CHAT, {"model": MODEL, "messages": [image]}) == 3 + 3 + 1 + tokens.IMAGE_TOKENS
    embeddings = {"model": "text-embedding-3-small", "input": [[1, 2, 3], "hello world"]}
    assert tokens.request_tokens("/v1/embeddings", embeddings) == 3 + 2
    long = " ".join(f"word{i % 7}" for i in range(30_000))  # counted in pieces, cut where a token starts anyway
    assert len(long) > 4 * tokens.PIECE_CHARS and tokens.count_text(long) == 60_000
    monkeypatch.setattr(tokens, "_encoder", lambda encoding: None)  # bpe-openai not installed
    assert tokens.tokenizer_name() == "utf-8 bytes / 3"
    assert tokens.count_text("hello world") == 4


def test_without_limits_the_account_is_not_modelled(clock):
    huge = rows(10, max_tokens=10_000_000)
    with FakeOpenAIServer(clock=clock) as srv:
        client = _client(srv)
        batches = [submit(client, huge) for _ in range(3)]
        clock.advance(3600)
        assert [client.batches.retrieve(b.id).status for b in batches] == ["completed"] * 3
        assert not srv.state.models_account and srv.state.tokens_of(batches[0].id) == 0
        assert srv.state.refusals() == 0 and srv.state.peak_enqueued(MODEL) == 0
