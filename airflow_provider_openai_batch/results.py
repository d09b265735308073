"""
Results joined to their inputs by ``custom_id``, in input order, streaming.

OpenAI writes results in its own order, splits them over an output and an error file, and leaves nothing for
requests that never ran. Downstream code wants one row per request it sent. The result lines are indexed in a
temporary SQLite file (keyed by ``custom_id``), then the inputs are streamed in order and looked up, so memory
stays flat whether a batch holds 100 requests or a million across many shards.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import msgspec

from airflow_provider_openai_batch.batch_file import ResultLine, iter_lines
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


class _Request(msgspec.Struct):
    custom_id: str
    body: dict[str, Any] | None = None
    url: str | None = None


_result_decoder = msgspec.json.Decoder(ResultLine)
_request_decoder = msgspec.json.Decoder(_Request)
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
        # Used by one thread at a time: the join hands each lookup to a helper thread and waits for it.
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


class _Keyed(msgspec.Struct):
    """Only the key of a result line: indexing skips over the rest without building it."""

    custom_id: str


_key_decoder = msgspec.json.Decoder(_Keyed)
#: Input lines looked up per query. Well under SQLite's oldest limit of 999 bound parameters per statement.
_JOIN_CHUNK = 900
_MARKS = ",".join("?" * _JOIN_CHUNK)
_LOOKUP = f"SELECT custom_id, line FROM results WHERE custom_id IN ({_MARKS}) ORDER BY rowid"


@contextlib.contextmanager
def _index(result_sources: Iterable[Source | None]) -> Iterator[sqlite3.Connection]:
    # Lines are appended in file order and indexed once at the end: SQLite builds an index by sorting, which costs
    # a fraction of inserting a million keys that arrive in OpenAI's (random) order into a b-tree one by one.
    # Should a custom_id appear twice, the later line wins (the highest rowid, see ``_lookup``).
    with _scratch_db("CREATE TABLE results (custom_id TEXT, line BLOB)") as db:
        for source in result_sources:
            if source is not None:
                rows = ((_key_decoder.decode(raw).custom_id, raw) for raw in _iter_raw(source))
                db.executemany("INSERT INTO results VALUES (?, ?)", rows)
        db.execute("CREATE INDEX results_by_id ON results (custom_id)")
        db.commit()
        yield db


def _iter_raw(source: Source) -> Iterator[bytes]:
    """The non-blank lines of a JSONL file with their line endings (JSON decoders skip trailing whitespace)."""
    with open_source(source) as stream:
        for line in stream:
            if line.strip():
                yield line


def _lookup(db: sqlite3.Connection, ids: list[str]) -> dict[str, bytes]:
    """The result lines of up to ``_JOIN_CHUNK`` custom ids in one query (SQLite walks its index in C)."""
    query = _LOOKUP if len(ids) == _JOIN_CHUNK else _LOOKUP.replace(_MARKS, ",".join("?" * len(ids)))
    return dict(db.execute(query, ids).fetchall())


def iter_joined(
    input_sources: Source | Sequence[Source],
    result_sources: Iterable[Source | None],
) -> Iterator[JoinedRow]:
    """
    Every input request, in input order (across shards, in the order given), with its response or error and
    its status: ``succeeded``, ``failed``, ``expired``, ``cancelled`` or ``missing`` (no result line at all).

    Inputs are read in chunks and each chunk's results fetched with one query, so the cost per row is a decode
    and a dict lookup rather than a SQL round trip; memory holds one chunk, whatever the number of rows.
    """
    inputs: list[Source] = list(input_sources) if isinstance(input_sources, (list, tuple)) else [input_sources]  # type: ignore[list-item]
    decode_request, decode_result = _request_decoder.decode, _result_decoder.decode

    def chunks() -> Iterator[list[_Request]]:
        for source in inputs:
            lines = _iter_raw(source)
            while chunk := [decode_request(raw) for raw in itertools.islice(lines, _JOIN_CHUNK)]:
                yield chunk

    with _index(result_sources) as db, ThreadPoolExecutor(1, thread_name_prefix="openai-batch-join") as lookups:
        # One chunk ahead: SQLite searches the next chunk's results (without the GIL) while this thread builds
        # the current chunk's rows.
        ahead = chunks()
        current = next(ahead, None)
        pending = lookups.submit(_lookup, db, [r.custom_id for r in current]) if current else None
        while current is not None and pending is not None:
            found = pending.result()
            following = next(ahead, None)
            if following is not None:
                pending = lookups.submit(_lookup, db, [r.custom_id for r in following])
            for request in current:
                line = found.get(request.custom_id)
                if line is None:
                    yield JoinedRow(request.custom_id, "missing", request.body, url=request.url)
                    continue
                result = decode_result(line)
                response, error = result.response, result.error
                if error is None and response is not None and response.get("status_code") == 200:
                    body = response.get("body")
                    if type(body) is dict:  # OpenAI's answer to a request that worked: the common case
                        yield JoinedRow(request.custom_id, "succeeded", request.body, body, None, request.url)
                        continue
                yield JoinedRow(
                    request.custom_id,
                    result_status(response, error),
                    request.body,
                    response=response_body(response),
                    error=error or _error_of(response),
                    url=request.url,
                )
            current = following


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

#: HTTP statuses of a failed request that may pass when sent again.
RETRYABLE_STATUS_CODES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: Error codes of a failed request that may pass when sent again (``request_timeout``: the request ran out of time
#: at OpenAI). A compatible server that sends only an error ``type`` is read by its type instead.
RETRYABLE_ERROR_CODES = frozenset({"rate_limit_exceeded", "server_error", "request_timeout", "timeout"})


def is_retryable(row: JoinedRow) -> bool:
    """Worth sending again: never ran (expired, cancelled, missing) or failed with a transient error."""
    if row.status in ("expired", "cancelled", "missing"):
        return True
    if row.status != "failed" or not row.error:
        return False
    code = row.error.get("status_code")
    kind = row.error.get("code") or row.error.get("type")
    return (isinstance(code, int) and code in RETRYABLE_STATUS_CODES) or kind in RETRYABLE_ERROR_CODES


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


def iter_merged(rounds: Sequence[Source | None]) -> Iterator[JoinedRow]:
    """
    The first round's joined rows, in its order, each replaced by its latest retry: one row per original
    request however many rounds ran. ``None`` entries (rounds that had nothing to retry) are skipped.
    """
    decoder = msgspec.json.Decoder(JoinedRow)
    first, later = rounds[0], [r for r in rounds[1:] if r is not None]
    with _scratch_db("CREATE TABLE latest (custom_id TEXT PRIMARY KEY, round INTEGER, line BLOB)") as db:
        for number, source in enumerate(later, start=1):
            rows = ((decoder.decode(raw).custom_id, number, raw) for raw in iter_lines(source))
            db.executemany("INSERT OR REPLACE INTO latest VALUES (?, ?, ?)", rows)
        db.commit()
        lines = _iter_raw(first)  # type: ignore[arg-type]
        while chunk := [decoder.decode(raw) for raw in itertools.islice(lines, _JOIN_CHUNK)]:
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
