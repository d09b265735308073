"""
TaskFlow style: a task builds request rows, and the upload → create → wait → download chain maps over
several input files (one per region) with dynamic task mapping.
"""

from __future__ import annotations

import os
from typing import Any

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_MODEL", "gpt-4o-mini")
#: Seconds between status polls: one minute suits real batches; the offline demo and the tests use less.
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))

REVIEWS = {
    "emea": ["Fast delivery, great fit.", "The zip broke after a week.", "Colour as pictured."],
    "amer": ["Runs small, order a size up.", "Excellent support team."],
    "apac": ["Arrived early!", "Packaging was damaged.", "Would buy again.", "Too pricey."],
}

with DAG(
    dag_id="example_openai_batch_taskflow",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    doc_md=__doc__,
) as dag:

    @task
    def build_requests() -> list[list[dict[str, Any]]]:
        """One list of requests per region; each becomes its own batch."""
        return [
            [
                {
                    "custom_id": f"{region}-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"Classify the sentiment: {text}"}],
                    },
                }
                for i, text in enumerate(texts)
            ]
            for region, texts in REVIEWS.items()
        ]

    upload = OpenAIBatchUploadOperator.partial(task_id="upload", endpoint="/v1/chat/completions").expand(
        source=build_requests()
    )
    create = OpenAIBatchCreateOperator.partial(task_id="create", endpoint="/v1/chat/completions").expand(
        input_file_id=upload.output
    )
    wait = OpenAIBatchSensor.partial(task_id="wait", deferrable=True, poke_interval=POLL_SECONDS).expand(
        batch_id=create.output
    )
    download = OpenAIBatchDownloadOperator.partial(task_id="download").expand(batch_id=wait.output)

    @task
    def report(results: list[dict[str, Any]]) -> dict[str, int]:
        """Sum the per-batch counts of every mapped download."""
        return {
            "batches": len(results),
            "succeeded": sum(r["request_counts"]["completed"] for r in results),
            "failed": sum(r["request_counts"]["failed"] for r in results),
            "output_lines": sum(r["output_lines"] for r in results),
        }

    report(download.output)
