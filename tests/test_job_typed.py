"""
The job from prompts to typed rows: prompts in (strings, ``(key, prompt)`` pairs), ``output_schema`` into every
request, each row's ``output`` parsed and validated, the finer statuses counted; a request that asks for another
format is refused before anything is sent; a schema strict mode would refuse is refused when the DAG is parsed.

Real HTTP to FakeOpenAIServer, which answers a ``json_schema`` request with content valid for it (CONTRACT.md
"Structured outputs"); ``test_job``'s driver plays Airflow's part.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from airflow_provider_openai_batch.exceptions import BatchInputError
from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import FAST, connection_env, request_line
from tests.test_job import Driver, synced_clock
from tests.test_lifecycle import TI

ENDPOINT = "/v1/chat/completions"


class ReviewLabel(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    score: int


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(timings=FAST, clock=synced_clock()) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


def job(tmp_path: Path, source: Any, **kwargs: Any) -> OpenAIBatchJobOperator:
    return OpenAIBatchJobOperator(
        task_id="job",
        source=source,
        endpoint=ENDPOINT,
        destination=str(tmp_path / "joined.jsonl"),
        poll_interval=0.05,
        deferrable=True,
        **kwargs,
    )


def rows(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "joined.jsonl").read_text().splitlines()]


def test_prompts_in_typed_rows_out(fake, tmp_path):
    prompts = [("review-1", "Loved it"), ("review-2", "Broke after a day"), ("review-3", "It is a chair")]
    op = lambda: job(  # noqa: E731
        tmp_path,
        prompts,
        model="gpt-4o-mini",
        system_prompt="Label the review.",
        request_params={"max_tokens": 50},
        output_schema=ReviewLabel,
    )
    result = Driver(op, f"r-{uuid.uuid4()}", None).attempt()
    assert result is not None and result["counts"]["succeeded"] == 3
    joined = rows(tmp_path)
    assert [r["custom_id"] for r in joined] == ["review-1", "review-2", "review-3"]
    for row in joined:
        label = ReviewLabel.model_validate(row["output"])
        assert label.sentiment in ("positive", "negative", "neutral")
        body = row["request"]
        assert body["response_format"]["type"] == "json_schema"
        assert body["messages"][0] == {"role": "system", "content": "Label the review."}
        assert body["max_tokens"] == 50


def test_the_finer_statuses_are_counted(fake, tmp_path):
    source = [
        request_line(0),
        request_line(1, fake_output="invalid"),
        request_line(2, fake_output="refused"),
        request_line(3, fake_output="truncated"),
    ]
    result = Driver(lambda: job(tmp_path, source, output_schema=ReviewLabel), f"r-{uuid.uuid4()}", None).attempt()
    assert result is not None
    counts = result["counts"]
    assert (counts["succeeded"], counts["invalid_output"], counts["refused"], counts["truncated"]) == (1, 1, 1, 1)
    by_id = {r["custom_id"]: r for r in rows(tmp_path)}
    assert by_id["req-1"]["status"] == "invalid_output" and by_id["req-1"]["error"]
    assert by_id["req-0"]["status"] == "succeeded" and ReviewLabel.model_validate(by_id["req-0"]["output"])


def test_a_request_asking_for_another_format_is_refused_before_sending(fake, tmp_path):
    other = request_line(1, response_format={"type": "json_object"})
    before = sum(fake.calls.values())
    with pytest.raises(BatchInputError, match=r"line 2.*response_format"):
        job(tmp_path, [request_line(0), other], output_schema=ReviewLabel).execute({"ti": TI("r")})
    assert sum(fake.calls.values()) == before


def test_a_schema_strict_mode_refuses_is_refused_when_the_dag_is_parsed(tmp_path):
    loose = {"type": "object", "properties": {"a": {"type": "string"}}}  # not every property required
    with pytest.raises(ValueError, match=r"required|additionalProperties"):
        job(tmp_path, [], output_schema=loose)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses"])
def test_prompt_rows_after_xcom_and_max_tokens(fake, tmp_path, endpoint):
    """Pairs that came through XCom (lists), {key, prompt} rows, and max_tokens under the endpoint's own field."""
    source = [["review-1", "Loved it"], {"key": "review-2", "prompt": "Broke after a day"}, {"prompt": "A chair"}]
    op = lambda: OpenAIBatchJobOperator(  # noqa: E731
        task_id="job",
        source=source,
        endpoint=endpoint,
        destination=str(tmp_path / "joined.jsonl"),
        poll_interval=0.05,
        deferrable=True,
        model="gpt-4o-mini",
        max_tokens=60,
        output_schema=ReviewLabel,
    )
    result = Driver(op, f"r-{uuid.uuid4()}", None).attempt()
    assert result is not None and result["counts"]["succeeded"] == 3
    joined = rows(tmp_path)
    assert [r["custom_id"] for r in joined] == ["review-1", "review-2", "prompt-000002"]
    field = "max_completion_tokens" if endpoint.endswith("/chat/completions") else "max_output_tokens"
    assert all(r["request"][field] == 60 and "max_tokens" not in r["request"] for r in joined)


@pytest.mark.parametrize("resend", [(), ("truncated", "invalid_output")], ids=["default", "resend"])
def test_invalid_and_truncated_rows_are_resent_only_when_asked(fake, tmp_path, resend):
    """By default a row that came back unusable is kept as it is; ``resend_statuses`` sends it once more."""
    source = [request_line(0), request_line(1, fake_output="invalid"), request_line(2, fake_output="truncated")]
    sent: list[str] = []
    result = Driver(
        lambda: job(tmp_path, source, output_schema=ReviewLabel, resend_statuses=resend), f"r-{uuid.uuid4()}", None
    ).attempt()
    for batch in fake.state.batches.values():
        sent.extend(cid for cid, _ in batch.requests)
    assert result is not None
    assert sorted(sent) == (["req-0", "req-1", "req-1", "req-2", "req-2"] if resend else ["req-0", "req-1", "req-2"])
    assert result["rounds"] == (2 if resend else 1)
    by_id = {r["custom_id"]: r for r in rows(tmp_path)}
    assert (by_id["req-1"]["status"], by_id["req-2"]["status"]) == ("invalid_output", "truncated")


def test_resend_statuses_are_checked_when_the_dag_is_parsed(tmp_path):
    with pytest.raises(ValueError, match="resend_statuses may hold"):
        job(tmp_path, [request_line(0)], output_schema=ReviewLabel, resend_statuses=("failed",))
