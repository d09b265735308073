"""
The provider on OpenAI's contract (testing/CONTRACT.md): each test here failed on the code that assumed otherwise.

Every test goes through real HTTP against FakeOpenAIServer with the real ``openai`` SDK; the fake's rules are its
own (testing/input_rules.py), read from OpenAI's documentation, not from the provider's validator.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from airflow_provider_openai_batch.batch_file import OPENAI_BATCH_ENDPOINTS, validate_batch_file
from airflow_provider_openai_batch.endpoints import batch_endpoints
from airflow_provider_openai_batch.exceptions import BatchInputError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.results import estimate_cost, is_retryable, iter_joined, sum_usage
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import FAST, connection_env, jsonl, request_line, run_dag, task_states, xcoms

MODERATION = {"custom_id": "m-0", "method": "POST", "url": "/v1/moderations", "body": {"input": "hello"}}


def _wait_done(hook: OpenAIBatchHook, batch_id: str) -> str:
    return hook.wait_for_batch(batch_id, poll_interval=0.05).status


def _upload(path: Path, endpoint: str, **kwargs: object) -> str | list[str]:
    return OpenAIBatchUploadOperator(task_id="upload", source=str(path), endpoint=endpoint, **kwargs).execute({})


# --- endpoints and request bodies -------------------------------------------------------------------


def test_the_endpoint_list_is_the_installed_sdks():
    assert batch_endpoints() == OPENAI_BATCH_ENDPOINTS
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/videos"} <= set(OPENAI_BATCH_ENDPOINTS)


def test_an_images_batch_is_accepted_and_runs(hook, tmp_path):
    path = tmp_path / "images.jsonl"
    rows = [
        {"custom_id": f"img-{i}", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": f"cat {i}"}}
        for i in range(3)
    ]
    path.write_bytes(jsonl(rows))
    file_id = _upload(path, "/v1/images/generations")
    batch = hook.create_batch(str(file_id), "/v1/images/generations")
    assert _wait_done(hook, batch.id) == "completed"


@pytest.mark.parametrize(
    ("url", "body"),
    [("/v1/moderations", {"input": "x"}), ("/v1/responses", {"prompt": {"id": "pmpt_1"}, "input": "x"})],
)
def test_model_is_optional_where_the_endpoint_has_a_default(hook, tmp_path, url, body):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([{"custom_id": "a", "method": "POST", "url": url, "body": body}]))
    assert validate_batch_file(path, endpoint=url).model is None
    batch = hook.create_batch(str(_upload(path, url)), url)
    assert _wait_done(hook, batch.id) == "completed"


def test_model_is_still_required_where_openai_requires_it(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}]))
    with pytest.raises(BatchInputError) as raised:
        validate_batch_file(path, endpoint="/v1/chat/completions")
    assert {(i.line, i.field) for i in raised.value.issues} == {(1, "body.messages"), (1, "body.model")}


# --- line endings, empty lines, upload reuse ---------------------------------------------------------


def _moderations(count: int, ending: bytes = b"\n") -> bytes:
    return ending.join(json.dumps({**MODERATION, "custom_id": f"m-{i}"}).encode() for i in range(count))


@pytest.mark.parametrize(
    "content",
    [_moderations(5, b"\r\n") + b"\r\n", _moderations(5), _moderations(5) + b"\n\n\n"],
    ids=["crlf", "no-final-newline", "trailing-empty-lines"],
)
def test_what_openai_accepts_is_accepted_sent_once_and_runs(hook, server, tmp_path, content):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    first = _upload(path, "/v1/moderations")
    second = _upload(path, "/v1/moderations")  # a retry: the same bytes are found, not sent again
    assert first == second
    assert server.count("files.create") == 1
    batch = hook.create_batch(str(first), "/v1/moderations")
    assert _wait_done(hook, batch.id) == "completed"  # the fake rejects empty lines: none were sent


def test_a_lost_upload_answer_is_found_not_sent_twice(server, tmp_path, conn_id):
    path = tmp_path / "in.jsonl"
    path.write_bytes(_moderations(5, b"\r\n"))
    server.faults.script("files.create", "drop_after")
    file_id = _upload(path, "/v1/moderations")
    assert server.count("files.create") == 1
    assert list(server.state.files) == [file_id]


def test_an_empty_line_between_requests_is_rejected_before_sending(server, tmp_path, conn_id):
    path = tmp_path / "in.jsonl"
    path.write_bytes(_moderations(1) + b"\n\n" + _moderations(1).replace(b"m-0", b"m-9") + b"\n")
    with pytest.raises(BatchInputError, match="line 2: blank line"):
        _upload(path, "/v1/moderations")
    assert server.count("files.create") == 0


# --- embeddings: 50,000 inputs per batch -------------------------------------------------------------


def _embeddings(path: Path, requests: int, per_request: int) -> Path:
    rows = [
        request_line(
            i, url="/v1/embeddings", model="text-embedding-3-small", input=[f"t{i}.{k}" for k in range(per_request)]
        )
        for i in range(requests)
    ]
    path.write_bytes(jsonl(rows))
    return path


def test_the_embedding_input_limit_is_checked_before_sending(server, tmp_path, conn_id):
    path = _embeddings(tmp_path / "emb.jsonl", 10_000, 10)
    with pytest.raises(BatchInputError, match=r"field .body\.input.: 100,000 embedding inputs"):
        _upload(path, "/v1/embeddings", sharding="never")
    assert server.count("files.create") == 0


def test_sharding_keeps_each_embeddings_batch_under_the_input_limit(hook, server, tmp_path):
    path = _embeddings(tmp_path / "emb.jsonl", 10_000, 10)
    file_ids = _upload(path, "/v1/embeddings")
    assert isinstance(file_ids, list) and len(file_ids) == 2
    for file_id in file_ids:
        batch = hook.create_batch(file_id, "/v1/embeddings")
        assert _wait_done(hook, batch.id) == "completed"  # the fake fails a batch over 50,000 inputs


# --- expiry bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [60, 2_592_001])
def test_expiry_outside_openais_bounds_is_refused_when_the_dag_is_parsed(seconds):
    with pytest.raises(ValueError, match="output_expires_after"):
        OpenAIBatchCreateOperator(
            task_id="c", input_file_id="f", endpoint="/v1/chat/completions", output_expires_after=seconds
        )
    with pytest.raises(ValueError, match="expires_after"):
        OpenAIBatchUploadOperator(task_id="u", source="x.jsonl", endpoint="/v1/chat/completions", expires_after=seconds)


# --- downloads -----------------------------------------------------------------------------------------


def test_a_download_through_a_compressing_proxy_is_checked_on_bytes_received(tmp_path, monkeypatch):
    with FakeOpenAIServer(timings=FAST, compress_content=True) as server:
        monkeypatch.setenv("AIRFLOW_CONN_GZIP", connection_env(server))
        hook = OpenAIBatchHook("gzip")
        content = jsonl([request_line(i) for i in range(500)])
        file_id = hook.upload_file(content).id
        downloaded = hook.download_file(file_id, tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == content
    assert (downloaded.bytes, downloaded.lines) == (len(content), 500)


def _expired_batch(hook: OpenAIBatchHook, input_file: Path, scenario: str = "expire") -> str:
    batch = hook.create_batch(
        hook.upload_file(input_file).id, "/v1/chat/completions", metadata={"fake_scenario": scenario}
    )
    _wait_done(hook, batch.id)
    return batch.id


def test_an_expired_batch_downloads_and_joins_its_unrun_requests_as_expired(hook, server, input_file, airflow_db):
    batch_id = _expired_batch(hook, input_file)
    assert hook.get_batch(batch_id).request_counts.model_dump() == {"total": 10, "completed": 5, "failed": 0}

    def build():
        OpenAIBatchDownloadOperator(task_id="download", batch_id=batch_id)

    run = run_dag(build)
    assert task_states(run) == {"download": "success"}
    result = xcoms(run, "download")[-1]
    assert (result["output_lines"], result["error_lines"]) == (5, 5)
    rows = list(iter_joined(input_file, [result["output_uri"], result["error_uri"]]))
    assert [r.status for r in rows] == ["succeeded"] * 5 + ["expired"] * 5
    assert all(is_retryable(r) for r in rows if r.status == "expired")


def test_an_expired_round_is_resubmitted_unrun_requests_only(server, airflow_db, conn_id, monkeypatch):
    monkeypatch.setenv("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "0.1")
    server.script_batches("expire")  # round 1 expires half way; round 2 completes
    dag = importlib.reload(importlib.import_module("example_dags.example_openai_batch_resubmit")).dag
    run = dag.test()
    assert set(task_states(run).values()) == {"success"}
    first = xcoms(run, "join_round_1")[-1]
    assert first["retry_count"] == 15
    retried = [json.loads(line)["custom_id"] for line in Path(first["retry"]).read_text().splitlines()]
    assert retried == [f"item-{i:02d}" for i in range(15, 30)]  # the fake runs requests in input order
    final = xcoms(run, "merge")[-1]
    assert final["counts"] == {"succeeded": 30} and final["rounds"] == 2
    assert server.batches_created == 2


# --- compatible servers --------------------------------------------------------------------------------


def test_compatible_server_quirks_are_tolerated(tmp_path, monkeypatch, airflow_db):
    with FakeOpenAIServer(timings=FAST, compatible_quirks=True) as server:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server))
        hook = OpenAIBatchHook()
        rows = [
            request_line(0),
            request_line(1, fake_error={"status_code": 400, "type": "invalid_request_error"}),
            request_line(2, fake_error={"error_code": "request_timeout"}),
        ]
        source = tmp_path / "in.jsonl"
        source.write_bytes(jsonl(rows))
        failing = hook.create_batch(hook.upload_file(source).id, "/v1/chat/completions").id
        clean = hook.create_batch(hook.upload_file(jsonl([request_line(0)])).id, "/v1/chat/completions").id
        _wait_done(hook, failing), _wait_done(hook, clean)

        def build():
            OpenAIBatchDownloadOperator(task_id="failing", batch_id=failing, destination=str(tmp_path / "failing"))
            OpenAIBatchDownloadOperator(task_id="clean", batch_id=clean, destination=str(tmp_path / "clean"))

        run = run_dag(build)
    assert set(task_states(run).values()) == {"success"}
    assert xcoms(run, "clean")[-1]["error_uri"] is None  # a zero-byte error file: nothing failed
    result = xcoms(run, "failing")[-1]
    joined = {r.custom_id: r for r in iter_joined(source, [result["output_uri"], result["error_uri"]])}
    assert joined["req-0"].status == "succeeded"
    assert joined["req-0"].response["choices"][0]["message"]["content"] == "echo: question 0"  # decoded body
    assert joined["req-1"].status == "failed" and not is_retryable(joined["req-1"])
    assert joined["req-2"].status == "failed" and is_retryable(joined["req-2"])  # request_timeout, by type
    assert sum_usage(result["output_uri"])["total_tokens"] > 0


# --- cost ----------------------------------------------------------------------------------------------


def test_the_longest_price_key_wins():
    prices = {"gpt-4o": {"input": 1.25, "output": 5.0}, "gpt-4o-mini": {"input": 0.075, "output": 0.3}}
    usage = {"input_tokens": 1_000_000, "cached_input_tokens": 0, "output_tokens": 0}
    cost = estimate_cost(usage, "gpt-4o-mini-2024-07-18", prices)
    assert cost is not None and cost["total"] == 0.075
    assert estimate_cost(usage, "gpt-4o-2024-08-06", prices)["total"] == 1.25  # type: ignore[index]
