"""
Results joined to their inputs by ``custom_id``, in input order, streaming.

OpenAI writes results in its own order, splits them over an output and an error file, and leaves nothing for
requests that never ran. Downstream code wants one row per request it sent. The result lines are indexed in a
temporary SQLite file (keyed by ``custom_id``), then the inputs are streamed in order and looked up, so memory
stays flat whether a batch holds 100 requests or a million across many shards.
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from airflow_provider_openai_batch.batch_file import iter_raw_lines
from airflow_provider_openai_batch.storage import Destination, Source, atomic_writer, open_source

RequestStatus = Literal["succeeded", "failed", "expired", "cancelled", "missing"]
_UNRUN = {"batch_expired": "expired", "batch_cancelled": "cancelled"}


class JoinedRow(msgspec.Struct, omit_defaults=False):
    """One request and what became of it."""

    custom_id: str
    status: str
    request: dict[str, Any] | None
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class _Result(msgspec.Struct):
    custom_id: str
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class _Request(msgspec.Struct):
    custom_id: str
    body: dict[str, Any] | None = None


_result_decoder = msgspec.json.Decoder(_Result)
_request_decoder = msgspec.json.Decoder(_Request)
_encoder = msgspec.json.Encoder()


def result_status(response: dict[str, Any] | None, error: dict[str, Any] | None) -> RequestStatus:
    """What one result line means for its request."""
    if error:
        return _UNRUN.get(str(error.get("code")), "failed")  # type: ignore[return-value]
    if response and int(response.get("status_code") or 0) == 200:
        return "succeeded"
    return "failed"


@contextlib.contextmanager
def _index(result_sources: Iterable[Source | None]) -> Iterator[sqlite3.Connection]:
    with tempfile.TemporaryDirectory(prefix="openai-batch-join-") as folder:
        db = sqlite3.connect(Path(folder) / "results.sqlite")
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE results (custom_id TEXT PRIMARY KEY, line BLOB)")
            for source in result_sources:
                if source is None:
                    continue
                with open_source(source) as stream:
                    rows = (
                        (_result_decoder.decode(raw).custom_id, raw) for _, raw in iter_raw_lines(stream) if raw.strip()
                    )
                    db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?)", rows)
            db.commit()
            yield db
        finally:
            db.close()


def iter_joined(
    input_sources: Source | Sequence[Source],
    result_sources: Iterable[Source | None],
) -> Iterator[JoinedRow]:
    """
    Every input request, in input order (across shards, in the order given), with its response or error and
    its status: ``succeeded``, ``failed``, ``expired``, ``cancelled`` or ``missing`` (no result line at all).
    """
    inputs: list[Source] = list(input_sources) if isinstance(input_sources, (list, tuple)) else [input_sources]  # type: ignore[list-item]
    with _index(result_sources) as db:
        lookup = db.cursor()
        for source in inputs:
            with open_source(source) as stream:
                for _, raw in iter_raw_lines(stream):
                    if not raw.strip():
                        continue
                    request = _request_decoder.decode(raw)
                    found = lookup.execute(
                        "SELECT line FROM results WHERE custom_id = ?", (request.custom_id,)
                    ).fetchone()
                    if found is None:
                        yield JoinedRow(request.custom_id, "missing", request.body)
                        continue
                    result = _result_decoder.decode(found[0])
                    yield JoinedRow(
                        request.custom_id,
                        result_status(result.response, result.error),
                        request.body,
                        response=(result.response or {}).get("body") if result.response else None,
                        error=result.error or _error_of(result.response),
                    )


def _error_of(response: dict[str, Any] | None) -> dict[str, Any] | None:
    """A request the endpoint refused carries its error in the response body, not in ``error``."""
    if response and int(response.get("status_code") or 0) != 200:
        body = response.get("body") or {}
        error = body.get("error") if isinstance(body, dict) else None
        return {"status_code": response.get("status_code"), **(error if isinstance(error, dict) else {})}
    return None


def write_joined(rows: Iterable[JoinedRow], destination: Destination, *, overwrite: bool = True) -> dict[str, int]:
    """Write joined rows as JSONL (atomically) and return how many rows had each status."""
    counts: dict[str, int] = {}
    with atomic_writer(destination, overwrite=overwrite) as out:
        for row in rows:
            counts[row.status] = counts.get(row.status, 0) + 1
            out.write(_encoder.encode(row) + b"\n")
    return counts
