"""
Failed requests resubmitted: after the first batch, the requests that failed with a transient error (429, 5xx),
expired or were cancelled go into a second batch, and the two rounds are merged into one row per original
request. Each round is a block of tasks (copy the block for more rounds); a round with nothing to retry is
skipped. Run with ``{"simulate_transient_failures": true}`` against FakeOpenAIServer to see a second round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, get_current_context, task

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_MODEL", "gpt-4o-mini")
#: Seconds between status polls: one minute suits real batches; the offline demo and the tests use less.
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))

ENDPOINT = "/v1/chat/completions"


def _folder() -> Path:
    run_id = get_current_context()["run_id"].replace(":", "_")
    folder = Path(os.environ.get("AIRFLOW_HOME", "/tmp")) / "openai_batch_resubmit" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


with DAG(
    dag_id="example_openai_batch_resubmit",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"simulate_transient_failures": False},
    tags=["example", "openai"],
    doc_md=__doc__,
) as dag:

    @task
    def write_input(params: dict[str, Any] | None = None) -> str:
        simulate = bool((params or {}).get("simulate_transient_failures"))
        path = _folder() / "input.jsonl"
        with path.open("w") as out:
            for i in range(30):
                body: dict[str, Any] = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Summarise item {i}"}],
                }
                if simulate and i % 5 == 0:  # FakeOpenAIServer answers 503 the first time only
                    body["fake_error"] = {"status_code": 503, "code": "server_error", "times": 1}
                out.write(json.dumps({"custom_id": f"item-{i:02d}", "method": "POST", "url": ENDPOINT, "body": body}))
                out.write("\n")
        return str(path)

    def round_of_tasks(number: int, source: Any) -> tuple[Any, Any]:
        """upload → create → wait → download for one round; returns (first task, last task)."""
        upload = OpenAIBatchUploadOperator(task_id=f"upload_round_{number}", source=source, endpoint=ENDPOINT)
        create = OpenAIBatchCreateOperator(
            task_id=f"create_round_{number}", input_file_id=upload.output, endpoint=ENDPOINT
        )
        wait = OpenAIBatchSensor(
            task_id=f"wait_round_{number}",
            batch_id=create.output,
            deferrable=True,
            poke_interval=POLL_SECONDS,
            max_failed_ratio=0.5,
            # An expired or cancelled round still succeeds: its unrun requests go into the next round.
            accept_expired=True,
            accept_cancelled=True,
        )
        return upload, OpenAIBatchDownloadOperator(task_id=f"download_round_{number}", batch_id=wait.output)

    @task
    def join_round_1(input_path: str, downloaded: dict[str, Any]) -> dict[str, Any]:
        """Join round 1 and write what is worth sending again."""
        from airflow_provider_openai_batch.results import iter_joined, write_joined, write_retry_input

        joined = _folder() / "round-1.joined.jsonl"
        write_joined(iter_joined(input_path, [downloaded["output_uri"], downloaded["error_uri"]]), joined)
        retry = _folder() / "round-2.input.jsonl"
        count = write_retry_input(joined, retry)
        # "" rather than None: Airflow 3.0 cannot store a None inside an XCom value.
        return {"joined": str(joined), "retry": str(retry) if count else "", "retry_count": count}

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def anything_to_retry(round_1: dict[str, Any]) -> bool:
        return bool(round_1["retry_count"])

    @task
    def join_round_2(round_1: dict[str, Any], downloaded: dict[str, Any]) -> str:
        from airflow_provider_openai_batch.results import iter_joined, write_joined

        joined = _folder() / "round-2.joined.jsonl"
        write_joined(iter_joined(round_1["retry"], [downloaded["output_uri"], downloaded["error_uri"]]), joined)
        return str(joined)

    @task(trigger_rule="none_failed")
    def merge(round_1: dict[str, Any]) -> dict[str, Any]:
        """One row per original request, each from the latest round that ran it."""
        from airflow_provider_openai_batch.results import iter_merged, write_joined

        round_2 = get_current_context()["ti"].xcom_pull(task_ids="join_round_2")
        final = _folder() / "final.joined.jsonl"
        counts = write_joined(iter_merged([round_1["joined"], round_2]), final)
        return {"final": str(final), "counts": counts, "rounds": 2 if round_2 else 1}

    source = write_input()
    _, download_1 = round_of_tasks(1, source)
    first = join_round_1(source, download_1.output)
    upload_2, download_2 = round_of_tasks(2, first["retry"])
    anything_to_retry(first) >> upload_2
    join_round_2(first, download_2.output) >> merge(first)
