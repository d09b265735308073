"""
What was validated is what is sent, and an input the Batch API cannot take fails before anything is sent.

A file rewritten between validation and upload is refused and leaves nothing at OpenAI under its content-hashed
name (so a later upload of the right content is not answered with the wrong file); a single request too big for
one file, a request nested past any sane depth, and an error about huge values are each a clear input error
naming the source file and line, raised before the first request.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from openai.resources.files import Files

from airflow_provider_openai_batch import batch_file
from airflow_provider_openai_batch.batch_file import (
    ShardLimits,
    encode_requests,
    shard_batch_file,
    validate_batch_file,
)
from airflow_provider_openai_batch.exceptions import BatchInputError, OpenAIBatchAPIError, OpenAIBatchError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import content_filename
from airflow_provider_openai_batch.operators import openai_batch as operators
from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator
from airflow_provider_openai_batch.storage import as_io
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from airflow_provider_openai_batch.uploads import upload_once
from tests.conftest import jsonl, request_line
from tests.test_idempotency import FakeTI


def _files_at(server: FakeOpenAIServer) -> list[Any]:
    return list(server.state.list_files(None))


# --- 1. what was validated is what is sent -----------------------------------------------------------------------


def _same_size_rewrite(path: Path) -> bytes:
    """Another valid file of exactly the same size: the first prompt says something else."""
    good = path.read_bytes()
    bad = good.replace(b"question 0", b"question X", 1)
    assert bad != good and len(bad) == len(good)
    path.write_bytes(bad)
    return good


def test_a_file_rewritten_after_validation_is_refused_and_its_name_is_never_reused(
    server, conn_id, input_file, monkeypatch
):
    real = operators.validate_batch_file
    rewritten: list[bytes] = []

    def validate_then_rewrite(source: Any, **kwargs: Any) -> Any:
        stats = real(source, **kwargs)
        if not rewritten:  # another process rewrites the file after it was validated, before it is sent
            rewritten.append(_same_size_rewrite(Path(source)))
        return stats

    monkeypatch.setattr(operators, "validate_batch_file", validate_then_rewrite)
    op = OpenAIBatchUploadOperator(task_id="upload", source=str(input_file), endpoint="/v1/chat/completions")
    with pytest.raises(BatchInputError) as raised:
        op.execute({})
    text = str(raised.value)
    assert str(input_file) in text and "changed between validation and upload" in text
    good = rewritten[0]
    hashed_name = content_filename("input.jsonl", hashlib.sha256(good).hexdigest())
    # Nothing was created: no file under the validated content's name, and no file at all.
    assert [f.filename for f in _files_at(server)] == []

    # The right content again: a fresh upload (not a reuse of anything), holding exactly these bytes.
    input_file.write_bytes(good)
    creates = server.count("files.create")
    file_id = OpenAIBatchUploadOperator(
        task_id="upload", source=str(input_file), endpoint="/v1/chat/completions"
    ).execute({})
    assert server.count("files.create") == creates + 1
    assert [f.filename for f in _files_at(server)] == [hashed_name]
    assert OpenAIBatchHook(conn_id).get_conn().files.content(file_id).read() == good


def test_a_file_that_shrank_or_grew_after_validation_is_refused(server, conn_id, tmp_path):
    hook = OpenAIBatchHook(conn_id)
    good = jsonl([request_line(i) for i in range(5)])
    digest = hashlib.sha256(good).hexdigest()
    for changed in (good[:-40], good.replace(b"question 1", b"question 1 and more")):
        path = tmp_path / f"in-{uuid.uuid4().hex[:6]}.jsonl"
        path.write_bytes(changed)
        with pytest.raises(BatchInputError, match="changed between validation and upload"):
            hook.upload_file(path, filename="in.jsonl", length=len(good), sha256=digest, max_retries=0)
    assert _files_at(server) == []


def test_a_verified_upload_stops_before_its_last_bytes_when_the_content_differs():
    """The reader raises at the read that would finish the body: a multipart request is never completed."""
    content = b"x" * 10_000
    expected = hashlib.sha256(b"y" + content[1:]).hexdigest()
    reader = as_io(io.BytesIO(content), len(content), sha256=expected, source="in.jsonl")
    sent = bytearray()
    with pytest.raises(BatchInputError, match=r"in\.jsonl.*changed between validation and upload"):
        while chunk := reader.read(4096):
            sent += chunk
    assert len(sent) < len(content)
    # The same content as validated passes through whole, and ends with an EOF as usual.
    same = as_io(io.BytesIO(content), len(content), sha256=hashlib.sha256(content).hexdigest(), source="in")
    assert same.read() == content and same.read() == b""


@pytest.mark.parametrize("answer", ["despite_the_stop", "after_part_of_the_body"])
def test_an_upload_answered_without_the_checked_bytes_is_deleted(server, conn_id, input_file, monkeypatch, answer):
    """A transport that carried on past the reader's stop, or answered early: the file it made is removed."""
    hook = OpenAIBatchHook(conn_id)
    real_create = Files.create

    def create_anyway(self: Files, *, file: Any, **kwargs: Any) -> Any:
        name, stream, kind = file
        if answer == "after_part_of_the_body":
            return real_create(self, file=(name, stream.read(20), kind), **kwargs)
        sent = bytearray()
        with contextlib.suppress(BatchInputError):
            while chunk := stream.read(64):
                sent += chunk
        return real_create(self, file=(name, bytes(sent), kind), **kwargs)

    monkeypatch.setattr(Files, "create", create_anyway)
    good = input_file.read_bytes()
    if answer == "despite_the_stop":  # the source changed: an input error
        _same_size_rewrite(input_file)
        expected: Any = pytest.raises(BatchInputError, match="changed between validation and upload")
    else:  # the transport's fault: retryable, and nothing is left for the retry to find and reuse
        expected = pytest.raises(OpenAIBatchAPIError, match="kept 20 of the")
    with expected as raised:
        hook.upload_file(
            input_file,
            filename="in.jsonl",
            length=len(good),
            sha256=hashlib.sha256(good).hexdigest(),
            max_retries=0,
        )
    assert isinstance(raised.value, BatchInputError) or raised.value.retryable
    assert server.count("files.create") == 1 and server.count("files.delete") == 1
    assert _files_at(server) == []


