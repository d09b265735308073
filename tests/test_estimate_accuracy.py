"""
How far the estimate is from what a batch really uses: the example DAGs' requests, estimated by
``estimate.estimate_file`` and then run through FakeOpenAIServer with the real ``openai`` SDK, whose usage counts
the prompt with OpenAI's encodings and the message framing of OpenAI's token-counting cookbook (the fake's own
counter, written apart from the provider's) and never reports more output than a request's cap.

docs/cost-and-metrics.md states the bound these hold ("How close the estimate is").
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Batch
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from openai.types.responses import Response

from airflow_provider_openai_batch.estimate import estimate_file
from airflow_provider_openai_batch.results import estimate_cost, normalize_usage
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Timings
from tests.conftest import jsonl

ROOT = Path(__file__).resolve().parent.parent
#: Batch prices per million tokens (an example table: the provider ships none).
PRICES = {
    "gpt-4o-mini": {"input": 0.075, "cached_input": 0.0375, "output": 0.30},
    "text-embedding-3-small": {"input": 0.01, "output": 0.0},
    "my-local-model": {"input": 0.10, "output": 0.40},
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(clock: FakeClock) -> Iterator[openai.OpenAI]:
    with FakeOpenAIServer(clock=clock, timings=Timings()) as server:
        yield openai.OpenAI(
            base_url=server.base_url, api_key=server.api_key, _strict_response_validation=True, max_retries=0
        )


def run_batch(client: openai.OpenAI, clock: FakeClock, rows: list[dict[str, Any]]) -> tuple[Batch, list[dict]]:
    """Upload, create, let the batch end; the ended Batch and its output lines."""
    uploaded = client.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint=rows[0]["url"], completion_window="24h")
    clock.advance(3600)
    batch = client.batches.retrieve(created.id)
    assert batch.status == "completed" and batch.output_file_id
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    return batch, lines


# --- the fake never answers past the request's cap ----------------------------------------------------------

LONG = "Describe, in as much detail as you can, every landmark of Lisbon, its history and how to get there. " * 3


def _row(i: int, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"r{i}", "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}}


@pytest.mark.parametrize(
    "url, cap_field, prompt_field, sdk_type",
    [
        ("/v1/chat/completions", "max_completion_tokens", "messages", ChatCompletion),
        ("/v1/chat/completions", "max_tokens", "messages", ChatCompletion),
        ("/v1/responses", "max_output_tokens", "input", Response),
        ("/v1/completions", "max_tokens", "prompt", Completion),
    ],
)
def test_the_fake_never_answers_past_the_requests_output_cap(client, clock, url, cap_field, prompt_field, sdk_type):
    """
    OpenAI generates at most the cap (``max_completion_tokens``: "An upper bound for the number of tokens that can
    be generated"); an answer stopped there ends with ``finish_reason: "length"`` (a Responses ``status:
    "incomplete"``). A short answer under its cap is whole.
    """

    def prompt(text: str) -> Any:
        return [{"role": "user", "content": text}] if prompt_field == "messages" else text

    rows = [
        _row(0, url, **{prompt_field: prompt(LONG), cap_field: 16}),
        _row(1, url, **{prompt_field: prompt("Hi"), cap_field: 500}),
    ]
    batch, lines = run_batch(client, clock, rows)
    answers = {line["custom_id"]: sdk_type.model_validate(line["response"]["body"]) for line in lines}
    capped, whole = answers["r0"], answers["r1"]
    assert capped.usage is not None and whole.usage is not None
    if isinstance(capped, Response):
        assert isinstance(whole, Response) and whole.usage is not None
        assert capped.usage.output_tokens == 16
        assert capped.status == "incomplete"
        assert capped.incomplete_details is not None
        assert capped.incomplete_details.reason == "max_output_tokens"
        assert len(capped.output_text) <= 16 * 4 and LONG.startswith(capped.output_text.removeprefix("echo: "))
        assert whole.status == "completed" and whole.output_text == "echo: Hi"
        outputs = capped.usage.output_tokens + whole.usage.output_tokens
    else:
        assert not isinstance(whole, Response) and whole.usage is not None
        assert capped.usage.completion_tokens == 16
        assert capped.choices[0].finish_reason == "length"
        text = capped.choices[0].message.content if isinstance(capped, ChatCompletion) else capped.choices[0].text
        assert text is not None and len(text) <= 16 * 4
        assert whole.choices[0].finish_reason == "stop"
        outputs = capped.usage.completion_tokens + whole.usage.completion_tokens
    assert batch.usage is not None and batch.usage.output_tokens == outputs


# --- the estimate against the fake's usage, on the example DAGs' requests -------------------------------------


def _task(module: str, task_id: str) -> Any:
    dag = importlib.reload(importlib.import_module(f"example_dags.{module}")).dag
    return dag.get_task(task_id).python_callable


def _read(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def example_requests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Each example DAG's requests, built by the example's own code (one list per batch it makes)."""
    found: dict[str, list[dict[str, Any]]] = {
        "example_openai_batch": _read(ROOT / "example_dags" / "data" / "landmarks.jsonl"),
        "example_openai_batch_embeddings": _task("example_openai_batch_embeddings", "embedding_requests")(),
        "example_openai_batch_job": _task("example_openai_batch_job", "label_reviews")(),
    }
    for i, rows in enumerate(_task("example_openai_batch_taskflow", "build_requests")()):
        found[f"example_openai_batch_taskflow[{i}]"] = rows
    resubmit = importlib.reload(importlib.import_module("example_dags.example_openai_batch_resubmit"))
    monkeypatch.setattr(resubmit, "_folder", lambda: tmp_path)
    found["example_openai_batch_resubmit"] = _read(resubmit.dag.get_task("write_input").python_callable(params={}))
    sharded = importlib.reload(importlib.import_module("example_dags.example_openai_batch_sharded"))
    monkeypatch.setattr(sharded, "REQUESTS", 500)  # the example's shape, not its 120,000 lines
    found["example_openai_batch_sharded"] = _read(sharded.dag.get_task("write_input").python_callable(run_id="t"))
    return found


