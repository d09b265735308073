"""
Results joined to their inputs by ``custom_id``, in input order, streaming.

OpenAI writes results in its own order, splits them over an output and an error file, and leaves nothing for
requests that never ran. Downstream code wants one row per request it sent. The join is a hash join that spills
to disk: result and input lines are partitioned by ``custom_id`` into bucket files, each bucket is joined in
memory, and the buckets' rows are read back in input order, so memory stays flat whether a batch holds 100
requests or a million across many shards. Only ``custom_id``, ``url`` and the response status are decoded: request
and response bodies pass through as the bytes read (msgspec ``Raw``), which is most of the speed.

Asked for (``output_schema=`` or ``extract=True``), each answered row also gets its ``output`` and a finer status
(``invalid_output``, ``refused``, ``truncated``: ``outputs.py`` reads the body); a typed Parquet destination
(``parquet.py`` writes it) is then joined from compact lines that carry only what its columns hold, kept in the
buckets as Arrow columns (``typed_join.py``), and from the inputs only their keys.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import msgspec

from airflow_provider_openai_batch.batch_file import ResultLine, iter_lines
from airflow_provider_openai_batch.exceptions import is_transient_status
from airflow_provider_openai_batch.join_keys import (
    FANOUT,
    HASH_BITS,
    chunks,
    key_line_chunks,
    key_lines,
)
from airflow_provider_openai_batch.join_keys import decoded as _decoded
from airflow_provider_openai_batch.join_keys import spill as _spill
from airflow_provider_openai_batch.outputs import (
    OUTPUT_STATUSES,
    Answer,
    Outcome,
    OutputSchema,
    OutputSchemaLike,
    answer_outcome,
    as_value,
    body_outcome,
    kind_of_url,
    output_schema_cached,
    plain_output,
)
from airflow_provider_openai_batch.storage import Destination, Source, atomic_writer, open_source, put_back

#: The statuses of a join without extraction; with it, ``outputs.RowStatus`` (three more).
RequestStatus = Literal["succeeded", "failed", "expired", "cancelled", "missing"]
_UNRUN = {"batch_expired": "expired", "batch_cancelled": "cancelled"}


class JoinedRow(msgspec.Struct, omit_defaults=False):
    """One request and what became of it (``url`` and ``request`` are what was sent, so it can be sent again)."""

    custom_id: str
    status: str
    request: dict[str, Any] | None
    #: The response body: an object from OpenAI; a compatible server's body that is not JSON stays a string.
    response: Any = None
    error: dict[str, Any] | None = None
    url: str | None = None
    round: int = 0
    #: What the answer holds (``outputs.row_outcome``): set only by a join or write asked to extract (``None`` for
    #: a row that is not ``succeeded``); otherwise ``msgspec.UNSET``, and absent from the row's JSON line.
    output: Any = msgspec.UNSET


_result_decoder = msgspec.json.Decoder(ResultLine)
_encoder = msgspec.json.Encoder()


def result_status(response: dict[str, Any] | None, error: dict[str, Any] | None) -> RequestStatus:
    """What one result line means for its request: ``batch_expired`` / ``batch_cancelled`` never ran."""
    if error:
        return _UNRUN.get(str(error.get("code")), "failed")  # type: ignore[return-value]
    if response and _status_code(response) == 200:
        return "succeeded"
    return "failed"


def _status_code(response: dict[str, Any]) -> int:
    try:
        return int(response.get("status_code") or 0)
    except (TypeError, ValueError):
        return 0


def response_body(response: dict[str, Any] | None) -> Any:
    """
    A result line's ``response.body``. OpenAI sends an object; some compatible servers send the same JSON encoded
    as a string, which is decoded here (a string that is not JSON is kept as it is).
    """
    body = (response or {}).get("body")
    if isinstance(body, (str, bytes)):
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            return body
    return body


@contextlib.contextmanager
def _scratch_db(schema: str) -> Iterator[sqlite3.Connection]:
    """A throw-away SQLite file: an index on disk, so memory does not grow with the number of requests."""
    with tempfile.TemporaryDirectory(prefix="openai-batch-index-") as folder:
        # Opened without the same-thread check: a generator that holds it may be resumed from another thread.
        db = sqlite3.connect(Path(folder) / "index.sqlite", check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            # A bounded page cache (16 MB): enough to build and search the index without going to the file for
            # every page, and the same whether the join holds a thousand rows or ten million.
            db.execute("PRAGMA cache_size=-16384")
            db.execute(schema)
            yield db
        finally:
            db.close()


_NULL = msgspec.Raw(b"null")


class _RawRequest(msgspec.Struct, gc=False):
    """An input line with its body kept as the bytes that were sent: it goes into the joined row unparsed."""

    custom_id: str
    body: msgspec.Raw = _NULL
    url: str | None = None


class _RawResponse(msgspec.Struct, gc=False):
    status_code: Any = None
    body: msgspec.Raw = _NULL


class _RawResult(msgspec.Struct, gc=False):
    """A result line with the response body kept as bytes (the common case passes it through untouched)."""

    custom_id: str
    response: _RawResponse | None = None
    error: dict[str, Any] | None = None


class _RawJoined(msgspec.Struct, omit_defaults=False, gc=False):
    """:class:`JoinedRow` with bytes for its JSON fields: encodes to the same line, field for field."""

    custom_id: str
    status: str
    request: msgspec.Raw
    response: Any = None
    error: Any = None
    url: str | None = None
    round: int = 0
    output: Any = msgspec.UNSET


_raw_request_decoder = msgspec.json.Decoder(_RawRequest)
_raw_result_decoder = msgspec.json.Decoder(_RawResult)
_joined_decoder = msgspec.json.Decoder(JoinedRow)
#: Buckets per level of the join's partitioning (``join_keys.py``).
_FANOUT, _HASH_BITS = FANOUT, HASH_BITS
#: A bucket whose result lines take more than this is split again by other bits of the hash, so the index of one
#: bucket (held in memory) stays about this small whatever the number of rows. Five levels: 64^5 buckets.
_BUCKET_BYTES = 16 << 20
_MAX_DEPTH = 4
#: Lines read, partitioned or merged at a time (a size hint in bytes for ``readlines``).
_CHUNK_BYTES = 1 << 20
_BUFFER = 1 << 16


def _chunks(stream: IO[bytes]) -> Iterator[list[bytes]]:
    """A JSONL stream as lists of whole lines, each ending in a newline."""
    return chunks(stream, _CHUNK_BYTES)


def _source_chunks(sources: Iterable[Source]) -> Iterator[list[bytes]]:
    for source in sources:
        with open_source(source) as stream:
            yield from _chunks(stream)


def _file_chunks(path: Path) -> Iterator[list[bytes]]:
    with path.open("rb", buffering=_BUFFER) as stream:
        yield from _chunks(stream)


def _input_key_lines(sources: Iterable[Source]) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """
    The key line of every input line (:func:`key_lines`, blank lines left out), a chunk at a time, as
    ``(keys, lines)`` for :func:`_spill` (the same list: the key lines are what a typed join keeps of its inputs).
    """
    return key_line_chunks(_source_chunks(sources))


#: Joins one bucket: (its inputs' file, its results' file, where the joined lines go, the counts).
BucketJoin = Callable[[Path, Path, IO[bytes], "_Counts"], None]


class Buckets:
    """
    How a join keeps its results in bucket files and gives its rows back: here JSONL lines, joined by a
    :data:`BucketJoin` and read back as blocks of lines. ``typed_join.ArrowBuckets`` keeps Arrow columns instead.
    """

    def __init__(self, join_bucket: BucketJoin | None = None) -> None:
        self.join_bucket = join_bucket

    def spill(self, results: Iterable[Any], folder: Path, shift: int) -> list[int]:
        """Results into bucket files ``r<bucket>``; returns their sizes in bytes."""
        return _spill(results, folder, "r", shift)

    def results(self, folder: Path, bucket: int) -> Iterable[Any]:
        """A bucket's results as :meth:`spill` takes them (to split it a level down)."""
        return _file_chunks(folder / f"r{bucket}")

    def inputs(self, path: Path) -> Iterable[Any]:
        """A bucket's inputs as :func:`_spill` takes them (to split it a level down)."""
        return _file_chunks(path)

    def join(self, in_path: Path, folder: Path, bucket: int, out_path: Path, counts: _Counts) -> None:
        """A bucket's rows in the order of its inputs (``in_path``), into ``out_path``."""
        assert self.join_bucket is not None
        with out_path.open("wb", buffering=_BUFFER) as out:
            self.join_bucket(in_path, folder / f"r{bucket}", out, counts)

    def write(self, out_path: Path, joined: Iterable[Any]) -> None:
        """Rows joined a level down (as :meth:`in_order` gives them) into ``out_path``."""
        with out_path.open("wb", buffering=_BUFFER) as out:
            for block in joined:
                out.write(block)

    def drop(self, folder: Path, bucket: int) -> None:
        (folder / f"r{bucket}").unlink(missing_ok=True)

    def in_order(self, folder: Path) -> Iterator[Any]:
        return _in_order(folder)

    def inputs_beside(self, folder: Path, shift: int) -> Beside | None:
        """
        The inputs' spill started beside the results' (by another process), or ``None``: the join spills them
        itself, after the results.
        """
        return None


