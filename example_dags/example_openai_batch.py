"""
The whole batch workflow: validate and upload a JSONL file, create the batch, wait for it in a deferrable
sensor, download the output and error files, then join the results to the inputs by ``custom_id``.

The download updates the Asset ``example_openai_batch_results``: the Assets view lists each run's results, and
the event's ``extra`` holds where they landed (``output_uri``, ``error_uri``) for DAGs scheduled on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, task

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

#: Seconds between status polls: one minute suits real batches; the offline demo and the tests use less.
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))

INPUT = str(Path(__file__).parent / "data" / "landmarks.jsonl")
RESULTS = Asset("example_openai_batch_results")

with DAG(
    dag_id="example_openai_batch",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    doc_md=__doc__,
) as dag:
    upload = OpenAIBatchUploadOperator(task_id="upload", source=INPUT, endpoint="/v1/chat/completions")
    create = OpenAIBatchCreateOperator(
        task_id="create",
        input_file_id=upload.output,
        endpoint="/v1/chat/completions",
        metadata={"dag_run": "{{ run_id }}"},
    )
    wait = OpenAIBatchSensor(
        task_id="wait",
        batch_id=create.output,
        deferrable=True,
        poke_interval=POLL_SECONDS,
        max_failed_ratio=0.1,
    )
    download = OpenAIBatchDownloadOperator(task_id="download", batch_id=wait.output, asset=RESULTS)

    @task
    def join_results(downloaded: dict[str, Any]) -> dict[str, Any]:
        """One row per input request, in input order, with its answer or its error."""
        from airflow_provider_openai_batch.results import iter_joined, write_joined

        folder = Path(downloaded["output_uri"] or downloaded["error_uri"]).parent
        target = folder / "joined.jsonl"
        counts = write_joined(iter_joined(INPUT, [downloaded["output_uri"], downloaded["error_uri"]]), target)
        return {"joined_uri": str(target), "counts": counts, "usage": downloaded["usage"]}

    join_results(download.output)
