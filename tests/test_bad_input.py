"""A corpus of bad batch inputs: each is rejected before anything reaches the API, naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_provider_openai_batch.batch_file import validate_batch_file
from airflow_provider_openai_batch.exceptions import BatchInputError
from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator
from tests.conftest import request_line

CORPUS = Path(__file__).parent / "data" / "bad"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "expected.json").read_text())


def _where(path: Path, line: int, field: str | None) -> str:
    where = f"{path}:line {line}" if line else f"{path}:file"
    return where + (f", field '{field}'" if field else "")


def test_corpus_is_big_enough():
    assert len(EXPECTED) >= 25
    assert sorted(EXPECTED) == sorted(p.name for p in CORPUS.glob("*.jsonl"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rejected_before_upload(name, server, conn_id):
    case = EXPECTED[name]
    path = CORPUS / name
    op = OpenAIBatchUploadOperator(
        task_id="upload", source=str(path), endpoint=case.get("endpoint", "/v1/chat/completions")
    )
    with pytest.raises(BatchInputError) as raised:
        op.execute({})
    text = str(raised.value)
    expected_prefix = _where(path, case["line"], case["field"])
    assert any(line.strip().startswith(expected_prefix) and case["message"] in line for line in text.splitlines()), text
    assert sum(server.calls.values()) == 0  # not even a listing: nothing was sent


def test_too_many_requests(tmp_path, server, conn_id):
    path = tmp_path / "big.jsonl"
    line = json.dumps(request_line(0)).encode()
    with path.open("wb") as out:
        for i in range(50_001):
            out.write(line.replace(b'"req-0"', f'"req-{i}"'.encode()) + b"\n")
    # With sharding="auto" (the default) such an input is split instead; "never" makes the limit an error.
    op = OpenAIBatchUploadOperator(task_id="u", source=str(path), endpoint="/v1/chat/completions", sharding="never")
    with pytest.raises(BatchInputError, match="50,001 requests; a batch file holds at most 50,000"):
        op.execute({})
    assert sum(server.calls.values()) == 0


def test_too_many_bytes(tmp_path):
    path = tmp_path / "huge.jsonl"
    padding = "x" * 5_500
    with path.open("wb") as out:
        for i in range(40_000):
            out.write(json.dumps(request_line(i, note=padding)).encode() + b"\n")
    assert path.stat().st_size > 200 * 1024 * 1024
    with pytest.raises(BatchInputError, match="a batch file holds at most 209,715,200 bytes"):
        validate_batch_file(path, endpoint="/v1/chat/completions")


def test_unsupported_target_endpoint(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(request_line(0, url="/v1/audio/speech")) + "\n")
    with pytest.raises(BatchInputError, match="field 'endpoint': unsupported endpoint '/v1/audio/speech'"):
        validate_batch_file(path, endpoint="/v1/audio/speech")
    # A compatible server's own endpoint passes when the operator is told not to restrict endpoints.
    assert validate_batch_file(path, endpoint="/v1/audio/speech", allowed_endpoints=None).requests == 1
    # Every endpoint the installed SDK lists for batches is accepted (images and videos included).
    images = tmp_path / "images.jsonl"
    images.write_text(json.dumps(request_line(0, url="/v1/images/generations", prompt="a cat")) + "\n")
    assert validate_batch_file(images, endpoint="/v1/images/generations").requests == 1


def test_error_lists_several_problems_not_only_the_first():
    with pytest.raises(BatchInputError) as raised:
        validate_batch_file(CORPUS / "many_problems.jsonl")
    error = raised.value
    assert len(error.issues) == 20
    assert error.more == 10
    assert [issue.line for issue in error.issues] == list(range(1, 21))


def test_valid_file_statistics(input_file):
    stats = validate_batch_file(input_file, endpoint="/v1/chat/completions")
    assert (stats.requests, stats.endpoint, stats.model) == (10, "/v1/chat/completions", "gpt-4o-mini")
    assert stats.bytes == input_file.stat().st_size