class Beside(Protocol):
    """The inputs being spilt beside the results (``Buckets.inputs_beside``)."""

    def wait(self) -> bool:
        """Wait for it; whether the inputs are spilt (if not, the join spills them itself)."""

    def stop(self) -> None:
        """Stop it: the join is failing."""


def _join_blocks(
    inputs: Iterable[list[bytes] | tuple[list[Any], list[bytes]]],
    results: Iterable[Any],
    folder: Path,
    counts: _Counts,
    buckets: Buckets,
    depth: int = 0,
) -> Iterator[Any]:
    """
    Joined rows in the order of ``inputs``, in blocks: a hash join that spills to disk (Grace).

    Result and input lines go to ``_FANOUT`` bucket files by the hash of their ``custom_id``, and the bucket of
    every input, in input order, to an order file. Each bucket is then joined on its own (its results indexed in
    memory, its inputs streamed in order), and the buckets' joined rows are read back in the order file's order.
    Memory holds one bucket's results: a bucket over ``_BUCKET_BYTES`` is split the same way again, a level down.
    ``buckets`` keeps the results and gives the rows (JSONL lines, or Arrow columns).
    """
    shift = depth * _HASH_BITS
    beside = buckets.inputs_beside(folder, shift) if depth == 0 else None
    try:
        sizes = buckets.spill(results, folder, shift)
        spilt = beside is not None and beside.wait()
    except BaseException:
        if beside is not None:
            beside.stop()
        raise
    if not spilt:
        with (folder / "order").open("wb") as order:
            _spill(inputs, folder, "i", shift, order)
    for bucket in range(_FANOUT):
        in_path, out_path = folder / f"i{bucket}", folder / f"o{bucket}"
        if sizes[bucket] > _BUCKET_BYTES and depth < _MAX_DEPTH:
            below = folder / f"d{bucket}"
            below.mkdir()
            rows = _join_blocks(
                buckets.inputs(in_path), buckets.results(folder, bucket), below, counts, buckets, depth + 1
            )
            buckets.write(out_path, rows)
            shutil.rmtree(below)
        else:
            buckets.join(in_path, folder, bucket, out_path, counts)
        in_path.unlink()
        buckets.drop(folder, bucket)
    yield from buckets.in_order(folder)


