"""Typed Parquet: the columns of an output schema or an endpoint, read back by pyarrow and DuckDB with their types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from airflow_provider_openai_batch import parquet  # noqa: E402
from airflow_provider_openai_batch.outputs import apply_output_schema, output_schema  # noqa: E402
from airflow_provider_openai_batch.results import JoinedRow, iter_joined, iter_merged, write_joined  # noqa: E402
from airflow_provider_openai_batch.testing import responses  # noqa: E402
from tests.conftest import jsonl, request_line  # noqa: E402
from tests.test_outputs import LABEL_DICT, Item, Label  # noqa: E402

DICT = pa.dictionary(pa.int32(), pa.string())


def _files(
    folder: Path, rows: list[dict], failed: tuple[int, ...] = (), answered: int | None = None
) -> tuple[Path, list[Path]]:
    """An input file and the fake model's result files for it (in the fake's own, shuffled order)."""
    inputs = folder / "in.jsonl"
    inputs.write_bytes(jsonl(rows))
    count = len(rows) if answered is None else answered
    out = [
        responses.output_line(r["custom_id"], r["url"], r["body"], 1)
        for i, r in enumerate(rows[:count])
        if i not in failed
    ]
    err = [
        responses.failed_request_line(rows[i]["custom_id"], {"status_code": 503, "code": "server_error"})
        for i in failed
    ]
    (folder / "out.jsonl").write_bytes(jsonl(sorted(out, key=lambda line: line["id"])))
    (folder / "err.jsonl").write_bytes(jsonl(err))
    return inputs, [folder / "out.jsonl", folder / "err.jsonl"]


def _structured(
    n: int, schema: Any = Label, url: str = "/v1/chat/completions", fates: dict[int, str] | None = None
) -> list[dict]:
    rows = []
    for i in range(n):
        row = request_line(i, url=url)
        row["body"] = apply_output_schema(row["body"], url, schema)
        if fates and i in fates:
            row["body"]["fake_output"] = fates[i]
        rows.append(row)
    return rows


@pytest.mark.parametrize("schema", [Label, LABEL_DICT], ids=["pydantic-model", "json-schema-dict"])
def test_one_typed_column_per_schema_field(tmp_path, schema):
    rows = _structured(6, schema, fates={2: "invalid", 3: "refused", 4: "truncated"})
    inputs, results = _files(tmp_path, rows, failed=(5,))
    target = tmp_path / "typed.parquet"
    counts = write_joined(iter_joined(inputs, results, output_schema=schema), target)
    assert counts == {"succeeded": 2, "invalid_output": 1, "refused": 1, "truncated": 1, "failed": 1}

    table = pq.read_table(target)
    item = pa.struct([("name", pa.string()), ("quantity", pa.int64())])
    assert table.schema.names == [
        "custom_id", "status", "sentiment", "score", "tags", "note", "items", "output_text", "error", "round"
    ]  # fmt: skip
    types = {field.name: field.type for field in table.schema}
    assert types["sentiment"] == DICT and pa.types.is_dictionary(types["status"])
    assert types["score"] == pa.float64() and types["note"] == pa.string()
    assert types["tags"].value_type == pa.string() and pa.types.is_list(types["tags"])
    assert pa.types.is_list(types["items"]) and types["items"].value_type == item
    assert types["round"] == pa.int32() and pa.types.is_struct(types["error"])

    got = table.to_pylist()
    assert [r["custom_id"] for r in got] == [f"req-{i}" for i in range(6)]  # input order
    assert [r["status"] for r in got] == ["succeeded", "succeeded", "invalid_output", "refused", "truncated", "failed"]
    expected = responses.schema_value(output_schema(schema).schema, "req-0")
    fields = ("sentiment", "score", "tags", "note", "items")
    assert {k: got[0][k] for k in fields} == {**expected, "score": float(expected["score"])}
    assert all(got[2][k] is None for k in fields)  # a row without a usable answer has no output...
    assert got[2]["output_text"] == json.dumps({"fake_invalid_output": True})  # ...but keeps what the model wrote
    assert got[0]["output_text"] is None  # a typed answer is in its columns, not again as text
    assert got[3]["error"]["code"] == "refused" and got[3]["error"]["message"] == responses.REFUSAL
    assert got[4]["error"]["code"] == "truncated" and got[4]["output_text"]
    assert got[5]["error"]["status_code"] == 503 and got[5]["error"]["code"] == "server_error"


def test_duckdb_reads_the_types(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    inputs, results = _files(tmp_path, _structured(4, fates={3: "refused"}))
    target = tmp_path / "typed.parquet"
    write_joined(iter_joined(inputs, results), target, output_schema=Label)
    query = f"""
        SELECT custom_id, status, sentiment, score, len(tags), items[1].quantity, error.code,
               typeof(sentiment), typeof(score), typeof(tags), typeof(items), typeof(note)
        FROM '{target}' ORDER BY custom_id
    """
    got = duckdb.sql(query).fetchall()
    first = responses.schema_value(output_schema(Label).schema, "req-0")
    assert got[0][:6] == ("req-0", "succeeded", first["sentiment"], first["score"], 2, first["items"][0]["quantity"])
    assert got[0][7:] == (
        "VARCHAR",
        "DOUBLE",
        "VARCHAR[]",
        'STRUCT("name" VARCHAR, quantity BIGINT)[]',
        "VARCHAR",
    )
    assert got[3][1:7] == ("refused", None, None, None, None, "refused")
    by_status = dict(duckdb.sql(f"SELECT status, count(*) FROM '{target}' GROUP BY status").fetchall())
    assert by_status == {"succeeded": 3, "refused": 1}


def test_each_endpoints_columns_without_a_schema(tmp_path):
    cases = {
        "/v1/embeddings": ["embedding", "embeddings"],
        "/v1/moderations": ["flagged", "categories"],
        "/v1/chat/completions": [],
        "/v1/responses": [],
        "/v1/completions": [],
    }
    for url, columns in cases.items():
        folder = tmp_path / url.strip("/").replace("/", "-")
        folder.mkdir()
        rows = [request_line(i, url=url) for i in range(3)]
        if url == "/v1/embeddings":
            rows[2]["body"]["input"] = ["one", "two"]
        if url == "/v1/moderations":
            rows[1]["body"]["input"] = "flag me"
        inputs, results = _files(folder, rows, answered=2 if url == "/v1/completions" else None)
        target = folder / "x.parquet"
        write_joined(iter_joined(inputs, results, extract=True), target)
        table = pq.read_table(target)
        assert table.schema.names == ["custom_id", "status", *columns, "output_text", "error", "round"], url
        got = table.to_pylist()
        if url == "/v1/embeddings":
            assert table.schema.field("embedding").type.value_type == pa.float32()
            assert got[0]["embedding"] == pytest.approx(responses.embedding_vector("text 0"), abs=1e-6)
            assert got[2]["embedding"] is None and len(got[2]["embeddings"]) == 2
        elif url == "/v1/moderations":
            assert [r["flagged"] for r in got] == [False, True, False]
            assert got[1]["categories"] == ["harassment"]
        else:
            assert got[0]["output_text"] == responses.answer_text(rows[0]["body"])
        if url == "/v1/completions":
            assert got[2]["status"] == "missing" and got[2]["output_text"] is None


def test_row_groups_stream_and_keep_input_order(tmp_path, monkeypatch):
    from airflow_provider_openai_batch import results as joins

    monkeypatch.setattr(parquet, "ROWS_PER_GROUP", 100)
    monkeypatch.setattr(joins, "_CHUNK_BYTES", 128 * 50)  # the join hands over 50 rows at a time
    rows = _structured(1000, fates={i: "refused" for i in range(0, 1000, 7)})
    inputs, results = _files(tmp_path, rows, failed=tuple(range(3, 1000, 50)))
    target = tmp_path / "typed.parquet"
    counts = write_joined(iter_joined(inputs, results, output_schema=Label), target)
    meta = pq.ParquetFile(target).metadata
    assert meta.num_rows == 1000 and meta.num_row_groups >= 10
    table = pq.read_table(target)
    assert table.column("custom_id").to_pylist() == [f"req-{i}" for i in range(1000)]
    statuses = table.column("status").to_pylist()
    assert {s: statuses.count(s) for s in set(statuses)} == counts


def test_a_typed_join_split_a_level_down_writes_the_same_file(tmp_path, monkeypatch):
    """
    Buckets too big for memory are split again, their columns re-partitioned: the same rows in the same order,
    with a result sent twice (the later one counts), blank lines, and inputs that never got a result.
    """
    from airflow_provider_openai_batch import results as joins

    rows = _structured(60, fates={i: "refused" for i in range(0, 60, 11)})
    inputs, results = _files(tmp_path, rows, failed=(5, 30, 50), answered=56)
    out = results[0].read_bytes().splitlines(keepends=True)
    resent = json.loads(out[0])
    resent["response"]["body"]["choices"][0]["message"]["content"] = "not json"  # the later answer is invalid
    results[0].write_bytes(b"\n" + b"".join(out) + b"\n  \n" + jsonl([resent]))
    whole = tmp_path / "whole.parquet"
    counts = write_joined(iter_joined(inputs, results, output_schema=Label), whole)
    assert counts["missing"] == 4 and counts["invalid_output"] >= 1
    monkeypatch.setattr(joins, "_BUCKET_BYTES", 1)
    monkeypatch.setattr(joins, "_MAX_DEPTH", 1)
    monkeypatch.setattr(parquet, "ROWS_PER_GROUP", 8)  # many groups at both levels
    split = tmp_path / "split.parquet"
    assert write_joined(iter_joined(inputs, results, output_schema=Label), split) == counts
    got = pq.read_table(split).to_pylist()
    assert got == pq.read_table(whole).to_pylist()
    assert [r["custom_id"] for r in got] == [f"req-{i}" for i in range(60)]
    [row] = [r for r in got if r["custom_id"] == resent["custom_id"]]
    assert row["status"] == "invalid_output" and row["output_text"] == "not json"


def test_a_child_process_spills_the_inputs_keys_and_a_failed_one_changes_nothing(tmp_path, monkeypatch, caplog):
    """
    Local inputs have their keys spilt by a process of their own while the results are spilt (here whatever their
    size); when that process fails, the join reads the keys itself: the same file either way.
    """
    import subprocess

    from airflow_provider_openai_batch import typed_join

    rows = _structured(200, fates={i: "truncated" for i in range(0, 200, 9)})
    inputs, results = _files(tmp_path, rows, failed=(3, 70), answered=190)
    alone = tmp_path / "alone.parquet"
    counts = write_joined(iter_joined(inputs, results, output_schema=Label), alone)
    started: list[list[str]] = []
    popen = subprocess.Popen

    def recorded(command, **kwargs):
        started.append(command)
        return popen(command, **kwargs)

    monkeypatch.setattr(typed_join, "_BESIDE_BYTES", 0)
    monkeypatch.setattr(subprocess, "Popen", recorded)
    beside = tmp_path / "beside.parquet"
    assert write_joined(iter_joined(inputs, results, output_schema=Label), beside) == counts
    assert len(started) == 1 and started[0][4].endswith("join_keys.py")
    assert pq.read_table(beside).to_pylist() == pq.read_table(alone).to_pylist()
    assert "read again" not in caplog.text
    uris = tmp_path / "uris.parquet"  # file:// URIs are local files too
    assert write_joined(iter_joined(f"file://{inputs}", results, output_schema=Label), uris) == counts
    assert len(started) == 2 and pq.read_table(uris).to_pylist() == pq.read_table(alone).to_pylist()
    monkeypatch.setattr(typed_join.sys, "executable", "/bin/false")  # a child that fails at once
    failed = tmp_path / "failed.parquet"
    assert write_joined(iter_joined(inputs, results, output_schema=Label), failed) == counts
    assert len(started) == 3 and "The inputs' keys are read again in this process" in caplog.text
    assert pq.read_table(failed).to_pylist() == pq.read_table(alone).to_pylist()
    # Ended with 0 and spilt nothing (as any child reads to a process that ignores SIGCHLD): not taken as done.
    monkeypatch.setattr(typed_join.sys, "executable", "/bin/true")
    caplog.clear()
    silent = tmp_path / "silent.parquet"
    assert write_joined(iter_joined(inputs, results, output_schema=Label), silent) == counts
    assert len(started) == 4 and "read again in this process: the process reading them ended with 0" in caplog.text
    assert pq.read_table(silent).to_pylist() == pq.read_table(alone).to_pylist()


def test_the_child_process_imports_from_the_tasks_own_path(tmp_path, monkeypatch, caplog):
    """
    msgspec where only the task's import path finds it (``pip install --user``, PYTHONPATH): the child that spills
    the inputs' keys finds it too, rather than failing and leaving the keys to the task's process. (An interpreter
    with no packages of its own stands for it here: a bare venv of this Python.)
    """
    import venv

    from airflow_provider_openai_batch import typed_join

    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)
    rows = _structured(50)
    inputs, results = _files(tmp_path, rows)
    alone = tmp_path / "alone.parquet"
    counts = write_joined(iter_joined(inputs, results, output_schema=Label), alone)
    monkeypatch.setattr(typed_join, "_BESIDE_BYTES", 0)
    monkeypatch.setattr(typed_join.sys, "executable", str(bare / "bin" / "python"))
    monkeypatch.setattr(typed_join.sys, "path", [*typed_join.sys.path, tmp_path])  # a Path: skipped by imports
    beside = tmp_path / "beside.parquet"
    assert write_joined(iter_joined(inputs, results, output_schema=Label), beside) == counts
    assert "read again" not in caplog.text
    assert pq.read_table(beside).to_pylist() == pq.read_table(alone).to_pylist()


def test_inputs_given_as_streams_lose_no_row(tmp_path):
    """An open file or a BytesIO as the inputs: the typed join reads its first line for the endpoint, then all."""
    import io

    rows = _structured(30, fates={4: "refused"})
    inputs, results = _files(tmp_path, rows, failed=(7,), answered=28)
    by_path = tmp_path / "path.parquet"
    counts = write_joined(iter_joined(inputs, results, output_schema=Label), by_path)
    assert counts == {"succeeded": 26, "refused": 1, "failed": 1, "missing": 2}
    in_memory = tmp_path / "memory.parquet"
    assert write_joined(iter_joined(io.BytesIO(b"\n" + inputs.read_bytes()), results, extract=True), in_memory) == {
        "succeeded": 26, "refused": 1, "failed": 1, "missing": 2
    }  # fmt: skip
    assert pq.read_table(in_memory).column("custom_id").to_pylist() == [f"req-{i}" for i in range(30)]
    with inputs.open("rb") as stream:
        opened = tmp_path / "opened.parquet"
        assert write_joined(iter_joined(stream, results, output_schema=Label), opened) == counts
    assert pq.read_table(opened).to_pylist() == pq.read_table(by_path).to_pylist()


@pytest.mark.parametrize("beside", [False, True], ids=["in-process", "child-process"])
def test_an_input_file_cut_short_fails_the_typed_join_as_it_fails_the_jsonl_join(tmp_path, monkeypatch, beside):
    """Long request lines have their ids read off the bytes: a last line cut short is still no JSON, not a row."""
    import msgspec

    from airflow_provider_openai_batch import typed_join

    rows = _structured(20)
    inputs, results = _files(tmp_path, rows)
    whole = inputs.read_bytes()
    assert len(whole) / 20 > 512  # long lines: the ids are taken off the bytes
    inputs.write_bytes(whole[:-60])  # the last line stops mid-request, as a full disk leaves it
    if beside:
        monkeypatch.setattr(typed_join, "_BESIDE_BYTES", 0)
    with pytest.raises(msgspec.DecodeError):
        write_joined(iter_joined(inputs, results), tmp_path / "joined.jsonl")
    with pytest.raises(msgspec.DecodeError):
        write_joined(iter_joined(inputs, results, output_schema=Label), tmp_path / "typed.parquet")
    assert not (tmp_path / "typed.parquet").exists()


def test_a_failed_typed_write_lets_go_of_the_joins_folder_at_once(tmp_path, monkeypatch):
    """
    The file's writer fails (a full disk) while the caller still holds the rows: the join's temporary folder and
    its open bucket files are gone when ``write_joined`` raises, not when the traceback is.
    """
    import os
    import tempfile

    rows = _structured(60)
    inputs, results = _files(tmp_path, rows)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(parquet, "ROWS_PER_GROUP", 10)
    real, calls = parquet.Layout.columns_of, []

    def full_disk(self, table):
        calls.append(table)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, table)

    monkeypatch.setattr(parquet.Layout, "columns_of", full_disk)
    opened = len(os.listdir("/proc/self/fd"))
    joined = iter_joined(inputs, results, output_schema=Label)
    with pytest.raises(OSError, match="No space left"):
        write_joined(joined, tmp_path / "typed.parquet")
    assert list(scratch.iterdir()) == [] and len(os.listdir("/proc/self/fd")) <= opened
    assert not (tmp_path / "typed.parquet").exists()


def test_a_joined_file_and_merged_rounds_give_the_same_table(tmp_path):
    rows = _structured(8, fates={1: "truncated"})
    inputs, results = _files(tmp_path, rows, failed=(4,))
    direct = tmp_path / "direct.parquet"
    write_joined(iter_joined(inputs, results, output_schema=Label), direct)
    joined = tmp_path / "joined.jsonl"
    write_joined(iter_joined(inputs, results), joined)
    # The job's way: a round's joined JSONL, merged, written typed at the end.
    merged = tmp_path / "merged.parquet"
    write_joined(iter_merged([joined]), merged, output_schema=Label)
    assert pq.read_table(merged).equals(pq.read_table(direct))
    # Rows that are objects (two rounds merged): the same columns, the later round's row.
    retry = tmp_path / "round-2.jsonl"
    answer = responses.output_line("req-4", rows[4]["url"], rows[4]["body"], 1)
    joined_row = JoinedRow(
        "req-4", "succeeded", rows[4]["body"], response=answer["response"]["body"], url=rows[4]["url"]
    )
    write_joined([joined_row], retry)
    two = tmp_path / "two.parquet"
    counts = write_joined(iter_merged([joined, retry]), two, output_schema=Label)
    assert counts == {"succeeded": 7, "truncated": 1}
    got = pq.read_table(two).to_pylist()
    assert got[4]["status"] == "succeeded" and got[4]["round"] == 1 and got[4]["sentiment"] is not None


def test_fields_arrow_cannot_hold_exactly_are_json_strings(tmp_path):
    schema = {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "size": {"anyOf": [{"type": "integer"}, {"type": "number"}]},
            "level": {"type": "string", "enum": ["low", "high"]},
            "maybe": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
            "tree": {"$ref": "#/$defs/node"},
        },
        "required": ["value", "size", "level", "maybe", "tree"],
        "additionalProperties": False,
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["label", "children"],
                "additionalProperties": False,
            }
        },
    }
    types = {field.name: field.type for field in parquet.columns(output_schema(schema))}
    assert types["value"] == pa.string() and types["size"] == pa.float64() and types["level"] == DICT
    assert types["maybe"] == pa.bool_()
    assert types["tree"] == pa.struct(
        [("label", pa.string()), ("children", pa.list_(pa.field("element", pa.string())))]
    )
    inputs, results = _files(tmp_path, _structured(3, schema))
    target = tmp_path / "x.parquet"
    assert write_joined(iter_joined(inputs, results, output_schema=schema), target) == {"succeeded": 3}
    got = pq.read_table(target).to_pylist()
    expected = responses.schema_value(schema, "req-0")
    assert json.loads(got[0]["value"]) == expected["value"]
    assert [json.loads(child) for child in got[0]["tree"]["children"]] == expected["tree"]["children"]


def test_a_field_named_like_a_reserved_column_is_refused_before_anything_is_read(tmp_path):
    schema = {
        "type": "object",
        "properties": {"status": {"type": "string"}},
        "required": ["status"],
        "additionalProperties": False,
    }
    nowhere = tmp_path / "does-not-exist.jsonl"
    with pytest.raises(ValueError, match="'status' has the name of a column"):
        write_joined(iter_joined(nowhere, [nowhere], output_schema=schema), tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()
    # JSONL has no such columns: the same schema is fine there.
    inputs, results = _files(tmp_path, _structured(1, schema))
    assert write_joined(iter_joined(inputs, results, output_schema=schema), tmp_path / "x.jsonl") == {"succeeded": 1}


def test_an_empty_join_writes_the_columns(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    target = tmp_path / "x.parquet"
    assert write_joined(iter_joined(empty, [empty], output_schema=Label), target) == {}
    table = pq.read_table(target)
    assert table.num_rows == 0 and "sentiment" in table.schema.names


def test_input_lines_of_any_style_join_alike(tmp_path):
    """The typed join reads an input's key off its bytes when it comes first; any other line is parsed."""
    ids = ["plain", 'quote"d', "back\\slash", "ünïcode", "key-later", "compact"]
    rows = [request_line(i, url="/v1/embeddings") | {"custom_id": cid} for i, cid in enumerate(ids)]
    for row in rows:  # long lines, as requests with prompts are: their keys are read off the bytes
        row["body"]["input"] += " and more" * 100
    lines = [json.dumps(row) for row in rows[:3]]
    lines.append(json.dumps(rows[3], ensure_ascii=False))
    lines.append(json.dumps({k: rows[4][k] for k in ("method", "url", "body", "custom_id")}))
    lines.append(json.dumps(rows[5], separators=(",", ":")))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_bytes(jsonl([responses.output_line(r["custom_id"], r["url"], r["body"], 1) for r in rows]))
    target = tmp_path / "x.parquet"
    assert write_joined(iter_joined(inputs, [out], extract=True), target) == {"succeeded": 6}
    table = pq.read_table(target)
    assert table.column("custom_id").to_pylist() == ids
    vectors = table.column("embedding").to_pylist()
    assert vectors == [pytest.approx(responses.embedding_vector(r["body"]["input"]), abs=1e-6) for r in rows]


