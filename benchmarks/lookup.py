"""
List calls per create: how many pages of the account's batches the create operator reads to find an earlier try's
batch, in an account holding 20,000 batches from the last 48 h (a shared org, ~7 new batches a minute).

The scan goes back to when the DAG run started (less ``CLOCK_SKEW``, 2 min), not a fixed window: a retry 10 minutes
into the run reads one page (about 85 batches). A try that created a batch also pays the settle's listing, which is
the second look as well: it lists again only while a lagging list does not show its own new batch. The anchor is the
same scan over a fixed 48 h window (the provider before), which reads 200 pages when it has nothing to find.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types
from datetime import datetime, timedelta, timezone
from typing import Any

from benchmarks.common import emit

ACCOUNT_BATCHES = 20_000
SPAN = 48 * 3600.0


class TI:
    def __init__(self, try_number: int, run_id: str = "scheduled__bench") -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = "nightly", "create", run_id, -1
        self.try_number, self.max_tries = try_number, 2

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", choices=["dag-run", "fixed-48h"], default="dag-run")
    args = parser.parse_args()
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchCreateOperator
    from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer

    now = time.time()
    clock = FakeClock(now - SPAN)
    with FakeOpenAIServer(clock=clock, api_key="sk-lookup") as server:
        conn = {"conn_type": "openai_batch", "host": server.base_url, "password": "sk-lookup"}
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(conn)
        file_id = (
            OpenAIBatchHook()
            .upload_file(b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}\n')
            .id
        )
        # Other teams' batches, evenly over the last 48 h, put straight into the fake's state (HTTP would only
        # make seeding slower; the lookups below are real HTTP).
        step = SPAN / ACCOUNT_BATCHES
        for _ in range(ACCOUNT_BATCHES):
            server.state.create_batch(file_id, "/v1/embeddings", "24h", {"team": "other"})
            clock.advance(step)
        started = datetime.fromtimestamp(clock() - 600, tz=timezone.utc)  # the DAG run began 10 minutes ago
        op = OpenAIBatchCreateOperator(task_id="create", input_file_id=file_id, endpoint="/v1/embeddings")
        results: dict[str, Any] = {"window": args.window, "account_batches": len(server.state.batches)}
        # A first try; a retry whose earlier try made the batch (found on the first page); a retry whose earlier
        # try died before sending (nothing to find: the scan reads everything back to the cutoff, the worst case).
        for label, ti in (("first_try", TI(1)), ("retry_found", TI(2)), ("retry_nothing_to_find", TI(2, "other"))):
            context: dict[str, Any] = {"ti": ti}
            if args.window == "dag-run":
                context["dag_run"] = types.SimpleNamespace(start_date=started)
            else:
                op.lookback = timedelta(hours=48)
            server.reset_counters()
            op.execute(context)
            results[f"{label}_list_calls"] = server.count("batches.list")
        emit(results)


if __name__ == "__main__":
    main()