#: Rows read back in input order at a time (bytes of the order file: one a row).
_ORDER_BYTES = 1 << 14


def _in_order(folder: Path) -> Iterator[bytes]:
    """
    The buckets' joined lines (``o<bucket>``) in the order file's order, in blocks. Each bucket's lines are read
    ahead a block at a time, as many as the next stretch of the order needs, and taken one by one off a queue:
    a read per row cost more than the rest of the join's own work on a typed row.
    """
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context((folder / f"o{b}").open("rb", buffering=_BUFFER)) for b in range(_FANOUT)]
        held: list[collections.deque[bytes]] = [collections.deque() for _ in range(_FANOUT)]
        takes = [pending.popleft for pending in held]
        with (folder / "order").open("rb") as order:
            while sequence := order.read(_ORDER_BYTES):
                for bucket, wanted in collections.Counter(sequence).items():
                    pending, read = held[bucket], readers[bucket].readlines
                    while len(pending) < wanted and (more := read(_BUFFER)):
                        pending.extend(more)
                yield b"".join([takes[bucket]() for bucket in sequence])


def _join_bucket(in_path: Path, result_path: Path, out: IO[bytes], counts: _Counts) -> None:
    """One bucket: its results indexed in memory (a later line for the same id wins), its inputs joined in order."""
    index = _index(_file_chunks(result_path))
    raw, total, before = msgspec.Raw, 0, sum(counts.values())
    for lines in _file_chunks(in_path):
        requests = _decoded(_raw_request_decoder.decode, lines)
        found = map(index.get, [r.custom_id for r in requests])
        rows = [
            _RawJoined(r.custom_id, "succeeded", r.body, f, None, r.url) if type(f) is raw else _other_row(r, f, counts)  # type: ignore[arg-type]
            for r, f in zip(requests, found, strict=True)
        ]
        total += len(rows)
        out.write(_encoder.encode_lines(rows))
    plain = total - (sum(counts.values()) - before)
    if plain:
        counts.add("succeeded", plain)


def _index(results: Iterable[list[bytes]]) -> dict[str, msgspec.Raw | _RawResult]:
    """
    A bucket's results by ``custom_id``: the body of each plain success (an answer that is not a JSON string, which
    some compatible servers send for a JSON body), and the whole result otherwise.
    """
    index: dict[str, msgspec.Raw | _RawResult] = {}
    for lines in results:
        index.update(
            {
                r.custom_id: (
                    r.response.body
                    if r.error is None
                    and r.response is not None
                    and r.response.status_code == 200
                    and memoryview(r.response.body)[0] != 34  # '"'
                    else r
                )
                for r in _decoded(_raw_result_decoder.decode, lines)
            }
        )
    return index


def _extracting_join_bucket(extract: _Extract) -> BucketJoin:
    """:func:`_join_bucket` whose rows also carry ``output``, with the status the answer gives (``outputs.py``)."""

    def join_bucket(in_path: Path, result_path: Path, out: IO[bytes], counts: _Counts) -> None:
        index, raw, outcome = _index(_file_chunks(result_path)), msgspec.Raw, extract.outcome
        for lines in _file_chunks(in_path):
            rows: list[Any] = []
            for request in _decoded(_raw_request_decoder.decode, lines):
                found = index.get(request.custom_id)
                if type(found) is raw:
                    got = outcome(found)
                    row: Any = _RawJoined(
                        request.custom_id, got.status, request.body, found, got.error, request.url, 0, got.output
                    )
                else:
                    row = _other_row(request, found, counts, extract)  # type: ignore[arg-type]
                    rows.append(row)
                    continue
                counts.add(row.status)
                rows.append(row)
            out.write(_encoder.encode_lines(rows))

    return join_bucket


def _other_row(
    request: _RawRequest, result: _RawResult | None, counts: _Counts, extract: _Extract | None = None
) -> _RawJoined | JoinedRow:
    """An input without a result (``missing``), or with any result but a plain success."""
    output = msgspec.UNSET if extract is None else None
    if result is None:
        counts.add("missing")
        return _RawJoined(request.custom_id, "missing", request.body, None, None, request.url, 0, output)
    raw = result.response
    response = None if raw is None else {"status_code": raw.status_code, "body": msgspec.json.decode(raw.body)}
    row = JoinedRow(
        request.custom_id,
        result_status(response, result.error),
        msgspec.json.decode(request.body),
        response=response_body(response),
        error=result.error or _error_of(response),
        url=request.url,
        output=output,
    )
    if extract is not None and row.status == "succeeded":
        got = extract.outcome(row.response)
        row.status, row.output, row.error = got.status, got.output, got.error
    counts.add(row.status)
    return row


