"""
Typed results: 1,000,000 structured-output answers joined and written as typed Parquet; rows/s and peak RSS.

``python -m benchmarks.typed`` makes the files (20 shards of 50,000 chat requests with a ``json_schema`` response
format, answered by the fake model's own answers: 1 % each invalid, refused, truncated, plus 1 % failed), then
measures in fresh interpreters, each the median of ``--rounds`` runs with the spread:

- ``model``: ``write_joined(iter_joined(..., output_schema=Label), "typed.parquet")``, validated by the Pydantic
  model, as the SDK's ``parse()`` validates;
- ``dict``: the same with Label's JSON Schema as a dict (validated by the compiled msgspec types);
- ``jsonl``: today's JSONL join of the same files (the anchor: ``benchmarks/join.py`` measures it on embeddings);
- ``rejoin``: a joined JSONL file (a round's) to typed Parquet, ``write_joined(iter_merged([...]), ...)``: rows
  that are not a join's own, read from their lines (the typed join's Arrow buckets are not used).

Every Parquet file is read back: its Arrow schema must hold Label's types (``parquet.columns``). CPU and RSS count
the child process a typed join starts to spill its inputs' keys (each RSS sample adds the child's to the join's).
Peak extra RSS is also measured at a tenth of the rows, to show it stays flat. ``--rows`` sets the size
(``make bench`` runs this as its ``typed`` step, sized by ``BENCH_TYPED_ROWS``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Literal

import pydantic

from benchmarks.common import MB, PeakRss, Row, emit, run_child, spread, table

ROWS = 1_000_000

SHARDS, PER_SHARD = 20, 50_000
#: The goal for typed Parquet (rows/s over join and write).
GOAL_ROWS_PER_S = 150_000
#: Peak extra RSS goals: at most this much, and at most this much more than at a tenth of the rows (flat).
GOAL_EXTRA_RSS_MB, GOAL_RSS_GROWTH_MB = 256, 64
MODES = ("model", "dict", "jsonl", "rejoin")


class Item(pydantic.BaseModel):
    name: str
    quantity: int


class Label(pydantic.BaseModel):
    """What the benchmark asks each request for: an enum, a number, a list, an optional string, nested objects."""

    sentiment: Literal["positive", "negative", "neutral"]
    score: float
    tags: list[str]
    note: str | None
    items: list[Item]


def generate(folder: Path, shards: int = SHARDS, per_shard: int = PER_SHARD) -> None:
    """
    Input shards and, for each, output lines in shuffled order and an error file (1 % failed). The fake model
    answers the first ``_DISTINCT`` requests; the others reuse those answers under their own ``custom_id`` (the
    fake's schema-driven answers take ~0.3 ms each: a million of them would take longer than the measurement).
    """
    from airflow_provider_openai_batch.outputs import response_format
    from airflow_provider_openai_batch.testing import responses

    fmt = response_format(Label, "/v1/chat/completions")
    shares = {"invalid": 0.01, "refused": 0.01, "truncated": 0.01}

    def body(cid: str) -> dict[str, object]:
        content = f"Label review {cid}"
        return {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": content}],
            **fmt,
            "fake_output": shares,
        }

    answers = [
        json.dumps(responses.output_line(f"a{n:05d}", "/v1/chat/completions", body(f"a{n:05d}"), 1))
        for n in range(_DISTINCT)
    ]
    rng = random.Random(7)
    for shard in range(shards):
        ids = [f"s{shard:02d}-{i:06d}" for i in range(per_shard)]
        with (folder / f"in-{shard:02d}.jsonl").open("w") as out:
            for cid in ids:
                line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body(cid)}
                out.write(json.dumps(line) + "\n")
        rng.shuffle(ids)
        with (folder / f"out-{shard:02d}.jsonl").open("w") as out, (folder / f"err-{shard:02d}.jsonl").open("w") as err:
            for n, cid in enumerate(ids):
                if n % 100 == 0:
                    err.write(json.dumps(responses.failed_request_line(cid, {"status_code": 500})) + "\n")
                else:
                    template = answers[n % _DISTINCT]
                    out.write(template.replace(f'"a{n % _DISTINCT:05d}"', json.dumps(cid), 1) + "\n")


#: Requests the fake model answers itself; the rest reuse their answers.
_DISTINCT = 2000


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    inputs = sorted(folder.glob("in-*.jsonl"))
    return inputs, sorted(folder.glob("out-*.jsonl")) + sorted(folder.glob("err-*.jsonl"))


def measure(folder: Path, mode: str) -> dict[str, object]:
    from airflow_provider_openai_batch.outputs import output_schema
    from airflow_provider_openai_batch.results import iter_joined, iter_merged, write_joined

    inputs, results = _files(folder)
    target = folder / f"{mode}.{'jsonl' if mode == 'jsonl' else 'parquet'}"
    schema: object = Label if mode != "dict" else output_schema(Label).schema
    if target.suffix == ".parquet":
        import pyarrow.json
        import pyarrow.parquet  # noqa: F401  (loaded before the measurement: a library, not the rows)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with PeakRss(every=0.02, children=True) as peak:
        started, cpu_started = time.perf_counter(), time.process_time()
        if mode == "jsonl":
            counts = write_joined(iter_joined(inputs, results), target)
        elif mode == "rejoin":
            counts = write_joined(iter_merged([folder / "joined.jsonl"]), target, output_schema=Label)
        else:
            counts = write_joined(iter_joined(inputs, results, output_schema=schema), target)  # type: ignore[arg-type]
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started  # every thread: the join's, Arrow's, the Parquet writer's
    # The process that spills the inputs' keys beside the join (typed_join.py): its CPU too (its RSS is sampled
    # with this process's).
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    rows = sum(counts.values())
    if target.suffix == ".parquet":
        import pyarrow.parquet as pq

        from airflow_provider_openai_batch.parquet import columns

        assert pq.ParquetFile(target).metadata.num_rows == rows
        read, wanted = pq.read_schema(target), columns(output_schema(Label))
        assert read.names == wanted.names, (read.names, wanted.names)
        for field in wanted:  # every column of the schema's own type: a dictionary enum, structs, lists, int64
            assert read.field(field.name).type == field.type, (field.name, read.field(field.name).type, field.type)
    return {"mode": mode, "wall": wall, "cpu": cpu, "rows": rows, "counts": counts, "extra_rss": peak.extra}


def prepare(folder: Path, rows: int) -> None:
    """The input and result files of ``rows`` requests, and the joined JSONL ``rejoin`` reads."""
    from airflow_provider_openai_batch.results import iter_joined, write_joined

    started = time.perf_counter()
    generate(folder, per_shard=max(1, rows // SHARDS))
    print(
        f"generated {SHARDS * max(1, rows // SHARDS):,} requests in {time.perf_counter() - started:.0f} s", flush=True
    )
    write_joined(iter_joined(*_files(folder), output_schema=Label), folder / "joined.jsonl")


def measure_rounds(folder: Path, rounds: int, modes: tuple[str, ...] = MODES) -> dict[str, list[dict[str, object]]]:
    """Each mode ``rounds`` times in a fresh interpreter, interleaved (a busy moment lands on every mode)."""
    runs: dict[str, list[dict[str, object]]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            runs[mode].append(run_child("benchmarks.typed", "--folder", str(folder), "--mode", mode))
    return runs


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def table_rows(runs: dict[str, list[dict[str, object]]], small: dict[str, list[dict[str, object]]]) -> list[Row]:
    """The table's rows: rows/s of each mode beside the JSONL join's; peak extra RSS, and at a tenth of the rows."""
    names = {
        "model": "Typed Parquet, Pydantic model",
        "dict": "Typed Parquet, JSON Schema dict",
        "jsonl": "JSONL join of the same files, no extraction (anchor)",
        "rejoin": "Joined JSONL to typed Parquet (one round's joined file, `iter_merged`)",
    }
    speeds = {m: [float(r["rows"]) / float(r["wall"]) for r in runs[m]] for m in runs}  # type: ignore[arg-type]
    anchor = f"JSONL join: {spread(speeds['jsonl'], '{:,.0f}')} rows/s" if "jsonl" in runs else "-"
    rows = []
    for mode, results in runs.items():
        cpu = [float(r["cpu"]) for r in results]  # type: ignore[arg-type]
        goal = mode in ("model", "dict")
        rows.append(
            Row(
                f"{names[mode]}: {int(results[0]['rows']):,} rows",  # type: ignore[call-overload]
                f"{spread(speeds[mode], '{:,.0f}')} rows/s, CPU {spread(cpu, '{:.1f}')} s",
                f">= {GOAL_ROWS_PER_S:,} rows/s" if goal else "-",
                anchor if goal else f"counts {results[0]['counts']}" if mode == "rejoin" else "-",
                _median(speeds[mode]) >= GOAL_ROWS_PER_S if goal else None,
            )
        )
    for mode in ("model", "dict"):
        rss = [float(r["extra_rss"]) / MB for r in runs[mode]]  # type: ignore[arg-type]
        tenth = [float(r["extra_rss"]) / MB for r in small[mode]]  # type: ignore[arg-type]
        growth = _median(rss) - _median(tenth)
        size, small_size = (int(str(measured[mode][0]["rows"])) for measured in (runs, small))
        rows.append(
            Row(
                f"{names[mode]}: extra peak RSS at {size:,} rows (and at {small_size:,})",
                f"{spread(rss, '{:.0f}')} MB ({spread(tenth, '{:.0f}')} MB: {growth:+.0f} MB)",
                f"<= {GOAL_EXTRA_RSS_MB} MB, flat (<= +{GOAL_RSS_GROWTH_MB} MB over a tenth of the rows)",
                "-",
                max(rss) <= GOAL_EXTRA_RSS_MB and growth <= GOAL_RSS_GROWTH_MB,
            )
        )
    return rows


def run(work: Path, rows: int, rounds: int) -> list[Row]:
    """Files of ``rows`` requests and of a tenth of them under ``work``; every mode measured: the table's rows."""
    big, small = work / "typed", work / "typed-tenth"
    big.mkdir()
    small.mkdir()
    prepare(big, rows)
    prepare(small, rows // 10)
    runs = measure_rounds(big, rounds)
    tenth = measure_rounds(small, 1, ("model", "dict"))
    return table_rows(runs, tenth)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", help="measure one mode on files made before (a child run)")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args()
    if args.folder and args.mode:
        emit(measure(Path(args.folder), args.mode))
        return
    with tempfile.TemporaryDirectory(prefix="bench-typed-", dir=os.environ.get("BENCH_TMP")) as work:
        print(table(run(Path(work), args.rows, args.rounds)))


if __name__ == "__main__":
    main()
