"""
Results joined to their inputs by ``custom_id``, in input order, streaming.

OpenAI writes results in its own order, splits them over an output and an error file, and leaves nothing for
requests that never ran. Downstream code wants one row per request it sent. The join is a hash join that spills
to disk: result and input lines are partitioned by ``custom_id`` into bucket files, each bucket is joined in
memory, and the buckets' rows are read back in input order, so memory stays flat whether a batch holds 100
requests or a million across many shards. Only ``custom_id``, ``url`` and the response status are decoded: request
and response bodies pass through as the bytes read (msgspec ``Raw``), which is most of the speed.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import msgspec

from airflow_provider_openai_batch.batch_file import ResultLine, iter_lines
from airflow_provider_openai_batch.exceptions import is_transient_status
from airflow_provider_openai_batch.storage import Destination, Source, atomic_writer, open_source

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


class _Keyed(msgspec.Struct, gc=False):
    """Only the key of a line: the rest is skipped over without being built."""

    custom_id: str


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


_key_decoder = msgspec.json.Decoder(_Keyed)
_raw_request_decoder = msgspec.json.Decoder(_RawRequest)
_raw_result_decoder = msgspec.json.Decoder(_RawResult)
_joined_decoder = msgspec.json.Decoder(JoinedRow)
#: Buckets per level of the join's partitioning (a power of two: the bucket is some bits of the key's hash).
_FANOUT = 64
_HASH_BITS = 6
#: A bucket whose result lines take more than this is split again by other bits of the hash, so the index of one
#: bucket (held in memory) stays about this small whatever the number of rows. Five levels: 64^5 buckets.
_BUCKET_BYTES = 16 << 20
_MAX_DEPTH = 4
#: Lines read, partitioned or merged at a time (a size hint in bytes for ``readlines``).
_CHUNK_BYTES = 1 << 20
_BUFFER = 1 << 16


def _chunks(stream: IO[bytes]) -> Iterator[list[bytes]]:
    """A JSONL stream as lists of whole lines, each ending in a newline."""
    while lines := stream.readlines(_CHUNK_BYTES):
        if not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        yield lines


def _source_chunks(sources: Iterable[Source]) -> Iterator[list[bytes]]:
    for source in sources:
        with open_source(source) as stream:
            yield from _chunks(stream)


def _file_chunks(path: Path) -> Iterator[list[bytes]]:
    with path.open("rb", buffering=_BUFFER) as stream:
        yield from _chunks(stream)


def _decoded(decode: Callable[[bytes], Any], lines: list[bytes]) -> list[Any]:
    """Every line of ``lines`` decoded, blank lines dropped first (from ``lines`` too) when there are any."""
    try:
        return list(map(decode, lines))
    except msgspec.DecodeError:
        lines[:] = [line for line in lines if line.strip()]
        return list(map(decode, lines))


def _spill(
    chunks: Iterable[list[bytes]], folder: Path, prefix: str, shift: int, order: IO[bytes] | None = None
) -> list[int]:
    """
    Lines into ``_FANOUT`` bucket files by bits of their ``custom_id``'s hash, in the order read; the bucket of
    each line, one byte a line, into ``order`` when given. Returns the bytes written per bucket.
    """
    mask, key = _FANOUT - 1, _key_decoder.decode
    sizes = [0] * _FANOUT
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context((folder / f"{prefix}{b}").open("wb")) for b in range(_FANOUT)]
        for lines in chunks:
            buckets = [(hash(keyed.custom_id) >> shift) & mask for keyed in _decoded(key, lines)]
            if order is not None:
                order.write(bytes(buckets))
            held: list[list[bytes]] = [[] for _ in range(_FANOUT)]
            appends = [h.append for h in held]
            for bucket, line in zip(buckets, lines, strict=True):
                appends[bucket](line)
            for bucket, bucket_lines in enumerate(held):
                if bucket_lines:
                    sizes[bucket] += outs[bucket].write(b"".join(bucket_lines))
    return sizes


def _join_blocks(
    inputs: Iterable[list[bytes]], results: Iterable[list[bytes]], folder: Path, counts: _Counts, depth: int = 0
) -> Iterator[bytes]:
    """
    Joined JSONL lines in the order of ``inputs``, in blocks: a hash join that spills to disk (Grace).

    Result and input lines go to ``_FANOUT`` bucket files by the hash of their ``custom_id``, and the bucket of
    every input, in input order, to an order file. Each bucket is then joined on its own (its results indexed in
    memory, its inputs streamed in order), and the buckets' joined lines are read back in the order file's order.
    Memory holds one bucket's results: a bucket over ``_BUCKET_BYTES`` is split the same way again, a level down.
    """
    shift = depth * _HASH_BITS
    sizes = _spill(results, folder, "r", shift)
    with (folder / "order").open("wb") as order:
        _spill(inputs, folder, "i", shift, order)
    for bucket in range(_FANOUT):
        in_path, result_path = folder / f"i{bucket}", folder / f"r{bucket}"
        with (folder / f"o{bucket}").open("wb", buffering=_BUFFER) as out:
            if sizes[bucket] > _BUCKET_BYTES and depth < _MAX_DEPTH:
                below = folder / f"d{bucket}"
                below.mkdir()
                for block in _join_blocks(_file_chunks(in_path), _file_chunks(result_path), below, counts, depth + 1):
                    out.write(block)
                shutil.rmtree(below)
            else:
                _join_bucket(_file_chunks(in_path), _file_chunks(result_path), out, counts)
        in_path.unlink()
        result_path.unlink()
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context((folder / f"o{b}").open("rb", buffering=_BUFFER)) for b in range(_FANOUT)]
        nexts = [reader.readline for reader in readers]
        with (folder / "order").open("rb") as order:
            while sequence := order.read(_CHUNK_BYTES // 128):
                yield b"".join([nexts[bucket]() for bucket in sequence])


def _join_bucket(
    inputs: Iterable[list[bytes]], results: Iterable[list[bytes]], out: IO[bytes], counts: _Counts
) -> None:
    """One bucket: its results indexed in memory (a later line for the same id wins), its inputs joined in order."""
    # The index holds the body of each plain success (an answer that is not a JSON string, which some compatible
    # servers send for a JSON body), and the whole result otherwise.
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
    raw, total, before = msgspec.Raw, 0, sum(counts.values())
    for lines in inputs:
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


def _other_row(request: _RawRequest, result: _RawResult | None, counts: _Counts) -> _RawJoined | JoinedRow:
    """An input without a result (``missing``), or with any result but a plain success."""
    if result is None:
        counts.add("missing")
        return _RawJoined(request.custom_id, "missing", request.body, None, None, request.url)
    raw = result.response
    response = None if raw is None else {"status_code": raw.status_code, "body": msgspec.json.decode(raw.body)}
    row = JoinedRow(
        request.custom_id,
        result_status(response, result.error),
        msgspec.json.decode(request.body),
        response=response_body(response),
        error=result.error or _error_of(response),
        url=request.url,
    )
    counts.add(row.status)
    return row


class _Counts(dict[str, int]):
    """Rows per status."""

    def add(self, status: str, rows: int = 1) -> None:
        self[status] = self.get(status, 0) + rows


class _Joined(Iterator[JoinedRow]):
    """
    Joined rows made as JSONL blocks: :func:`write_joined` writes the blocks as they are, without building a row
    object each; iterating decodes them. ``make`` fills ``counts`` (rows per status) as it goes.
    """

    def __init__(self, make: Callable[[_Counts], Iterator[bytes]]) -> None:
        self.counts = _Counts()
        self._blocks = make(self.counts)
        self._rows: Iterator[JoinedRow] | None = None

    def blocks(self) -> Iterator[bytes]:
        """The joined JSONL, a block of whole lines at a time."""
        return self._blocks

    def __next__(self) -> JoinedRow:
        if self._rows is None:
            decode = _joined_decoder.decode
            self._rows = (decode(line) for block in self._blocks for line in block.split(b"\n") if line)
        return next(self._rows)


def _join_all(inputs: list[Source], results: list[Source], counts: _Counts) -> Iterator[bytes]:
    with tempfile.TemporaryDirectory(prefix="openai-batch-join-") as folder:
        yield from _join_blocks(_source_chunks(inputs), _source_chunks(results), Path(folder), counts)


class _Status(msgspec.Struct, gc=False):
    status: str


_status_decoder = msgspec.json.Decoder(_Status)


def _joined_lines(source: Source, counts: _Counts) -> Iterator[bytes]:
    """A joined JSONL file's lines as they are, counted by status."""
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
) -> Iterator[JoinedRow]:
    """
    Every input request, in input order (across shards, in the order given), with its response or error and
    its status: ``succeeded``, ``failed``, ``expired``, ``cancelled`` or ``missing`` (no result line at all).

    Memory stays flat: the lines are partitioned by ``custom_id`` into buckets on disk and joined a bucket at a
    time (see ``_join_blocks``). Request and response bodies pass through as the bytes read, never decoded and
    encoded again, except for results that are not a plain success. Nothing is read until the first row is
    asked for.
    """
    inputs: list[Source] = list(input_sources) if isinstance(input_sources, (list, tuple)) else [input_sources]  # type: ignore[list-item]
    results = [source for source in result_sources if source is not None]
    return _Joined(lambda counts: _join_all(inputs, results, counts))