class _Counts(dict[str, int]):
    """Rows per status."""

    def add(self, status: str, rows: int = 1) -> None:
        self[status] = self.get(status, 0) + rows


class _Extract:
    """What a join or a write was asked to read out of each answer: the output, validated when a schema is given."""

    def __init__(self, schema: OutputSchema | None) -> None:
        self.schema = schema

    def outcome(self, body: Any) -> Outcome:
        return body_outcome(body, self.schema)

    def layout(self, url: str | None) -> Any:
        """The typed Parquet layout for rows of ``url``'s endpoint (the schema's fields, when there is one)."""
        from airflow_provider_openai_batch.parquet import Layout

        return Layout(self.schema, kind_of_url(url))


def _extraction(output_schema: OutputSchemaLike | None, extract: bool) -> _Extract | None:
    if output_schema is not None:
        return _Extract(output_schema_cached(output_schema))
    return _Extract(None) if extract else None


Make = Callable[["_Counts", "_Extract | None"], Iterator[bytes]]
MakeTyped = Callable[["_Extract", "_LayoutSlot"], Iterator[Any]]


class _LayoutSlot:
    """Where a typed join puts the layout once it knows the endpoint (before its first line)."""

    def __init__(self, extract: _Extract) -> None:
        self.extract = extract
        self.layout: Any = None

    def set(self, url: str | None) -> Any:
        if self.layout is None:
            self.layout = self.extract.layout(url)
        return self.layout

    def get(self) -> Any:
        return self.set(None)


class _Joined(Iterator[JoinedRow]):
    """
    Joined rows made as JSONL blocks: :func:`write_joined` writes the blocks as they are, without building a row
    object each; iterating decodes them. ``make`` fills ``counts`` (rows per status) as it goes; ``typed`` makes
    the rows of a typed Parquet file instead: its compact lines, or (``typed_tables``, the join's) tables of the
    layout's read schema. Nothing is read until the first row or block is asked for.
    """

    def __init__(
        self, make: Make, extract: _Extract | None = None, typed: MakeTyped | None = None, typed_tables: bool = False
    ) -> None:
        self.counts = _Counts()
        self.extract = extract
        self._make, self._typed = make, typed
        self.typed_tables = typed_tables
        self._blocks: Iterator[bytes] | None = None
        self._rows: Iterator[JoinedRow] | None = None

    @property
    def started(self) -> bool:
        return self._blocks is not None

    def blocks(self, extract: _Extract | None = None) -> Iterator[bytes]:
        """The joined JSONL, a block of whole lines at a time (extracting as asked, if not started yet)."""
        if self._blocks is None:
            self.extract = extract or self.extract
            self._blocks = self._make(self.counts, self.extract)
        return self._blocks

    def typed_blocks(self, extract: _Extract, slot: _LayoutSlot) -> Iterator[Any] | None:
        """
        The typed rows for ``slot``'s layout (lines, or tables: :attr:`typed_tables`), in input order, or ``None``
        when this join cannot make them (already started).
        """
        if self._typed is None or self._blocks is not None:
            return None
        self.extract = extract
        self._blocks = self._typed(extract, slot)
        return self._blocks

    def __next__(self) -> JoinedRow:
        if self._rows is None:
            decode = _joined_decoder.decode
            self._rows = (decode(line) for block in self.blocks() for line in block.split(b"\n") if line)
        return next(self._rows)


def _join_all(
    inputs: list[Source], results: list[Source], counts: _Counts, extract: _Extract | None
) -> Iterator[bytes]:
    buckets = Buckets(_join_bucket if extract is None else _extracting_join_bucket(extract))
    with tempfile.TemporaryDirectory(prefix="openai-batch-join-") as folder:
        yield from _join_blocks(_source_chunks(inputs), _source_chunks(results), Path(folder), counts, buckets)


# --- typed lines: what a typed Parquet file holds of each row -------------------------------------------


class _TypedLine(msgspec.Struct, omit_defaults=False, gc=False):
    """One row as ``parquet.Layout`` reads it: its columns and nothing else (no request, no response)."""

    custom_id: str
    status: str
    output: Any = None
    output_text: str | None = None
    error: dict[str, Any] | None = None
    round: int = 0


class _KeyUrl(msgspec.Struct, gc=False):
    custom_id: str
    url: str | None = None


_key_url_decoder = msgspec.json.Decoder(_KeyUrl)


def _typed_line(
    custom_id: str, status: str, got: Outcome | None, error: Any, layout: Any, extract: _Extract, round_: int = 0
) -> _TypedLine:
    """A row's typed line: the output in the layout's columns, the text where the columns do not hold it."""
    if got is None:
        return _TypedLine(custom_id, status, None, None, layout.error(error) if error else None, round_)
    if got.status == "succeeded":
        text = None if extract.schema is not None else got.text
        return _TypedLine(custom_id, "succeeded", layout.output(got.kind, got.output), text, None, round_)
    return _TypedLine(custom_id, got.status, None, got.text, layout.error(got.error), round_)