def test_a_bad_upload_that_cannot_be_deleted_is_named_and_not_retried(server, conn_id, input_file, monkeypatch):
    """A retry would find the file by its content name and reuse it: the error names it, and nothing retries."""
    real_create = Files.create
    monkeypatch.setattr(
        Files,
        "create",
        lambda self, *, file, **kwargs: real_create(self, file=(file[0], file[1].read(20), file[2]), **kwargs),
    )
    server.faults.script("files.delete", "403")
    good = input_file.read_bytes()
    with pytest.raises(OpenAIBatchError, match=r"could not be deleted.*delete it before retrying") as raised:
        upload_once(
            OpenAIBatchHook(conn_id),
            input_file,
            "in.jsonl",
            sha256=hashlib.sha256(good).hexdigest(),
            size=len(good),
            reuse_window=timedelta(hours=1),
        )
    assert not isinstance(raised.value, OpenAIBatchAPIError)  # call_once retries those
    (kept,) = _files_at(server)
    assert kept.id in str(raised.value) and server.count("files.create") == 1


def test_the_job_refuses_a_work_file_changed_after_sharding(tmp_path, server, conn_id, monkeypatch):
    """The job's shard files are the validated content too: a changed one is never sent under its hash."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([request_line(i) for i in range(4)]))
    real = OpenAIBatchJobOperator._start

    def shard_then_rewrite(self: Any, context: Any, folder: Any) -> Any:
        state = real(self, context, folder)
        _same_size_rewrite(Path(folder.input(state.pieces[0])))
        return state

    monkeypatch.setattr(OpenAIBatchJobOperator, "_start", shard_then_rewrite)
    op = OpenAIBatchJobOperator(
        task_id="job",
        source=str(source),
        endpoint="/v1/chat/completions",
        destination=str(tmp_path / "out.jsonl"),
        poll_interval=0.1,
    )
    ti = FakeTI(f"run-{uuid.uuid4().hex[:6]}")
    with pytest.raises(BatchInputError, match="changed between validation and upload"):
        op.execute({"ti": ti})
    assert _files_at(server) == [] and server.batches_created == 0


# --- 2. a request the Batch API cannot take -----------------------------------------------------------------------


def _with_one_huge_line(path: Path, at: int, padding: int) -> int:
    rows = [request_line(i) for i in range(6)]
    rows[at - 1] = request_line(at - 1, note="x" * padding)
    path.write_bytes(jsonl(rows))
    return len(json.dumps(rows[at - 1]).encode()) + 1


def test_a_single_request_bigger_than_a_file_is_an_input_error_naming_the_source_line(tmp_path):
    path = tmp_path / "in.jsonl"
    size = _with_one_huge_line(path, at=4, padding=5_000)
    with pytest.raises(BatchInputError) as raised:
        shard_batch_file(path, tmp_path / "shards", limits=ShardLimits(max_bytes=2_000))
    text = str(raised.value)
    assert f"{path}:line 4" in text and f"{size:,} bytes" in text and "2,000" in text, text
    assert "shard-" not in text


@pytest.mark.parametrize("sharding", ["auto", "always", "never"])
def test_the_upload_operator_sends_nothing_for_an_oversized_request(tmp_path, server, conn_id, sharding):
    path = tmp_path / "in.jsonl"
    _with_one_huge_line(path, at=5, padding=150_000)  # over 100 KB: the size alone does not say "one file"
    op = OpenAIBatchUploadOperator(
        task_id="upload",
        source=str(path),
        endpoint="/v1/chat/completions",
        max_bytes_per_file=100_000,
        sharding=sharding,
    )
    with pytest.raises(BatchInputError) as raised:
        op.execute({})
    text = str(raised.value)
    assert str(path) in text and "shard-" not in text, text
    if sharding != "never":  # "never" reports the whole file being too big; the others the request that cannot fit
        assert f"{path}:line 5" in text, text
    assert sum(server.calls.values()) == 0
    assert _files_at(server) == []


def test_the_job_sends_nothing_for_an_oversized_request(tmp_path, server, conn_id):
    path = tmp_path / "in.jsonl"
    size = _with_one_huge_line(path, at=3, padding=150_000)
    op = OpenAIBatchJobOperator(
        task_id="job",
        source=str(path),
        endpoint="/v1/chat/completions",
        destination=str(tmp_path / "out.jsonl"),
        max_bytes_per_file=100_000,
        poll_interval=0.1,
    )
    with pytest.raises(BatchInputError) as raised:
        op.execute({"ti": FakeTI(f"run-{uuid.uuid4().hex[:6]}")})
    text = str(raised.value)
    assert f"{path}:line 3" in text and f"{size:,} bytes" in text, text
    assert _files_at(server) == [] and server.count("files.create") == 0 and server.batches_created == 0


def test_a_small_file_over_max_bytes_per_file_is_split_not_refused(tmp_path, server, conn_id):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([request_line(i) for i in range(30)]))
    assert 2_000 < path.stat().st_size < 100_000
    ids = OpenAIBatchUploadOperator(
        task_id="upload", source=str(path), endpoint="/v1/chat/completions", max_bytes_per_file=1_000
    ).execute({})
    assert isinstance(ids, list) and len(ids) > 2
    assert all(f.bytes <= 1_000 for f in _files_at(server))
    assert sum(f.bytes for f in _files_at(server)) == path.stat().st_size


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("where", ["body.extra", "body.model", "body", "custom_id", "body.input"])
def test_a_request_nested_too_deep_is_an_input_error_naming_file_and_line(tmp_path, where):
    url = "/v1/embeddings" if where == "body.input" else "/v1/chat/completions"
    good = json.dumps(request_line(0, url=url))
    deep = _nested(1_000)
    body = {"model": '"m"', "messages": "[]"} if url != "/v1/embeddings" else {"model": '"m"', "input": '"x"'}
    if where.startswith("body."):
        body[where.removeprefix("body.")] = deep
    body_text = deep if where == "body" else "{" + ",".join(f'"{k}":{v}' for k, v in body.items()) + "}"
    custom_id = deep if where == "custom_id" else '"req-1"'
    line = f'{{"custom_id":{custom_id},"method":"POST","url":"{url}","body":{body_text}}}'
    path = tmp_path / "deep.jsonl"
    path.write_text(f"{good}\n{line}\n")
    for check in (
        lambda: validate_batch_file(path, endpoint=url),
        lambda: shard_batch_file(path, tmp_path / "shards", endpoint=url),
    ):
        with pytest.raises(BatchInputError) as raised:
            check()
        assert f"{path}:line 2" in str(
            raised.value
        ) and f"nested more than {batch_file.MAX_NESTING_DEPTH} levels" in str(raised.value)


def test_nesting_within_the_bound_is_accepted(tmp_path):
    path = tmp_path / "ok.jsonl"
    # The line's object is one level, its body a second: a value nested N - 2 deep inside the body reaches N.
    line = request_line(0, extra=json.loads(_nested(batch_file.MAX_NESTING_DEPTH - 2)))
    path.write_text(json.dumps(line) + "\n")
    assert validate_batch_file(path, endpoint="/v1/chat/completions").requests == 1
    line = request_line(0, extra=json.loads(_nested(batch_file.MAX_NESTING_DEPTH - 1)))
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(BatchInputError, match=f"nested more than {batch_file.MAX_NESTING_DEPTH} levels"):
        validate_batch_file(path, endpoint="/v1/chat/completions")


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    path = tmp_path / "ok.jsonl"
    prompt = "[" * 5_000 + '\\"{' * 100
    path.write_text(json.dumps(request_line(0, note=prompt)) + "\n")
    assert validate_batch_file(path, endpoint="/v1/chat/completions").requests == 1


def _deep_dict(depth: int) -> dict[str, Any]:
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(depth):
        cursor["a"] = {}
        cursor = cursor["a"]
    return deep


def test_rows_nested_too_deep_are_an_input_error_naming_the_row(server, conn_id):
    rows = [request_line(0), request_line(1, extra=_deep_dict(2_000))]  # deeper than the encoder can go
    with pytest.raises(BatchInputError, match=r"<rows>:line 2.*nested more than") as raised:
        list(encode_requests(rows))
    assert "RecursionError" not in str(raised.value)
    # The same when the interpreter's recursion limit was raised (Airflow's operator code raises it to 5,000 in
    # some paths, so whether the encoder runs out of stack depends on what ran before in the process).
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        with pytest.raises(BatchInputError, match=r"<rows>:line 2.*nested more than"):
            list(encode_requests(rows))
    finally:
        sys.setrecursionlimit(limit)
    # Rows an operator can be given (Airflow itself walks its arguments), nested past the bound.
    rows = [request_line(0), request_line(1, extra=_deep_dict(300))]
    op = OpenAIBatchUploadOperator(task_id="upload", source=rows, endpoint="/v1/chat/completions")
    with pytest.raises(BatchInputError, match=r"line 2.*nested more than"):
        op.execute({"ti": FakeTI("run")})
    assert sum(server.calls.values()) == 0


def test_huge_bad_values_are_cut_in_the_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    huge = "y" * 2_000_000
    rows = []
    for i in range(20):
        row = request_line(i)
        row["method"] = huge
        rows.append(row)
    rows.append(request_line(20, model=huge))
    path.write_bytes(jsonl(rows))
    with pytest.raises(BatchInputError) as raised:
        validate_batch_file(path, endpoint="/v1/chat/completions", max_issues=30)
    text = str(raised.value)
    assert len(text) < 30 * 600, len(text)
    assert text.count("(2,000,000 bytes)") == 21 and "line 21, field 'body.model'" in text


def test_a_long_duplicate_custom_id_is_cut_too(tmp_path):
    path = tmp_path / "dup.jsonl"
    long_id = "id-" + "z" * 10_000
    first, second = request_line(0), request_line(1)
    first["custom_id"] = second["custom_id"] = long_id
    path.write_bytes(jsonl([first, second]))
    with pytest.raises(BatchInputError, match=r"duplicate custom_id 'id-z+… \(10,003 bytes\)") as raised:
        validate_batch_file(path, endpoint="/v1/chat/completions")
    assert len(str(raised.value)) < 1_000