def _error_of(response: dict[str, Any] | None) -> dict[str, Any] | None:
    """A request the endpoint refused carries its error in the response body, not in ``error``."""
    if response and _status_code(response) != 200:
        body = response_body(response) or {}
        error = body.get("error") if isinstance(body, dict) else None
        return {"status_code": response.get("status_code"), **(error if isinstance(error, dict) else {})}
    return None


def write_joined(rows: Iterable[JoinedRow], destination: Destination, *, overwrite: bool = True) -> dict[str, int]:
    """
    Write joined rows (atomically) and return how many rows had each status: JSONL, or Parquet when the
    destination ends in ``.parquet`` (needs ``pyarrow``; request, response and error become JSON strings).
    """
    counts: dict[str, int] = {}

    def counted() -> Iterator[JoinedRow]:
        for row in rows:
            counts[row.status] = counts.get(row.status, 0) + 1
            yield row

    with atomic_writer(destination, overwrite=overwrite) as out:
        if str(destination).endswith(".parquet"):
            _write_parquet(counted(), out)
        elif isinstance(rows, _Joined):
            # A join's lines go out as they were built: no row objects in between.
            for block in rows.blocks():
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


def _write_parquet(rows: Iterator[JoinedRow], out: Any, chunk: int = 50_000) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("writing Parquet needs pyarrow: pip install pyarrow") from error
    schema = pa.schema(
        [(name, pa.string()) for name in ("custom_id", "status", "url", "request", "response", "error")]
        + [("round", pa.int32())]
    )

    def dumps(value: Any) -> str | None:
        return None if value is None else _encoder.encode(value).decode()

    with pq.ParquetWriter(out, schema) as writer:
        while batch := list(itertools.islice(rows, chunk)):
            columns = {
                "custom_id": [r.custom_id for r in batch],
                "status": [r.status for r in batch],
                "url": [r.url for r in batch],
                "request": [dumps(r.request) for r in batch],
                "response": [dumps(r.response) for r in batch],
                "error": [dumps(r.error) for r in batch],
                "round": [r.round for r in batch],
            }
            writer.write_table(pa.table(columns, schema=schema))


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


def write_retry_input(joined: Source, destination: Destination) -> int:
    """
    A batch input file of the requests in ``joined`` (a joined JSONL) that are worth sending again;
    returns how many. Nothing is written when there is nothing to retry.
    """
    decoder = msgspec.json.Decoder(JoinedRow)
    lines = (
        _encoder.encode({"custom_id": r.custom_id, "method": "POST", "url": r.url, "body": r.request}) + b"\n"
        for r in map(decoder.decode, iter_lines(joined))
        if is_retryable(r)
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
        return _Joined(lambda counts: _joined_lines(first, counts))  # type: ignore[arg-type]
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