class _AnswerResponse(msgspec.Struct, gc=False):
    status_code: Any = None
    body: Answer | str | None = None


class _AnswerResult(msgspec.Struct, gc=False):
    """A result line decoded in one pass with what its answer's outcome needs (``outputs.Answer``)."""

    custom_id: str
    response: _AnswerResponse | None = None
    error: dict[str, Any] | None = None


_answer_result_decoder = msgspec.json.Decoder(_AnswerResult)


def _typed_results(lines: list[bytes], extract: _Extract, layout: Any) -> tuple[list[bytes], bytes]:
    """
    Result lines (an output or error file's) as a block of typed lines, with their key lines (:func:`key_lines`):
    each answer read once, here, in one pass over its bytes (a line whose answer has another shape is read the
    general way).
    """
    keys, typed = [], []
    decode, schema = _answer_result_decoder.decode, extract.schema
    as_is = layout.output_as_is
    for line in lines:
        try:
            r = decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError):
            if not line.strip():
                continue
            key, typed_line = _typed_result(_raw_result_decoder.decode(line), extract, layout)
        else:
            raw = r.response
            if r.error or raw is None or not isinstance(raw.body, Answer) or _code(raw.status_code) != 200:
                key, typed_line = _typed_result(_raw_result_decoder.decode(line), extract, layout)
            else:
                key = r.custom_id
                value = plain_output(raw.body, schema) if as_is and schema is not None else None
                if value is not None:
                    typed_line = _TypedLine(key, "succeeded", msgspec.Raw(value))
                else:
                    got = answer_outcome(raw.body, schema)
                    typed_line = _typed_line(key, "succeeded", got, None, layout, extract)
        keys.append(key)
        typed.append(typed_line)
    return key_lines(keys), _encoder.encode_lines(typed)


def _code(status_code: Any) -> int:
    return status_code if type(status_code) is int else _status_code({"status_code": status_code})


def _typed_result(r: _RawResult, extract: _Extract, layout: Any) -> tuple[str, _TypedLine]:
    """One result line as a typed line, the general way (errors, bodies sent as a JSON string)."""
    if r.error:
        status = _UNRUN.get(str(r.error.get("code") or r.error.get("type")), "failed")
        return r.custom_id, _typed_line(r.custom_id, status, None, r.error, layout, extract)
    raw = r.response
    if raw is not None and _code(raw.status_code) == 200:
        body: Any = raw.body
        if memoryview(body)[0] == 34:  # '"': a compatible server's body sent as a JSON string
            body = response_body({"body": msgspec.json.decode(body)})
        return r.custom_id, _typed_line(r.custom_id, "succeeded", extract.outcome(body), None, layout, extract)
    response = None if raw is None else {"status_code": raw.status_code, "body": msgspec.json.decode(raw.body)}
    return r.custom_id, _typed_line(r.custom_id, "failed", None, _error_of(response), layout, extract)


_key_line_decoder = msgspec.json.Decoder(str)


def missing_line(key_line: bytes) -> bytes:
    """The typed line of an input without a result, from its key line."""
    return _encoder.encode(_TypedLine(_key_line_decoder.decode(key_line), "missing")) + b"\n"


def _typed_join(inputs: list[Source], results: list[Source], extract: _Extract, slot: _LayoutSlot) -> Iterator[Any]:
    """
    The join for a typed Parquet file, as tables of the layout's read schema in input order (``typed_join.py``):
    inputs spill as their keys only, results as typed lines (the layout is the endpoint's, known from the first
    input's ``url`` before any result is read), so the buckets hold a few dozen bytes a row instead of the request
    and the response. Rows are counted by the Parquet writer.
    """
    from airflow_provider_openai_batch.typed_join import typed_tables

    url, inputs = _first_url(inputs)
    layout = slot.set(url)
    typed = (_typed_results(chunk, extract, layout) for chunk in _source_chunks(results))
    yield from typed_tables(inputs, typed, layout)


def _first_url(inputs: list[Source]) -> tuple[str | None, list[Source]]:
    """
    The ``url`` of the first input line (``None`` when there is none): the endpoint every input is for; and the
    inputs, a stream among them given back whole (the lines read from it put back before the rest of it).
    """
    given = list(inputs)
    for i, source in enumerate(given):
        with open_source(source) as stream:
            head = []
            for line in stream:
                head.append(line)
                if line.strip():
                    break
            if stream is source:  # the caller's own stream: what was read of it is put back
                given[i] = put_back(b"".join(head), stream)
            if head and head[-1].strip():
                return _key_url_decoder.decode(head[-1]).url, given
    return None, given


class _JoinedRaw(msgspec.Struct, omit_defaults=False, gc=False):
    """A joined line with its bodies kept as bytes: extracting from a joined file decodes nothing else."""

    custom_id: str
    status: str
    request: msgspec.Raw = _NULL
    response: msgspec.Raw = _NULL
    error: Any = None
    url: str | None = None
    round: int = 0
    output: Any = msgspec.UNSET


_joined_raw_decoder = msgspec.json.Decoder(_JoinedRaw)
_ANSWERED = frozenset({"succeeded", *OUTPUT_STATUSES})