class _FullDisk:
    """A destination that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self.room:
            raise OSError(28, "No space left on device")
        self.room -= size
        return size

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return 0

    @property
    def closed(self) -> bool:
        return False


def _in_thread(work: Any, seconds: float = 20) -> list[Any]:
    """Run ``work`` in a thread: [result] or [exception]; a call still running after ``seconds`` fails the test."""
    import threading

    got: list[Any] = []

    def run() -> None:
        try:
            got.append(work())
        except BaseException as error:  # handed to the test
            got.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    return got


@pytest.mark.parametrize("attempt", range(5))
def test_a_writer_that_fails_stops_the_write_with_its_error(monkeypatch, attempt):
    """The Parquet writer failing (here the disk fills up) ends the write with that error, while rows keep coming."""
    monkeypatch.setattr(parquet, "ROWS_PER_GROUP", 1)  # a row group per line: the join keeps offering groups
    layout = parquet.Layout(output_schema(Label))
    line = b'{"custom_id":"req-0","status":"failed","output":null,"output_text":null,"error":null,"round":0}\n'
    blocks = (line for _ in range(2_000))
    got = _in_thread(lambda: parquet.write_typed(blocks, _FullDisk(room=64 * attempt), layout))
    assert isinstance(got[0], OSError) and got[0].errno == 28
    assert next(blocks, None) is not None  # it stopped early, not after reading every row


def test_a_group_that_cannot_be_converted_stops_the_write_with_its_error(monkeypatch):
    """A row group the converting stage fails on ends the write with that error, while rows keep coming."""
    import msgspec

    monkeypatch.setattr(parquet, "ROWS_PER_GROUP", 1)
    layout = parquet.Layout(output_schema(Label))
    line = b'{"custom_id":"req-0","status":"failed","output":null,"output_text":null,"error":null,"round":0}\n'
    blocks = (b"{not json\n" if i == 3 else line for i in range(2_000))
    got = _in_thread(lambda: parquet.write_typed(blocks, _FullDisk(room=1 << 30), layout))
    assert isinstance(got[0], msgspec.DecodeError)
    assert next(blocks, None) is not None  # it stopped early, not after reading every row


class Counted(pydantic.BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    score: int
    items: list[Item]


@pytest.mark.parametrize("schema", [Counted, "dict"], ids=["pydantic-model", "json-schema-dict"])
def test_a_value_the_column_type_cannot_hold_makes_its_row_invalid_not_the_file(tmp_path, schema):
    """An integer past int64 (valid JSON, valid for the schema) is one invalid_output row; the others are written."""
    spec: Any = output_schema(Counted).schema if schema == "dict" else Counted
    rows = _structured(5, spec)
    inputs, results = _files(tmp_path, rows)
    answers = [json.loads(line) for line in results[0].read_text().splitlines()]
    huge = {"req-1": ("score", 10**20), "req-3": ("items", [{"name": "bolt", "quantity": -(2**63) - 1}])}
    for answer in answers:
        if answer["custom_id"] in huge:
            message = answer["response"]["body"]["choices"][0]["message"]
            field, value = huge[answer["custom_id"]]
            message["content"] = json.dumps({**json.loads(message["content"]), field: value})
    results[0].write_bytes(jsonl(answers))

    target = tmp_path / "typed.parquet"
    counts = write_joined(iter_joined(inputs, results, output_schema=spec), target)
    assert counts == {"succeeded": 3, "invalid_output": 2}
    got = pq.read_table(target).to_pylist()
    assert [r["status"] for r in got] == ["succeeded", "invalid_output", "succeeded", "invalid_output", "succeeded"]
    assert got[1]["score"] is None and json.loads(got[1]["output_text"])["score"] == 10**20  # the answer is kept
    assert got[1]["error"]["code"] == "invalid_output"
    assert "$.score" in got[1]["error"]["message"] and "int64" in got[1]["error"]["message"]
    assert "$.items[0].quantity" in got[3]["error"]["message"]
    assert json.loads(got[3]["output_text"])["items"][0]["quantity"] == -(2**63) - 1
    assert got[0]["score"] == responses.schema_value(output_schema(spec).schema, "req-0")["score"]
    # JSONL has no column types: there the same answer is a valid one.
    again = write_joined(iter_joined(inputs, results, output_schema=spec), tmp_path / "typed.jsonl")
    assert again == {"succeeded": 5}
