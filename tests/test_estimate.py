"""estimate_file: a batch file's tokens, shards, cost range and queue fills, from one validating pass."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.batch_file import ShardLimits, shard_batch_file
from airflow_provider_openai_batch.estimate import estimate_file, render_estimate
from airflow_provider_openai_batch.exceptions import BatchInputError
from airflow_provider_openai_batch.tokens import HEURISTIC_RATIO, request_tokens

CHAT = "/v1/chat/completions"
PRICES = {"gpt-4o-mini": {"input": 0.075, "cached_input": 0.0375, "output": 0.30}}


def chat_line(n: int, *, model: str = "gpt-4o-mini", cap: int | None = 200, text: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "Summarize the review in one sentence."},
            {"role": "user", "content": text or f"Review {n}: the parcel came late but the blender works well. " * 3},
        ],
    }
    if cap is not None:
        body["max_completion_tokens"] = cap
    return {"custom_id": f"r{n}", "method": "POST", "url": CHAT, "body": body}


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_tokens_are_the_sum_of_each_requests_count(tmp_path: Path) -> None:
    lines = [chat_line(n) for n in range(7)]
    estimate = estimate_file(write(tmp_path / "in.jsonl", lines))
    counted = [request_tokens(line["body"], CHAT) for line in lines]
    assert estimate["requests"] == 7
    assert estimate["endpoint"] == CHAT
    assert estimate["model"] == "gpt-4o-mini"
    assert estimate["tokenizer"] == "o200k_base"
    assert estimate["error_bound"] == [1.0, 1.0]
    assert estimate["input_tokens"] == sum(c.input_tokens for c in counted)
    assert estimate["input_tokens_range"] == [estimate["input_tokens"]] * 2
    assert estimate["max_output_tokens"] == 7 * 200
    assert estimate["uncapped_requests"] == 0


def test_cost_range_from_the_price_table(tmp_path: Path) -> None:
    estimate = estimate_file(write(tmp_path / "in.jsonl", [chat_line(n) for n in range(4)]), price_table=PRICES)
    tokens = estimate["input_tokens"]
    assert estimate["cost"] == {
        "currency": "USD",
        "low": round(tokens * 0.075 / 1e6, 6),
        "high": round((tokens * 0.075 + 4 * 200 * 0.30) / 1e6, 6),
    }


def test_a_dated_model_is_priced_by_its_longest_prefix(tmp_path: Path) -> None:
    table = {"gpt-4o": {"input": 1.25, "output": 5.0}, "gpt-4o-mini": {"input": 0.075, "output": 0.30}}
    estimate = estimate_file(write(tmp_path / "in.jsonl", [chat_line(0, model="gpt-4o-mini-2024-07-18")]), None, table)
    assert estimate["cost"] is not None
    assert estimate["cost"]["low"] == round(estimate["input_tokens"] * 0.075 / 1e6, 6)


def test_requests_without_an_output_cap_leave_the_cost_unbounded(tmp_path: Path) -> None:
    lines = [chat_line(0), chat_line(1, cap=None), chat_line(2, cap=None)]
    estimate = estimate_file(write(tmp_path / "in.jsonl", lines), price_table=PRICES)
    assert estimate["uncapped_requests"] == 2
    assert estimate["max_output_tokens"] == 200
    assert estimate["cost"] is not None
    assert estimate["cost"]["high"] is None
    assert estimate["cost"]["low"] > 0
    assert any("2 of 3 requests set no output cap" in note for note in estimate["notes"])
    assert "no upper bound" in render_estimate(estimate)


def test_a_model_missing_from_the_price_table_has_no_cost(tmp_path: Path) -> None:
    estimate = estimate_file(write(tmp_path / "in.jsonl", [chat_line(0, model="gpt-4.1")]), price_table=PRICES)
    assert estimate["cost"] is None
    assert any("no entry for model 'gpt-4.1'" in note for note in estimate["notes"])
    assert estimate_file(write(tmp_path / "b.jsonl", [chat_line(0)]))["cost"] is None  # no table at all


def test_queue_fills_under_an_enqueued_token_budget(tmp_path: Path) -> None:
    """Each request holds its input tokens plus its output cap; shards are cut at the budget and sent in waves."""
    lines = [chat_line(n) for n in range(10)]
    path = write(tmp_path / "in.jsonl", lines)
    load = request_tokens(lines[0]["body"], CHAT).input_tokens + 200  # every line counts the same here
    budget = 4 * load - 1  # three requests per shard: shards of 3, 3, 3 and 1
    estimate = estimate_file(path, enqueued_token_budget=budget)
    queue = estimate["queue"]
    assert queue is not None
    assert estimate["shards"] == 4
    assert queue["tokens"] == 10 * load
    assert queue["fits"] is True
    # Not ceil(10 / 3.99) = 3: a wave holds whole shards, and no two shards of 3 fit together.
    assert queue["fills"] == 4
    assert queue["max_wait"] == "at most 4 x 24h"
    assert "4 waves" in queue["meaning"]
    table = render_estimate(estimate)
    assert "queue time         at most 4 x 24h (a wave takes up to its completion window" in table
    whole = estimate_file(path, enqueued_token_budget=10 * load, completion_window="48h")["queue"]
    assert whole is not None
    assert (whole["fills"], whole["max_wait"]) == (1, "at most 1 x 48h")


def test_without_a_budget_shards_are_cut_on_the_bytes_estimate_as_the_sharder_does(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat_line(n) for n in range(10)])
    limits = ShardLimits(max_tokens=200)
    cut = shard_batch_file(path, tmp_path / "shards", limits=limits)
    assert len(cut) > 1
    assert estimate_file(path, limits=limits)["shards"] == len(cut)


def test_a_request_over_the_budget_is_named_by_its_line(tmp_path: Path) -> None:
    lines = [chat_line(0), chat_line(1, text="word " * 2000), chat_line(2)]
    queue = estimate_file(write(tmp_path / "in.jsonl", lines), enqueued_token_budget=1000)["queue"]
    assert queue is not None
    assert queue["fits"] is False
    assert queue["largest_request_line"] == 2
    assert "line 2 alone holds" in queue["meaning"]


@pytest.mark.parametrize("limits", [ShardLimits(max_requests=3), ShardLimits(max_bytes=1000), ShardLimits()])
def test_shards_match_what_the_sharder_cuts(tmp_path: Path, limits: ShardLimits) -> None:
    path = write(tmp_path / "in.jsonl", [chat_line(n) for n in range(10)])
    cut = shard_batch_file(path, tmp_path / "shards", limits=limits)
    assert estimate_file(path, limits=limits)["shards"] == len(cut)


def test_embedding_shards_respect_the_embedding_input_limit(tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": f"e{n}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": ["a", "b", "c"]},
        }
        for n in range(5)
    ]
    path = write(tmp_path / "in.jsonl", lines)
    limits = ShardLimits(max_embedding_inputs=7)
    estimate = estimate_file(path, limits=limits)
    assert estimate["shards"] == len(shard_batch_file(path, tmp_path / "s", limits=limits)) == 3
    assert estimate["max_output_tokens"] == 0
    assert estimate["uncapped_requests"] == 0
    assert estimate["tokenizer"] == "cl100k_base"


def test_a_model_without_a_tokenizer_gets_a_range_from_the_heuristics_bound(tmp_path: Path) -> None:
    estimate = estimate_file(write(tmp_path / "in.jsonl", [chat_line(0, model="llama-3.1-8b")]), allowed_endpoints=None)
    counted = estimate["input_tokens"]
    assert estimate["tokenizer"] == "heuristic"
    assert estimate["error_bound"] == list(HEURISTIC_RATIO)
    assert estimate["input_tokens_range"] == [
        math.floor(counted / HEURISTIC_RATIO[1]),
        math.ceil(counted / HEURISTIC_RATIO[0]),
    ]
    assert "heuristic" in render_estimate(estimate)


def test_images_are_reported_as_uncounted(tmp_path: Path) -> None:
    line = chat_line(0)
    line["body"]["messages"][1]["content"] = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    estimate = estimate_file(write(tmp_path / "in.jsonl", [line]))
    assert estimate["uncounted_parts"] == 1
    assert "uncounted parts" in render_estimate(estimate)


def test_an_invalid_file_names_file_line_and_field(tmp_path: Path) -> None:
    bad = chat_line(1)
    del bad["body"]["messages"]
    path = write(tmp_path / "in.jsonl", [chat_line(0), bad, chat_line(0)])
    with pytest.raises(BatchInputError) as caught:
        estimate_file(path)
    text = str(caught.value)
    assert f"{path}:line 2, field 'body.messages': missing" in text
    assert f"{path}:line 3, field 'custom_id': duplicate custom_id 'r0'" in text


def test_the_endpoint_argument_is_enforced(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="differs from the batch endpoint '/v1/responses'"):
        estimate_file(write(tmp_path / "in.jsonl", [chat_line(0)]), "/v1/responses")


def test_bytes_and_streams_are_sources_too(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat_line(n) for n in range(3)])
    from_path = estimate_file(path)
    from_bytes = estimate_file(path.read_bytes())
    with path.open("rb") as stream:
        from_stream = estimate_file(stream)
    assert from_path["input_tokens"] == from_bytes["input_tokens"] == from_stream["input_tokens"]


def test_the_table_shows_every_figure(tmp_path: Path) -> None:
    estimate = estimate_file(
        write(tmp_path / "in.jsonl", [chat_line(n) for n in range(3)]),
        price_table=PRICES,
        enqueued_token_budget=10_000_000,
    )
    table = render_estimate(estimate)
    cost = estimate["cost"]
    assert cost is not None and cost["high"] is not None
    assert f"input tokens       {estimate['input_tokens']:,} (o200k_base)" in table
    assert "max output tokens  600" in table
    assert "requests           3" in table
    assert f"{cost['low']:.6f} USD - {cost['high']:.6f} USD" in table
    assert "1 fills of 10,000,000 tokens: the whole input fits in the queue at once" in table