def _reread(row: _JoinedRaw, extract: _Extract) -> Outcome | None:
    """A joined row's outcome read again from its response (``None``: it was never answered)."""
    if row.status not in _ANSWERED or row.response == _NULL:
        return None
    body: Any = row.response
    if memoryview(body)[0] == 34:
        body = response_body({"body": msgspec.json.decode(body)})
    return extract.outcome(body)


def _extracted_lines(source: Source, counts: _Counts, extract: _Extract) -> Iterator[bytes]:
    """A joined JSONL file's rows with ``output`` (and the status and error it gives), counted by status."""
    with open_source(source) as stream:
        for lines in _chunks(stream):
            rows = []
            for row in _decoded(_joined_raw_decoder.decode, lines):
                got = _reread(row, extract)
                if got is None:
                    row.output = None
                else:
                    row.status, row.output, row.error = got.status, got.output, got.error
                counts.add(row.status)
                rows.append(row)
            yield _encoder.encode_lines(rows)


def _typed_from_joined(source: Source, extract: _Extract, slot: _LayoutSlot) -> Iterator[bytes]:
    """A joined JSONL file's rows as typed lines (the layout from the first row's ``url``)."""
    with open_source(source) as stream:
        for lines in _chunks(stream):
            rows = _decoded(_joined_raw_decoder.decode, lines)
            if not rows:
                continue
            layout = slot.set(rows[0].url)
            typed = []
            for row in rows:
                got = _reread(row, extract)
                typed.append(_typed_line(row.custom_id, row.status, got, row.error, layout, extract, row.round))
            yield _encoder.encode_lines(typed)


def _typed_from_rows(rows: Iterable[JoinedRow], extract: _Extract, slot: _LayoutSlot) -> Iterator[bytes]:
    """Row objects as typed lines (rows that are not a join's own: a merge of rounds, a list)."""
    batch: list[_TypedLine] = []
    for row in rows:
        layout = slot.set(row.url)
        got = extract.outcome(row.response) if row.status in _ANSWERED and row.response is not None else None
        batch.append(_typed_line(row.custom_id, row.status, got, row.error, layout, extract, row.round))
        if len(batch) >= 4096:
            yield _encoder.encode_lines(batch)
            batch = []
    if batch:
        yield _encoder.encode_lines(batch)


class _Status(msgspec.Struct, gc=False):
    status: str


_status_decoder = msgspec.json.Decoder(_Status)


def _joined_lines(source: Source, counts: _Counts, extract: _Extract | None = None) -> Iterator[bytes]:
    """A joined JSONL file's lines as they are, counted by status (with ``output`` added when extracting)."""
    if extract is not None:
        yield from _extracted_lines(source, counts, extract)
        return
    with open_source(source) as stream:
        for lines in _chunks(stream):
            for status, rows in collections.Counter(
                [r.status for r in _decoded(_status_decoder.decode, lines)]
            ).items():
                counts.add(status, rows)
            yield b"".join(lines)


def iter_joined(
    input_sources: Source | Sequence[Source],
    result_sources: Iterable[Source | None],
    *,
    output_schema: OutputSchemaLike | None = None,
    extract: bool = False,
) -> Iterator[JoinedRow]:
    """
    Every input request, in input order (across shards, in the order given), with its response or error and
    its status: ``succeeded``, ``failed``, ``expired``, ``cancelled`` or ``missing`` (no result line at all).

    ``output_schema`` (a Pydantic model or a JSON Schema dict, see ``outputs.output_schema``) or ``extract=True``:
    each row also gets ``output``, read from its answer by ``outputs.row_outcome`` (the validated object; without a
    schema the text, the embedding vector or the moderation verdict), and an answered row that is not usable gets
    the status ``invalid_output``, ``refused`` or ``truncated`` instead of ``succeeded``, with an ``error`` saying
    why (the model's text in ``error["text"]``). ``write_joined`` of these rows to a ``.parquet`` destination
    writes typed columns.

    Memory stays flat: the lines are partitioned by ``custom_id`` into buckets on disk and joined a bucket at a
    time (see ``_join_blocks``). Request and response bodies pass through as the bytes read, never decoded and
    encoded again, except for results that are not a plain success. Nothing is read until the first row is
    asked for.
    """
    inputs: list[Source] = list(input_sources) if isinstance(input_sources, (list, tuple)) else [input_sources]  # type: ignore[list-item]
    results = [source for source in result_sources if source is not None]
    return _Joined(
        lambda counts, wanted: _join_all(inputs, results, counts, wanted),
        _extraction(output_schema, extract),
        lambda wanted, slot: _typed_join(inputs, results, wanted, slot),
        typed_tables=True,
    )


def _error_of(response: dict[str, Any] | None) -> dict[str, Any] | None:
    """A request the endpoint refused carries its error in the response body, not in ``error``."""
    if response and _status_code(response) != 200:
        body = response_body(response) or {}
        error = body.get("error") if isinstance(body, dict) else None
        return {"status_code": response.get("status_code"), **(error if isinstance(error, dict) else {})}
    return None