def test_the_estimate_holds_the_fakes_usage_on_every_example(client, clock, monkeypatch, tmp_path):
    examples = example_requests(monkeypatch, tmp_path)
    assert len(examples) == 8
    for name, rows in examples.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(jsonl(rows))
        estimate = estimate_file(path, price_table=PRICES)
        batch, _ = run_batch(client, clock, rows)
        usage = normalize_usage(batch.usage.model_dump() if batch.usage else None)
        low_tokens, high_tokens = estimate["input_tokens_range"]
        # A known encoding counts exactly: the range is one number, and the fake's usage is that number.
        assert estimate["tokenizer"] in ("o200k_base", "cl100k_base"), name
        assert low_tokens == high_tokens == estimate["input_tokens"] == usage["input_tokens"], name
        if not estimate["uncapped_requests"]:
            assert usage["output_tokens"] <= estimate["max_output_tokens"], name
        cost = estimate["cost"]
        actual = estimate_cost(usage, estimate["model"], PRICES)
        assert cost is not None and actual is not None, name
        assert cost["low"] <= actual["total"], name
        assert cost["high"] is None or actual["total"] <= cost["high"], name
        assert (cost["high"] is None) == bool(estimate["uncapped_requests"]), name


def test_without_a_tokenizer_the_true_count_lies_in_the_heuristics_range(client, clock, monkeypatch, tmp_path):
    """The examples' requests to a model with no known encoding: counted by the heuristic, bounded by its range."""
    for name, rows in example_requests(monkeypatch, tmp_path).items():
        if rows[0]["url"] != "/v1/chat/completions":
            continue
        renamed = [{**row, "body": {**row["body"], "model": "my-local-model"}} for row in rows]
        path = tmp_path / f"{name}-local.jsonl"
        path.write_bytes(jsonl(renamed))
        estimate = estimate_file(path, price_table=PRICES, allowed_endpoints=None)
        batch, _ = run_batch(client, clock, renamed)
        usage = normalize_usage(batch.usage.model_dump() if batch.usage else None)
        low_tokens, high_tokens = estimate["input_tokens_range"]
        assert estimate["tokenizer"] == "heuristic", name
        assert low_tokens <= usage["input_tokens"] <= high_tokens, name
        cost, actual = estimate["cost"], estimate_cost(usage, "my-local-model", PRICES)
        assert cost is not None and actual is not None, name
        assert cost["low"] <= actual["total"], name
        assert cost["high"] is None or actual["total"] <= cost["high"], name
