"""
Joined rows written as Parquet with real types (the ``[parquet]`` extra: ``pip install
'airflow-provider-openai-batch[parquet]'``).

With an output schema every field of it is a column of its own type: nested objects are structs, arrays lists,
enums dictionary-encoded strings, a field that may be null is nullable; without one, the endpoint's value is
(``output_text``, ``embedding`` as ``list<float32>``, ``flagged`` and ``categories``). Beside them: ``custom_id``,
``status``, ``output_text`` (the model's text where it is not in typed columns), ``error`` and ``round``.

Rows arrive as typed JSONL lines (``custom_id, status, output, output_text, error, round``; :class:`Layout` says
how to make them), a row group at a time: Arrow's JSON reader turns each group into columns in C++, in a thread of
its own while the rows of the next group are made and a third thread writes the group before, so memory holds a
few groups whatever the number of rows. A join's rows arrive as columns already (``typed_join.py`` reads its typed
lines while it reads the results): tables of :attr:`Layout.read_schema`, in input order. The rows written are
counted from the file's own ``status`` column. This module only writes: what a row is and what its status means
is ``outputs.py``'s and ``results.py``'s, except for one thing only the columns know: an answer holding a value its
column's type cannot (an integer past int64) is written as an ``invalid_output`` row, the answer kept as its text
(and counted as one: counts come from the file's ``status`` column).
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import msgspec

from airflow_provider_openai_batch.outputs import OutputKind, OutputSchema, _resolve

#: Columns every typed file has; an output schema's top-level fields may not take these names.
RESERVED_COLUMNS = ("custom_id", "status", "output_text", "error", "round")
#: Rows per row group: about 3-5 MB of typed lines at a time (memory holds about four groups, one at each stage
#: of ``write_typed``, and the allocator keeps what converting a group took: larger groups made peak memory grow
#: with the number of rows).
ROWS_PER_GROUP = 16_384
#: Bytes of typed lines per row group at most (long answers, large vectors).
BYTES_PER_GROUP = 16 << 20
#: The JSON reader splits a row group into blocks of this size to parse them in parallel (it holds about ten times
#: a block per block it parses).
_PARSE_BLOCK = 1 << 20

_encoder = msgspec.json.Encoder()


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.json
        import pyarrow.parquet
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "writing Parquet needs pyarrow: pip install 'airflow-provider-openai-batch[parquet]'"
        ) from error
    return pyarrow


Convert = Callable[[Any], Any]


@dataclass(frozen=True)
class _Column:
    """A schema node as an Arrow type; ``convert`` makes a value fit it when it is not JSON-native (else None)."""

    type: Any
    convert: Convert | None = None


def _as_json(value: Any) -> Any:
    return None if value is None else _encoder.encode(value).decode()


class Layout:
    """
    The columns of a typed file and how a row's outcome becomes a typed line for them.

    ``output_schema``: one column per top-level field of it. Without one, ``kind`` (what the endpoint answers
    with, ``outputs.kind_of_url``) picks the columns. A field the Arrow types cannot hold exactly (a union of
    different types, an object without properties, an array without ``items``, a recursive reference) is a string
    column of its JSON.
    """

    def __init__(self, output_schema: OutputSchema | None = None, kind: OutputKind = "text") -> None:
        pa = _pyarrow()
        self.output_schema = output_schema
        self.kind: OutputKind = kind if output_schema is None else "text"
        fields: list[tuple[str, _Column]] = []
        if output_schema is not None:
            root = output_schema.schema
            for name, node in (root.get("properties") or {}).items():
                if name in RESERVED_COLUMNS:
                    raise ValueError(
                        f"output_schema field {name!r} has the name of a column every typed Parquet file has "
                        f"({', '.join(RESERVED_COLUMNS)}): rename it (a Pydantic alias works), or write JSONL"
                    )
                fields.append((name, _column(pa, node, root, ())))
        elif kind == "embedding":
            vector = pa.list_(pa.field("element", pa.float32()))
            fields = [("embedding", _Column(vector)), ("embeddings", _Column(pa.list_(pa.field("element", vector))))]
        elif kind == "moderation":
            names = pa.list_(pa.field("element", pa.dictionary(pa.int32(), pa.string())))
            fields = [("flagged", _Column(pa.bool_())), ("categories", _Column(names))]
        self.fields = [name for name, _ in fields]
        converts = {name: column.convert for name, column in fields if column.convert is not None}
        #: Decode, convert and encode an output again only when some field needs it.
        self._convert: Convert | None = _struct_convert(converts) if converts else None
        #: A validated output goes into the columns as the JSON it is (:meth:`output` returns it unchanged).
        self.output_as_is = output_schema is not None and self._convert is None
        error = pa.struct(
            [
                ("code", pa.string()),
                ("message", pa.string()),
                ("type", pa.string()),
                ("param", pa.string()),
                ("status_code", pa.int32()),
                ("reason", pa.string()),
            ]
        )
        self.schema = pa.schema(
            [
                ("custom_id", pa.string()),
                ("status", pa.dictionary(pa.int8(), pa.string())),
                *[(name, column.type) for name, column in fields],
                ("output_text", pa.string()),
                ("error", error),
                ("round", pa.int32()),
            ]
        )
        output = pa.struct([(name, _undictionary(pa, column.type)) for name, column in fields])
        read = [("custom_id", pa.string()), ("status", pa.string())]
        if fields:
            read.append(("output", output))
        read += [("output_text", pa.string()), ("error", error), ("round", pa.int32())]
        #: The columns rows are read into from typed lines (before ``columns_of``: no dictionaries, ``output`` a
        #: struct of the fields).
        self.read_schema = pa.schema(read)

    def output(self, kind: OutputKind, value: Any) -> Any:
        """A succeeded row's output (a Python value, or the JSON bytes as ``msgspec.Raw``) as the line's ``output``."""
        if value is None:
            return None
        if self.output_schema is None:
            if self.kind != kind:
                return None
            if kind == "embedding":
                several = isinstance(value, list) and bool(value) and isinstance(value[0], (list, msgspec.Raw))
                return {"embeddings": value} if several else {"embedding": value}
            if kind == "moderation":
                return value
            return None
        if self._convert is None:
            return value
        if isinstance(value, msgspec.Raw):
            value = msgspec.json.decode(value)
        return self._convert(value) if isinstance(value, dict) else None

    @staticmethod
    def error(error: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """An error object with the error column's types (compatible servers send codes of any type)."""
        if not error:
            return None
        code = error.get("status_code")
        try:
            status = int(code) if code is not None else None
        except (TypeError, ValueError):
            status = None
        if status is not None and not -(1 << 31) <= status < 1 << 31:  # not an HTTP status: the column is int32
            status = None
        return {
            "code": _text(error.get("code")),
            "message": _text(error.get("message")),
            "type": _text(error.get("type")),
            "param": _text(error.get("param")),
            "status_code": status,
            "reason": _text(error.get("reason")),
        }

    def _read(self, data: bytes, threads: bool = True) -> Any:
        pa = _pyarrow()
        parse = pa.json.ParseOptions(explicit_schema=self.read_schema, unexpected_field_behavior="ignore")
        try:
            options = pa.json.ReadOptions(block_size=_PARSE_BLOCK, use_threads=threads)
            return pa.json.read_json(io.BytesIO(data), read_options=options, parse_options=parse)
        except pa.ArrowInvalid:  # a line longer than a block: the group is read as one block
            options = pa.json.ReadOptions(block_size=len(data) + 1, use_threads=threads)
            return pa.json.read_json(io.BytesIO(data), read_options=options, parse_options=parse)

    def _read_each(self, data: bytes) -> Any:
        """
        A group with a line the columns cannot hold, read in halves down to that line, which is read as an
        ``invalid_output`` row instead (:meth:`_unfit`): the other rows keep their values.
        """
        pa = _pyarrow()
        tables: list[Any] = []

        def read(lines: list[bytes]) -> None:
            try:
                tables.append(self._read(b"".join(lines)))
            except pa.ArrowInvalid as error:
                if len(lines) > 1:
                    half = len(lines) // 2
                    read(lines[:half])
                    read(lines[half:])
                else:
                    tables.append(self._read(self._unfit(lines[0], error)))

        read([line for line in data.splitlines(keepends=True) if line.strip()])
        return pa.concat_tables(tables)

    def _unfit(self, line: bytes, error: Exception) -> bytes:
        """
        A succeeded row whose output holds a value its column's type cannot (an integer past int64) as an
        ``invalid_output`` line: no output, the answer kept as ``output_text``, the error saying which value.
        """
        row = msgspec.json.decode(line)
        output = row.get("output") if isinstance(row, dict) else None
        if output is None:  # nothing of the row's own making to set aside: the line itself is wrong
            raise error
        where = _out_of_range(output, "$")
        message = (
            f"{where[0]}: {where[1]} does not fit the column type int64 (a 64-bit integer) of the Parquet file"
            if where
            else f"the answer does not fit the Parquet file's column types ({error})"
        )
        return (
            _encoder.encode(
                {
                    **row,
                    "status": "invalid_output",
                    "output": None,
                    "output_text": _encoder.encode(output).decode(),
                    "error": {"code": "invalid_output", "message": message},
                }
            )
            + b"\n"
        )

    def read_lines(self, data: bytes, threads: bool = True) -> Any:
        """
        Typed lines (whole lines) as a table of :attr:`read_schema`; a row its columns cannot hold is unfit.
        ``threads=False``: read on this thread alone (another core is busy with the join's own Python).
        """
        pa = _pyarrow()
        try:
            return self._read(data, threads)
        except pa.ArrowInvalid:
            return self._read_each(data)

    def columns_of(self, read: Any) -> Any:
        """A table of :attr:`read_schema` as the file's columns (:attr:`schema`)."""
        pa = _pyarrow()
        columns = [read.column("custom_id"), read.column("status")]
        if self.fields:
            output = read.column("output").combine_chunks()
            columns += output.flatten()
        columns += [read.column("output_text"), read.column("error"), read.column("round")]
        arrays = [column.cast(field.type) for column, field in zip(columns, self.schema, strict=True)]
        return pa.Table.from_arrays(arrays, schema=self.schema)