def write_joined(
    rows: Iterable[JoinedRow],
    destination: Destination,
    *,
    overwrite: bool = True,
    output_schema: OutputSchemaLike | None = None,
    extract: bool = False,
) -> dict[str, int]:
    """
    Write joined rows (atomically) and return how many rows had each status: JSONL, or Parquet when the
    destination ends in ``.parquet`` (needs ``pyarrow``, the ``[parquet]`` extra).

    Without extraction, Parquet holds request, response and error as JSON strings. With it (``output_schema`` or
    ``extract=True`` here, or rows of ``iter_joined(..., output_schema=...)``), every row gets ``output`` and its
    finer status (see :func:`iter_joined`), and Parquet is typed (``parquet.Layout``): one column per schema field,
    or the endpoint's value (``output_text``, ``embedding`` as ``list<float32>``, ``flagged`` and
    ``categories``), beside ``custom_id``, ``status``, ``output_text``, ``error`` and ``round``, in streamed row
    groups. A schema field named like one of those columns raises ``ValueError`` before anything is read.
    """
    wanted = _extraction(output_schema, extract) or (rows.extract if isinstance(rows, _Joined) else None)
    parquet = str(destination).endswith(".parquet")
    if wanted is not None and parquet:
        return _write_typed(rows, destination, overwrite, wanted)
    if wanted is not None and not isinstance(rows, _Joined):
        rows = (_with_output(row, wanted) for row in rows)
    counts: dict[str, int] = {}
    with atomic_writer(destination, overwrite=overwrite) as out:
        if parquet:
            from airflow_provider_openai_batch.parquet import write_json_columns

            def counted() -> Iterator[JoinedRow]:
                for row in rows:
                    counts[row.status] = counts.get(row.status, 0) + 1
                    yield row

            write_json_columns(counted(), out)
        elif isinstance(rows, _Joined):
            # A join's lines go out as they were built: no row objects in between.
            for block in rows.blocks(wanted):
                out.write(block)
            counts.update(rows.counts)
        else:
            # Rows are encoded into one buffer and written a megabyte at a time: a write per row costs more than
            # the encoding.
            buffer = bytearray()
            encode_into = _encoder.encode_into
            for row in rows:
                counts[row.status] = counts.get(row.status, 0) + 1
                encode_into(row, buffer, -1)
                buffer += b"\n"
                if len(buffer) >= 1 << 20:
                    out.write(buffer)
                    buffer.clear()
            out.write(buffer)
    return counts


def _with_output(row: JoinedRow, extract: _Extract) -> JoinedRow:
    """A row object with ``output`` read from its response (and the status and error that gives)."""
    if row.status in _ANSWERED and row.response is not None:
        got = extract.outcome(row.response)
        row.status, row.output, row.error = got.status, as_value(got.output), got.error
    else:
        row.output = None
    return row


def _write_typed(
    rows: Iterable[JoinedRow], destination: Destination, overwrite: bool, extract: _Extract
) -> dict[str, int]:
    slot = _LayoutSlot(extract)
    if extract.schema is not None:
        slot.get()  # the columns come from the schema: a bad one fails here, before the join reads anything
    joined = rows if isinstance(rows, _Joined) else None
    typed = joined.typed_blocks(extract, slot) if joined is not None else None
    with atomic_writer(destination, overwrite=overwrite) as out:
        from airflow_provider_openai_batch.parquet import write_typed

        if joined is not None and typed is not None:
            try:
                return write_typed(typed, out, slot.get, read=joined.typed_tables)
            finally:  # closed here, a join whose write failed lets go of its folder now, not with the traceback
                getattr(typed, "close", lambda: None)()
        return write_typed(_typed_from_rows(rows, extract, slot), out, slot.get)


# --- failed requests, resubmitted -----------------------------------------------------------------

#: Error codes of a failed request that may pass when sent again (``request_timeout``: the request ran out of time
#: at OpenAI). A compatible server that sends only an error ``type`` is read by its type instead.
RETRYABLE_ERROR_CODES = frozenset({"rate_limit_exceeded", "server_error", "request_timeout", "timeout"})


#: How some compatible servers report an upstream HTTP failure: ``{"type": "request_failed", "message": "Error code:
#: 500 - ..."}`` (the status only in the message).
_STATUS_IN_MESSAGE = re.compile(r"\bError code:\s*(\d{3})\b")


def is_retryable(row: JoinedRow) -> bool:
    """Worth sending again: never ran (expired, cancelled, missing) or failed with a transient error."""
    if row.status in ("expired", "cancelled", "missing"):
        return True
    if row.status != "failed" or not row.error:
        return False
    code = row.error.get("status_code")
    kind = row.error.get("code") or row.error.get("type")
    if not isinstance(code, int):
        found = _STATUS_IN_MESSAGE.search(str(row.error.get("message") or ""))
        code = int(found.group(1)) if found else None
    return (isinstance(code, int) and is_transient_status(code)) or kind in RETRYABLE_ERROR_CODES


def write_retry_input(joined: Source, destination: Destination, also: Collection[str] = ()) -> int:
    """
    A batch input file of the requests in ``joined`` (a joined JSONL) that are worth sending again, and those whose
    status is in ``also`` (typed statuses a user chose to resend, e.g. ``truncated``); returns how many. Nothing is
    written when there is nothing to retry.
    """
    decoder = msgspec.json.Decoder(JoinedRow)
    lines = (
        _encoder.encode({"custom_id": r.custom_id, "method": "POST", "url": r.url, "body": r.request}) + b"\n"
        for r in map(decoder.decode, iter_lines(joined))
        if is_retryable(r) or r.status in also
    )
    first = next(lines, None)
    if first is None:
        return 0
    count = 1
    with atomic_writer(destination, overwrite=True) as out:
        out.write(first)
        for line in lines:
            out.write(line)
            count += 1
    return count


