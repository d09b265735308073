"""
The two readers of a Batch answer agree (``batch_status.summarize`` of the SDK's ``Batch`` and ``summarize_json`` of
the raw JSON, which a waiting trigger uses on every poll): field for field, on every status the SDK lists, for
OpenAI's answers and for the Azure and OpenAI-compatible quirks the provider tolerates, usage and errors included.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from openai._models import construct_type
from openai.types import Batch

from airflow_provider_openai_batch.batch_status import BatchSummary, summarize, summarize_json
from tests.conftest import SUMMARY_KEYS

#: Every status the installed SDK's ``Batch.status`` lists (a status a new SDK adds is covered by itself).
SDK_STATUSES = sorted(get_args(Batch.model_fields["status"].annotation))

USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 200},
    "output_tokens": 340,
    "output_tokens_details": {"reasoning_tokens": 40},
    "total_tokens": 1540,
}
ERRORS = {
    "object": "list",
    "data": [
        {"code": "invalid_method", "line": 2, "message": "Only POST requests are supported.", "param": "method"},
        {"code": "missing_required_parameter", "line": 5, "message": "Missing 'model'.", "param": "body.model"},
    ],
}


def _answer(status: str) -> dict[str, Any]:
    """An OpenAI Batch answer in ``status``, with the fields OpenAI fills at that point of a batch's life."""
    answer: dict[str, Any] = {
        "id": "batch_abc",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini-2024-07-18",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": status,
        "created_at": 1_700_000_000,
        "expires_at": 1_700_086_400,
        "metadata": {"airflow_idempotency_key": "k"},
        "output_file_id": None,
        "error_file_id": None,
        "errors": None,
        "request_counts": {"total": 10, "completed": 0, "failed": 0},
        "usage": None,
    }
    if status in ("in_progress", "finalizing", "cancelling"):
        answer["request_counts"] = {"total": 10, "completed": 6, "failed": 1}
    if status in ("completed", "expired", "cancelled"):
        counts = {"completed": {"completed": 9, "failed": 1}, "expired": {"completed": 4, "failed": 0}}
        answer["request_counts"] = {"total": 10, **counts.get(status, {"completed": 3, "failed": 0})}
        answer.update(output_file_id="file-out", error_file_id="file-err", usage=USAGE)
    if status == "failed":
        answer["errors"] = ERRORS
    return answer


def _azure(answer: dict[str, Any]) -> dict[str, Any]:
    """Azure OpenAI: ``""`` for absent file ids, ``request_counts: null`` while validating, no usage (CONTRACT T4)."""
    quirked = {**answer, "usage": None}
    for name in ("output_file_id", "error_file_id"):
        quirked[name] = quirked[name] or ""
    if answer["status"] == "validating":
        quirked["request_counts"] = None
    return quirked


def _compatible(answer: dict[str, Any]) -> dict[str, Any]:
    """A compatible server (CONTRACT T5): no usage or model, errors with a ``type`` and no ``code``, extra fields."""
    quirked = {k: v for k, v in answer.items() if k not in ("usage", "model")}
    quirked["server_info"] = {"engine": "vllm"}
    if quirked.get("errors"):
        quirked["errors"] = {"data": [{"type": "invalid_request", "message": "bad line", "line": 1}]}
    return quirked


def _agree(raw: dict[str, Any], *, strict: bool = True) -> BatchSummary:
    """Both readers, field for field; ``strict`` also checks the SDK's strictly validated model (a documented shape)."""
    body = json.dumps(raw).encode()
    lean = summarize_json(body)
    assert lean is not None, "summarize_json stepped aside for a documented shape"
    readings = {"construct": summarize(construct_type(type_=Batch, value=json.loads(body)))}
    if strict:
        readings["strict"] = summarize(Batch.model_validate(json.loads(body)))
    for how, full in readings.items():
        assert set(lean) == set(full) == SUMMARY_KEYS
        for name in SUMMARY_KEYS:
            assert lean[name] == full[name], f"{name} differs from the SDK model's ({how}) reading"  # type: ignore[literal-required]
    return lean


@pytest.mark.parametrize("status", SDK_STATUSES)
def test_openais_answers_read_alike_on_every_status(status):
    lean = _agree(_answer(status))
    assert lean["status"] == status and lean["batch_id"] == "batch_abc"


@pytest.mark.parametrize("status", SDK_STATUSES)
def test_azures_answers_read_alike_on_every_status(status):
    lean = _agree(_azure(_answer(status)))
    assert lean["output_file_id"] is None or lean["output_file_id"] == "file-out"  # "" is no file
    assert lean["error_file_id"] is None or lean["error_file_id"] == "file-err"
    if status == "validating":
        assert lean["request_counts"] == {"total": 0, "completed": 0, "failed": 0}  # null counts


@pytest.mark.parametrize("status", SDK_STATUSES)
def test_compatible_servers_answers_read_alike_on_every_status(status):
    lean = _agree(_compatible(_answer(status)))
    assert lean["usage"] is None and lean["model"] is None


def test_usage_is_read_as_the_sdk_dumps_it():
    lean = _agree(_answer("completed"))
    assert lean["usage"] == USAGE


def test_usage_with_fields_a_newer_api_adds_keeps_them():
    usage = {**USAGE, "input_tokens_details": {"cached_tokens": 5, "audio_tokens": 1}, "batch_discount": 0.5}
    lean = _agree({**_answer("completed"), "usage": usage})
    assert lean["usage"]["batch_discount"] == 0.5
    assert lean["usage"]["input_tokens_details"] == {"cached_tokens": 5, "audio_tokens": 1}


def test_partial_usage_from_a_compatible_server_reads_as_the_sdks_lenient_model():
    usage = {"input_tokens": 3, "input_tokens_details": {}, "total_tokens": 3}
    lean = _agree({**_answer("completed"), "usage": usage}, strict=False)
    assert lean["usage"]["output_tokens"] is None and lean["usage"]["input_tokens"] == 3
    assert lean["usage"]["input_tokens_details"] == {"cached_tokens": None}  # nested models dump their fields too


def test_validation_errors_are_read_as_the_sdk_dumps_them():
    lean = _agree(_answer("failed"))
    assert lean["errors"] == ERRORS["data"]


def test_errors_without_some_fields_read_alike():
    raw = {**_answer("failed"), "errors": {"object": "list", "data": [{"message": "m"}, {"line": 3, "code": "c"}]}}
    lean = _agree(raw)
    assert lean["errors"][0] == {"code": None, "line": None, "message": "m", "param": None}


@pytest.mark.parametrize(
    "counts",
    [
        pytest.param({"total": 5}, id="some-counts-missing"),
        pytest.param({"total": 5, "completed": None, "failed": None}, id="null-counts"),
        pytest.param({}, id="empty-counts"),
    ],
)
def test_incomplete_counts_read_as_zero_alike(counts):
    lean = _agree({**_answer("in_progress"), "request_counts": counts}, strict=False)
    assert lean["request_counts"]["completed"] == 0 and lean["request_counts"]["failed"] == 0


def test_a_status_a_later_api_adds_reads_alike():
    lean = _agree({**_answer("in_progress"), "status": "paused"}, strict=False)
    assert lean["status"] == "paused"
