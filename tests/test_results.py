"""Results joined to inputs, retry selection, round merging, usage totals and cost: behaviour on real files."""

from __future__ import annotations

import json

import pytest

from airflow_provider_openai_batch.results import (
    JoinedRow,
    estimate_cost,
    is_retryable,
    iter_joined,
    iter_merged,
    normalize_usage,
    sum_usage,
    write_joined,
    write_retry_input,
)
from airflow_provider_openai_batch.testing import responses
from tests.conftest import jsonl, request_line


@pytest.fixture
def files(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(jsonl([request_line(i) for i in range(6)]))
    out = [responses.output_line(f"req-{i}", "/v1/chat/completions", request_line(i)["body"], 0) for i in (4, 0, 2)]
    errors = [
        responses.failed_request_line("req-1", {"status_code": 400, "code": "bad"}),
        responses.failed_request_line("req-3", {"status_code": 503, "code": "server_error"}),
        responses.unprocessed_line("req-5", "batch_expired"),
    ]
    (tmp_path / "out.jsonl").write_bytes(jsonl(out))
    (tmp_path / "err.jsonl").write_bytes(jsonl(errors))
    return inputs, tmp_path / "out.jsonl", tmp_path / "err.jsonl"


def test_join_in_input_order_with_every_status(files, tmp_path):
    inputs, out, err = files
    rows = list(iter_joined(inputs, [out, err, None]))
    assert [(r.custom_id, r.status) for r in rows] == [
        ("req-0", "succeeded"),
        ("req-1", "failed"),
        ("req-2", "succeeded"),
        ("req-3", "failed"),
        ("req-4", "succeeded"),
        ("req-5", "expired"),
    ]
    assert rows[0].response["choices"][0]["message"]["content"] == "echo: question 0"
    assert rows[1].error["status_code"] == 400
    assert rows[0].url == "/v1/chat/completions"
    missing = list(iter_joined(inputs, [out]))
    assert [r.status for r in missing].count("missing") == 3


def test_only_transient_failures_are_retried(files, tmp_path):
    inputs, out, err = files
    joined = tmp_path / "joined.jsonl"
    assert write_joined(iter_joined(inputs, [out, err]), joined) == {"succeeded": 3, "failed": 2, "expired": 1}
    retry = tmp_path / "retry.jsonl"
    assert write_retry_input(joined, retry) == 2
    lines = [json.loads(line) for line in retry.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["req-3", "req-5"]
    assert lines[0] == {
        "custom_id": "req-3",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": request_line(3)["body"],
    }
    assert not is_retryable(JoinedRow("x", "failed", None, error={"status_code": 400}))
    assert is_retryable(JoinedRow("x", "failed", None, error={"status_code": 429}))


def test_merge_takes_the_latest_round(files, tmp_path):
    inputs, out, err = files
    round_1 = tmp_path / "r1.jsonl"
    write_joined(iter_joined(inputs, [out, err]), round_1)
    retry = tmp_path / "retry.jsonl"
    write_retry_input(round_1, retry)
    retry_out = tmp_path / "retry-out.jsonl"
    retry_out.write_bytes(
        jsonl([responses.output_line(f"req-{i}", "/v1/chat/completions", request_line(i)["body"], 0) for i in (3, 5)])
    )
    round_2 = tmp_path / "r2.jsonl"
    write_joined(iter_joined(retry, [retry_out]), round_2)
    merged = list(iter_merged([round_1, round_2, None]))
    assert [(r.custom_id, r.status, r.round) for r in merged] == [
        ("req-0", "succeeded", 0),
        ("req-1", "failed", 0),
        ("req-2", "succeeded", 0),
        ("req-3", "succeeded", 1),
        ("req-4", "succeeded", 0),
        ("req-5", "succeeded", 1),
    ]


def test_usage_of_each_shape_and_the_sum(files):
    _, out, _ = files
    chat = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    assert normalize_usage(chat) == {
        "input_tokens": 10,
        "cached_input_tokens": 4,
        "output_tokens": 5,
        "reasoning_tokens": 2,
        "total_tokens": 15,
    }
    responses_api = {
        "input_tokens": 7,
        "output_tokens": 3,
        "total_tokens": 10,
        "input_tokens_details": {"cached_tokens": 1},
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    assert normalize_usage(responses_api)["cached_input_tokens"] == 1
    assert normalize_usage({"prompt_tokens": 8, "total_tokens": 8})["output_tokens"] == 0
    totals = sum_usage(out)
    assert totals["input_tokens"] == sum(
        responses.usage_of("/v1/chat/completions", request_line(i)["body"])[0] for i in (4, 0, 2)
    )  # the fake's own count of each request's prompt
    assert totals["total_tokens"] == totals["input_tokens"] + totals["output_tokens"]


def test_cost_from_a_price_table():
    usage = {
        "input_tokens": 2_000_000,
        "cached_input_tokens": 1_000_000,
        "output_tokens": 500_000,
        "reasoning_tokens": 0,
        "total_tokens": 2_500_000,
    }
    prices = {"gpt-4o-mini": {"input": 0.075, "cached_input": 0.0375, "output": 0.30}}
    assert estimate_cost(usage, "gpt-4o-mini-2024-07-18", prices) == {
        "model": "gpt-4o-mini-2024-07-18",
        "currency": "USD",
        "total": 0.2625,
    }
    assert estimate_cost(usage, "o3", prices) is None


def test_parquet_output(files, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    inputs, out, err = files
    target = tmp_path / "joined.parquet"
    write_joined(iter_joined(inputs, [out, err]), target)
    table = pq.read_table(target)
    assert table.column("custom_id").to_pylist() == [f"req-{i}" for i in range(6)]


def test_join_of_buckets_split_again_is_the_same(files, tmp_path, monkeypatch):
    """A bucket too big for memory is split a level down; the rows, their order and their counts do not change."""
    import airflow_provider_openai_batch.results as results

    inputs, out, err = files
    # Blank lines, a last line without its newline, and a result sent twice (the later one counts).
    (tmp_path / "out.jsonl").write_bytes(b"\n" + out.read_bytes() + b"\n  \n" + out.read_bytes().splitlines()[0])
    whole = tmp_path / "whole.jsonl"
    counts = write_joined(iter_joined(inputs, [out, err]), whole)
    monkeypatch.setattr(results, "_BUCKET_BYTES", 1)
    monkeypatch.setattr(results, "_MAX_DEPTH", 2)
    split = tmp_path / "split.jsonl"
    assert write_joined(iter_joined(inputs, [out, err]), split) == counts == {"succeeded": 3, "failed": 2, "expired": 1}
    assert split.read_bytes() == whole.read_bytes()
    assert [r.custom_id for r in iter_joined(inputs, [out, err])] == [f"req-{i}" for i in range(6)]


def test_a_body_sent_as_a_json_string_is_decoded(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(jsonl([request_line(0)]))
    out = tmp_path / "out.jsonl"
    body = json.dumps({"object": "chat.completion", "choices": []})
    out.write_text(json.dumps({"custom_id": "req-0", "response": {"status_code": 200, "body": body}}) + "\n")
    [row] = iter_joined(inputs, [out])
    assert (row.status, row.response) == ("succeeded", {"object": "chat.completion", "choices": []})
    assert row.request == request_line(0)["body"]


def test_bodies_pass_through_with_any_json_whitespace(tmp_path):
    """A body is copied as it was sent, so JSON whitespace in it (a carriage return too) must not split a row."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m",\r"input":"x"}}\n')
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"custom_id":"a","response":{"status_code":200,"body":{"data":\r[]}}}\n')
    [row] = iter_joined(inputs, [out])
    assert (row.status, row.request, row.response) == ("succeeded", {"model": "m", "input": "x"}, {"data": []})
    joined = tmp_path / "joined.jsonl"
    write_joined(iter_joined(inputs, [out]), joined)
    assert [json.loads(line)["custom_id"] for line in joined.read_bytes().split(b"\n") if line] == ["a"]