#: Rows of the first round looked up per query. Under SQLite's oldest limit of 999 bound parameters per statement.
_MERGE_CHUNK = 900


def iter_merged(rounds: Sequence[Source | None], numbers: Sequence[int] | None = None) -> Iterator[JoinedRow]:
    """
    The first round's joined rows, in its order, each replaced by its latest retry: one row per original
    request however many rounds ran. ``None`` entries (rounds that had nothing to retry) are skipped. ``numbers``
    gives each later source's round number (default: its position); a later source overrides an earlier one.
    """
    first = rounds[0]
    later = [(n, r) for n, r in zip(numbers or range(len(rounds)), rounds, strict=False)][1:]
    later = [(n, r) for n, r in later if r is not None]
    if not later:  # one round: its joined file is the result, passed through as it is
        return _Joined(
            lambda counts, wanted: _joined_lines(first, counts, wanted),  # type: ignore[arg-type]
            typed=lambda wanted, slot: _typed_from_joined(first, wanted, slot),  # type: ignore[arg-type]
        )
    return _merged(first, later)  # type: ignore[arg-type]


def _merged(first: Source, later: list[tuple[int, Source]]) -> Iterator[JoinedRow]:
    decoder = msgspec.json.Decoder(JoinedRow)
    with _scratch_db("CREATE TABLE latest (custom_id TEXT PRIMARY KEY, round INTEGER, line BLOB)") as db:
        for number, source in later:
            rows = ((decoder.decode(raw).custom_id, number, raw) for raw in iter_lines(source))
            db.executemany("INSERT OR REPLACE INTO latest VALUES (?, ?, ?)", rows)
        db.commit()
        lines = iter_lines(first)
        while chunk := [decoder.decode(raw) for raw in itertools.islice(lines, _MERGE_CHUNK)]:
            marks = ",".join("?" * len(chunk))
            query = f"SELECT custom_id, round, line FROM latest WHERE custom_id IN ({marks})"
            found = {cid: (number, line) for cid, number, line in db.execute(query, [r.custom_id for r in chunk])}
            for row in chunk:
                newer = found.get(row.custom_id)
                if newer is not None:
                    row = decoder.decode(newer[1])
                    row.round = newer[0]
                yield row


# --- usage and cost -------------------------------------------------------------------------------

USAGE_KEYS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "total_tokens")


def normalize_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """One shape for every endpoint's usage (chat/completions, responses, embeddings, the batch object)."""
    usage = usage or {}
    details_in = usage.get("input_tokens_details") or usage.get("prompt_tokens_details") or {}
    details_out = usage.get("output_tokens_details") or usage.get("completion_tokens_details") or {}
    input_tokens = int(usage.get("input_tokens", usage.get("prompt_tokens", 0)) or 0)
    output_tokens = int(usage.get("output_tokens", usage.get("completion_tokens", 0)) or 0)
    return {
        "input_tokens": input_tokens,
        "cached_input_tokens": int(details_in.get("cached_tokens", 0) or 0),
        "output_tokens": output_tokens,
        "reasoning_tokens": int(details_out.get("reasoning_tokens", 0) or 0),
        "total_tokens": int(usage.get("total_tokens", input_tokens + output_tokens) or 0),
    }


def sum_usage(output: Source) -> dict[str, int]:
    """Usage summed over an output file's lines, for servers whose batch object carries none."""
    totals = dict.fromkeys(USAGE_KEYS, 0)
    for raw in iter_lines(output):
        body = response_body(_result_decoder.decode(raw).response)
        usage = body.get("usage") if isinstance(body, dict) else None
        for key, value in normalize_usage(usage if isinstance(usage, dict) else None).items():
            totals[key] += value
    return totals


def estimate_cost(
    usage: dict[str, int], model: str | None, prices: dict[str, dict[str, float]]
) -> dict[str, Any] | None:
    """
    Cost from a user-supplied price table: ``{model: {"input": $, "cached_input": $, "output": $}}`` per
    million tokens (batch prices; this provider ships no prices, since they change). ``None`` when the
    table has no entry for the model. Reasoning tokens are billed as output and already counted in it.
    """
    price = prices.get(model or "")
    if price is None and model:
        # The longest matching prefix: with both "gpt-4o" and "gpt-4o-mini" in the table, a dated
        # "gpt-4o-mini-2024-07-18" is priced as gpt-4o-mini, whatever order the table lists them in.
        matches = [name for name in prices if model.startswith(name)]
        price = prices[max(matches, key=len)] if matches else None
    if price is None:
        return None
    cached = usage["cached_input_tokens"]
    uncached = usage["input_tokens"] - cached
    cost = (
        uncached * price.get("input", 0.0)
        + cached * price.get("cached_input", price.get("input", 0.0))
        + usage["output_tokens"] * price.get("output", 0.0)
    ) / 1_000_000
    return {"model": model, "currency": price.get("currency", "USD"), "total": round(cost, 6)}