_INT64 = range(-(1 << 63), 1 << 63)


def _out_of_range(value: Any, path: str) -> tuple[str, int] | None:
    """The first integer in ``value`` an int64 column cannot hold, with its JSON path."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value in _INT64 else (path, value)
    if isinstance(value, dict):
        for key, item in value.items():
            if (found := _out_of_range(item, f"{path}.{key}")) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _out_of_range(item, f"{path}[{i}]")) is not None:
                return found
    return None


def columns(output_schema: OutputSchema | None = None, kind: OutputKind = "text") -> Any:
    """The Arrow schema of a typed file (raises ``ValueError`` for a field named like a reserved column)."""
    return Layout(output_schema, kind).schema


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return _encoder.encode(value).decode()


def _undictionary(pa: Any, kind: Any) -> Any:
    """``kind`` with its dictionaries as plain strings: the JSON reader's types (it builds no dictionaries)."""
    if pa.types.is_dictionary(kind):
        return kind.value_type
    if pa.types.is_list(kind):
        return pa.list_(pa.field(kind.value_field.name, _undictionary(pa, kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([(f.name, _undictionary(pa, f.type)) for f in kind])
    return kind


def _column(pa: Any, node: Any, root: Mapping[str, Any], refs: tuple[str, ...]) -> _Column:
    """A (strict-mode) JSON Schema node as an Arrow column type."""
    json_leaf = _Column(pa.string(), _as_json)
    if not isinstance(node, Mapping):
        return json_leaf
    ref = node.get("$ref")
    if ref is not None:
        if ref in refs:
            return json_leaf
        return _column(pa, _resolve(root, ref, "$"), root, (*refs, ref))
    if "enum" in node or "const" in node:
        values = [v for v in (node["enum"] if "enum" in node else [node["const"]]) if v is not None]
        if values and all(isinstance(v, str) for v in values):
            return _Column(pa.dictionary(pa.int32(), pa.string()))
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return _Column(pa.int64())
        if values and all(isinstance(v, bool) for v in values):
            return _Column(pa.bool_())
        return json_leaf
    variants: list[Any] | None = None
    if "anyOf" in node:
        variants = list(node["anyOf"])
    elif isinstance(node.get("type"), list):
        variants = [{**node, "type": t} for t in node["type"]]
    if variants is not None:
        kept = [v for v in variants if not (isinstance(v, Mapping) and v.get("type") == "null")]
        if not kept:
            return _Column(pa.null())
        if len(kept) == 1:
            return _column(pa, kept[0], root, refs)
        parts = [_column(pa, v, root, refs) for v in kept]
        if all(p.convert is None and pa.types.is_dictionary(p.type) for p in parts):
            return parts[0]
        if all(p.convert is None and (pa.types.is_int64(p.type) or pa.types.is_float64(p.type)) for p in parts):
            return _Column(pa.float64())
        return json_leaf
    kind = node.get("type")
    if kind == "string":
        return _Column(pa.string())
    if kind == "integer":
        return _Column(pa.int64())
    if kind == "number":
        return _Column(pa.float64())
    if kind == "boolean":
        return _Column(pa.bool_())
    if kind == "null":
        return _Column(pa.null())
    if kind == "array" and "items" in node:
        item = _column(pa, node["items"], root, refs)
        convert = item.convert
        return _Column(
            pa.list_(pa.field("element", item.type)),
            None if convert is None else (lambda v: None if v is None else [convert(x) for x in v]),
        )
    if (kind == "object" or "properties" in node) and node.get("properties"):
        children = {name: _column(pa, child, root, refs) for name, child in node["properties"].items()}
        converts = {name: c.convert for name, c in children.items() if c.convert is not None}
        return _Column(
            pa.struct([(name, c.type) for name, c in children.items()]),
            _struct_convert(converts) if converts else None,
        )
    return json_leaf


def _struct_convert(converts: dict[str, Convert]) -> Convert:
    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            return None
        return {**value, **{name: fn(value.get(name)) for name, fn in converts.items()}}

    return convert


_DONE = object()


def write_typed(
    rows: Iterable[bytes] | Iterable[Any], out: IO[bytes], layout: Layout | Callable[[], Layout], *, read: bool = False
) -> dict[str, int]:
    """
    Write blocks of typed JSONL lines (whole lines each) to ``out`` as Parquet; returns the rows written with each
    status (counted from the file's ``status`` column, so a row written as ``invalid_output`` because its value
    did not fit its column counts as one). ``read=True``: ``rows`` are tables of the layout's ``read_schema``
    instead (the typed join's, ``typed_join.py``), one row group each.

    ``layout`` may be a function that gives it, asked once the first row group is gathered (a join knows its
    endpoint only once it has read its first input). Row groups are gathered here, turned into columns in a second
    thread and written in a third, so a group is converted while the one before it is written (Arrow's reader and
    Parquet's writer leave Python's lock while they work, so they run side by side on two cores). Each hand-over
    holds one group, so memory holds a few groups whatever the number of rows.
    """
    pa = _pyarrow()
    import pyarrow.compute as pc

    groups: queue.Queue[Any] = queue.Queue(maxsize=1)
    tables: queue.Queue[Any] = queue.Queue(maxsize=1)
    failure: list[BaseException] = []
    counts: dict[str, int] = {}
    chosen: list[Layout] = []

    def drain(handover: queue.Queue[Any], item: Any) -> None:
        # Take whatever is still offered, up to the end mark: the stage before stops at its next item, and its
        # last put (the end mark) always finds room.
        while item is not _DONE:
            item = handover.get()

    def convert() -> None:
        data = groups.get()
        try:
            chosen.append(layout() if callable(layout) else layout)
            while data is not _DONE and not failure:
                table = data if read else chosen[0].read_lines(data)
                for status in pc.value_counts(table.column("status")).to_pylist():
                    counts[status["values"]] = counts.get(status["values"], 0) + status["counts"]
                tables.put(chosen[0].columns_of(table))
                data = groups.get()
        except BaseException as error:
            failure.append(error)
        finally:
            tables.put(_DONE)
            drain(groups, data)

    def write() -> None:
        table = tables.get()
        try:
            if table is _DONE and not chosen:
                return  # the layout itself failed: nothing to write
            with pa.parquet.ParquetWriter(out, chosen[0].schema) as writer:
                while table is not _DONE:
                    writer.write_table(table, row_group_size=max(1, table.num_rows))
                    table = tables.get()
        except BaseException as error:
            failure.append(error)
        drain(tables, table)

    stages = [
        threading.Thread(target=convert, name="parquet-convert", daemon=True),
        threading.Thread(target=write, name="parquet-writer", daemon=True),
    ]
    for stage in stages:
        stage.start()
    try:
        for data in rows if read else _groups(rows):
            if failure:
                break
            if not read or data.num_rows:  # type: ignore[union-attr]
                groups.put(data)
    finally:
        groups.put(_DONE)
        for stage in stages:
            stage.join()
    if failure:
        raise failure[0]
    return counts


def _groups(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Blocks of whole lines gathered into row groups of ``ROWS_PER_GROUP`` rows or ``BYTES_PER_GROUP`` bytes."""
    held: list[bytes] = []
    rows = size = 0
    for block in lines:
        if not block:
            continue
        held.append(block)
        rows += block.count(b"\n")
        size += len(block)
        if rows >= ROWS_PER_GROUP or size >= BYTES_PER_GROUP:
            yield b"".join(held)
            held, rows, size = [], 0, 0
    if held:
        yield b"".join(held)


# --- without types: today's layout ----------------------------------------------------------------------


def write_json_columns(rows: Iterable[Any], out: IO[bytes], chunk: int = 50_000) -> None:
    """Joined rows as Parquet whose ``request``, ``response`` and ``error`` columns hold JSON strings."""
    import itertools

    pa = _pyarrow()
    schema = pa.schema(
        [(name, pa.string()) for name in ("custom_id", "status", "url", "request", "response", "error")]
        + [("round", pa.int32())]
    )

    def dumps(value: Any) -> str | None:
        return None if value is None else _encoder.encode(value).decode()

    iterator = iter(rows)
    with pa.parquet.ParquetWriter(out, schema) as writer:
        while batch := list(itertools.islice(iterator, chunk)):
            table = {
                "custom_id": [r.custom_id for r in batch],
                "status": [r.status for r in batch],
                "url": [r.url for r in batch],
                "request": [dumps(r.request) for r in batch],
                "response": [dumps(r.response) for r in batch],
                "error": [dumps(r.error) for r in batch],
                "round": [r.round for r in batch],
            }
            writer.write_table(pa.table(table, schema=schema))
