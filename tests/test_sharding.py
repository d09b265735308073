"""Sharding: one streaming pass validates the whole input and cuts it into valid files in input order."""

from __future__ import annotations

import json
from typing import Any

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


# --- lines checked a block at a time (BatchFileValidator.check_block) say exactly what line-by-line checks say ----


def _line(i: int, **changes: object) -> bytes:
    line = request_line(i)
    line.update(changes)
    return json.dumps(line).encode()


def _embedding(i: int, value: object) -> bytes:
    return json.dumps(request_line(i, url="/v1/embeddings", model="text-embedding-3-small", input=value)).encode()


#: Each breaks a rule on a line past the first block (blocks of a few lines here), or is valid in a way the block
#: check does not take at once (so the line checks run), or is plainly valid.
_BLOCK_CASES = {
    "valid": [_line(i) for i in range(40)],
    "crlf": [_line(i) + b"\r" for i in range(40)],
    "duplicate across blocks": [_line(i) for i in range(30)] + [_line(3)],
    "duplicate within a block": [_line(i) for i in range(30)] + [_line(31), _line(31)],
    "wrong method": [_line(i) for i in range(30)] + [_line(30, method="GET")],
    "other url": [_line(i) for i in range(30)] + [_line(30, url="/v1/embeddings")],
    "other model": [_line(i) for i in range(30)] + [json.dumps(request_line(30, model="gpt-4o")).encode()],
    "no model": [_line(i) for i in range(30)] + [_line(30, body={"messages": []})],
    "null model": [_line(i) for i in range(30)] + [_line(30, body={"model": None, "messages": []})],
    "no messages": [_line(i) for i in range(30)] + [_line(30, body={"model": "gpt-4o-mini"})],
    "body a list": [_line(i) for i in range(30)] + [_line(30, body=[1])],
    "no body": [_line(i) for i in range(30)]
    + [json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}).encode()],
    "empty custom_id": [_line(i) for i in range(30)] + [_line(30, custom_id="")],
    "numeric custom_id": [_line(i) for i in range(30)] + [_line(30, custom_id=30)],
    "not json": [_line(i) for i in range(30)] + [b'{"custom_id": "x",'],
    "two objects on a line": [_line(i) for i in range(30)] + [_line(30) + b"," + _line(31)],
    "not utf-8": [_line(i) for i in range(30)] + [_line(30).replace(b"Say", b"S\xff")],
    "blank line between": [_line(i) for i in range(30)] + [b"", _line(30)],
    "blank lines at the end": [_line(i) for i in range(30)] + [b"", b""],
    "too deep": [_line(i) for i in range(30)]
    + [_line(30, body={"model": "gpt-4o-mini", "messages": [], "x": json.loads("[" * 200 + "]" * 200)})],
    "a BOM": [b"\xef\xbb\xbf" + _line(0)] + [_line(i) for i in range(1, 30)],
}
_EMBEDDING_CASES = {
    "inputs counted": [_embedding(i, ["a", "b", "c"] if i % 3 else "one") for i in range(60)],
    "token arrays": [_embedding(i, [1, 2, 3] if i % 2 else [[1, 2], [3]]) for i in range(60)],
}


def _shard_outcome(tmp_path, lines: list[bytes], endpoint: str, limits: ShardLimits) -> object:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    folder = tmp_path / f"shards-{len(list(tmp_path.iterdir()))}"
    try:
        made = shard_batch_file(source, folder, endpoint=endpoint, limits=limits)
    except BatchInputError as error:
        return [(i.line, i.field, i.message, i.code) for i in error.issues]
    return [(s.requests, s.bytes, s.sha256, s.tokens, s.first_line, s.path.read_bytes()) for s in made]


@pytest.mark.parametrize(
    ("lines", "endpoint", "limits"),
    [pytest.param(v, "/v1/chat/completions", ShardLimits(max_requests=7), id=k) for k, v in _BLOCK_CASES.items()]
    + [
        pytest.param(v, "/v1/embeddings", ShardLimits(max_embedding_inputs=20), id=k)
        for k, v in _EMBEDDING_CASES.items()
    ],
)
def test_lines_checked_a_block_at_a_time_are_judged_and_sharded_as_line_by_line(
    lines, endpoint, limits, tmp_path, monkeypatch
):
    from airflow_provider_openai_batch import batch_file

    monkeypatch.setattr(batch_file, "LINE_BLOCK_BYTES", 600)  # a few lines a block: problems land past the first
    check_block, taken = batch_file.BatchFileValidator.check_block, []

    def counted(self: Any, first: int, block: list[bytes]) -> Any:
        inputs = check_block(self, first, block)
        taken.append(inputs is not None)
        return inputs

    monkeypatch.setattr(batch_file.BatchFileValidator, "check_block", counted)
    by_block = _shard_outcome(tmp_path, lines, endpoint, limits)
    if not lines[0].startswith(b"\xef\xbb\xbf"):  # a BOM is a problem of line 1: every block is then checked by line
        assert any(taken), "no block was taken at once: the test would not compare anything"
    monkeypatch.setattr(batch_file.BatchFileValidator, "check_block", lambda self, first, block: None)
    by_line = _shard_outcome(tmp_path, lines, endpoint, limits)
    assert by_block == by_line
