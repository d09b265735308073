"""
The one-task job (``OpenAIBatchJobOperator``) over 1,000,000 embedding requests against the fake server.

Airflow's part is played as in tests/test_job.py: ``execute`` until it defers, the trigger runs to its event (the
batches' own time, reported apart), then ``execute_complete`` on a fresh operator, as a new worker would, until
the job returns. The job's own time is the rest: validate, shard, upload, create, download, join and write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import PeakRss, emit

REQUESTS = 1_000_000


class _TaskInstance:
    """What the job reads of Airflow's task instance: its identity (for idempotency keys), and XCom for links."""

    dag_id, task_id, run_id, map_index, try_number, max_tries = "bench", "job", "bench-run", -1, 1, 0

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def generate(path: Path, n: int = REQUESTS) -> None:
    with path.open("w") as out:
        for i in range(n):
            out.write(
                f'{{"custom_id":"row-{i:07d}","method":"POST","url":"/v1/embeddings",'
                f'"body":{{"model":"text-embedding-3-small","input":"row {i} of the nightly table"}}}}\n'
            )


def calls(stats_url: str) -> int:
    with urllib.request.urlopen(stats_url, timeout=30) as answer:
        return sum(json.load(answer)["calls"].values())


async def _first_event(trigger: Any) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise RuntimeError("the trigger ended without an event")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--destination", required=True)
    parser.add_argument("--stats-url", required=True)
    parser.add_argument("--max-shard", type=int, default=50_000, help="requests per shard")
    args = parser.parse_args()
    from airflow.providers.common.compat.sdk import TaskDeferred

    from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator

    def operator() -> OpenAIBatchJobOperator:
        return OpenAIBatchJobOperator(
            task_id="job",
            source=args.source,
            endpoint="/v1/embeddings",
            destination=args.destination,
            poll_interval=0.5,
            max_poll_interval=1.0,
            deferrable=True,
            max_requests_per_file=args.max_shard,
        )

    context: dict[str, Any] = {"ti": _TaskInstance()}
    calls_before = calls(args.stats_url)
    own = waiting = 0.0
    triggers: list[Any] = []
    with PeakRss(every=0.02) as peak:
        started = time.perf_counter()
        step: Any = lambda: operator().execute(context)  # noqa: E731
        while True:
            try:
                result = step()
                own += time.perf_counter() - started
                break
            except TaskDeferred as deferred:
                own += time.perf_counter() - started
                triggers.append(deferred.trigger)
                started = time.perf_counter()
                event = asyncio.run(_first_event(deferred.trigger))
                waiting += time.perf_counter() - started
                started = time.perf_counter()
                step = lambda event=event: operator().execute_complete(context, event)  # noqa: E731
    emit(
        {
            "own_wall": own,
            "waiting_wall": waiting,
            "extra_rss": peak.extra,
            "peak_rss": peak.peak,
            "api_calls": calls(args.stats_url) - calls_before,
            "triggers": len(triggers),
            "batches_per_trigger": [len(t.batch_ids) for t in triggers],
            "counts": result["counts"],
            "batches": len(result["batches"]),
            "queue_refusals": result.get("queue_refusals", 0),
            "total_wall": own + waiting,
        }
    )


if __name__ == "__main__":
    main()
