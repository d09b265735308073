"""Sharding: one streaming pass validates the whole input and cuts it into valid files in input order."""

from __future__ import annotations

import json

import pytest

from airflow_provider_openai_batch.batch_file import ShardLimits, shard_batch_file, validate_batch_file
from airflow_provider_openai_batch.exceptions import BatchInputError
from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator
from tests.conftest import jsonl, request_line


def _ids(path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


@pytest.fixture
def big_input(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([request_line(i) for i in range(25)]))
    return path


def test_split_by_requests_keeps_order(big_input, tmp_path):
    shards = shard_batch_file(big_input, tmp_path / "s", endpoint="/v1/chat/completions", limits=ShardLimits(10))
    assert [s.requests for s in shards] == [10, 10, 5]
    assert [s.first_line for s in shards] == [1, 11, 21]
    assert [i for s in shards for i in _ids(s.path)] == [f"req-{i}" for i in range(25)]
    for shard in shards:  # every shard is a valid batch file on its own
        assert validate_batch_file(shard.path, endpoint="/v1/chat/completions").sha256 == shard.sha256


def test_split_by_bytes_and_by_tokens(big_input, tmp_path):
    line = max(len(raw) for raw in big_input.read_bytes().splitlines()) + 1
    by_bytes = shard_batch_file(big_input, tmp_path / "b", limits=ShardLimits(max_bytes=line * 4))
    assert all(s.bytes <= line * 4 for s in by_bytes)
    assert all(s.requests >= 4 for s in by_bytes[:-1])  # no shard closed before it had to
    assert sum(s.requests for s in by_bytes) == 25
    by_tokens = shard_batch_file(big_input, tmp_path / "t", limits=ShardLimits(max_tokens=(line // 4) * 7))
    assert max(s.requests for s in by_tokens) <= 7
    assert sum(s.requests for s in by_tokens) == 25


def test_every_problem_in_every_shard_is_reported_and_ids_are_unique_across_shards(tmp_path):
    rows = [request_line(i) for i in range(30)]
    rows[25]["custom_id"] = "req-3"  # duplicates an id of the first shard
    rows[12]["method"] = "GET"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(rows))
    with pytest.raises(BatchInputError) as raised:
        shard_batch_file(path, tmp_path / "s", limits=ShardLimits(10))
    text = str(raised.value)
    assert "line 13, field 'method'" in text
    assert "line 26, field 'custom_id': duplicate custom_id 'req-3'" in text


@pytest.mark.parametrize(("sharding", "expected"), [("auto", list), ("always", list), ("never", None)])
def test_upload_operator_shards(server, conn_id, big_input, sharding, expected):
    op = OpenAIBatchUploadOperator(
        task_id="upload",
        source=str(big_input),
        endpoint="/v1/chat/completions",
        sharding=sharding,
        max_requests_per_file=10,
    )
    if expected is None:
        with pytest.raises(BatchInputError, match="25 requests; a batch file holds at most 10"):
            op.execute({})
        assert server.count("files.create") == 0
        return
    ids = op.execute({})
    assert isinstance(ids, list) and len(ids) == 3
    sizes = [len(server.state.files[i].path.read_bytes().splitlines()) for i in ids]
    assert sizes == [10, 10, 5]
    assert op.execute({}) == ids  # a retry reuses every shard's upload
    assert server.count("files.create") == 3


def test_small_input_stays_one_file(server, conn_id, big_input):
    op = OpenAIBatchUploadOperator(task_id="upload", source=str(big_input), endpoint="/v1/chat/completions")
    assert isinstance(op.execute({}), str)
    always = OpenAIBatchUploadOperator(
        task_id="upload", source=str(big_input), endpoint="/v1/chat/completions", sharding="always"
    )
    assert len(always.execute({})) == 1


def test_a_request_over_the_token_limit_alone_is_an_input_error_naming_its_line(tmp_path):
    rows = [request_line(i) for i in range(5)]
    rows[2] = request_line(2, note="x" * 4_000)  # about 1,000 estimated tokens in one request
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(rows))
    with pytest.raises(BatchInputError) as raised:
        shard_batch_file(path, tmp_path / "s", limits=ShardLimits(max_tokens=500))
    text = str(raised.value)
    assert f"{path}:line 3" in text and "a file holds at most 500" in text and "shard-" not in text, text
