"""
Embeddings: requests built in a task, a batch created and waited for in one deferrable task
(``wait_for_completion=True``), the vectors downloaded and read back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)

EMBEDDING_MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_EMBEDDING_MODEL", "text-embedding-3-small")
#: Seconds between status polls: one minute suits real batches; the offline demo and the tests use less.
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))

DOCUMENTS = [
    "Airflow schedules and monitors workflows.",
    "The Batch API halves the cost of asynchronous requests.",
    "Embeddings map text to vectors.",
    "Object storage keeps results durable.",
    "Retries must never pay twice.",
]

with DAG(
    dag_id="example_openai_batch_embeddings",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    doc_md=__doc__,
) as dag:

    @task
    def embedding_requests() -> list[dict[str, Any]]:
        return [
            {
                "custom_id": f"doc-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": EMBEDDING_MODEL, "input": text},
            }
            for i, text in enumerate(DOCUMENTS)
        ]

    upload = OpenAIBatchUploadOperator(task_id="upload", source=embedding_requests(), endpoint="/v1/embeddings")
    create = OpenAIBatchCreateOperator(
        task_id="create_and_wait",
        input_file_id=upload.output,
        endpoint="/v1/embeddings",
        wait_for_completion=True,
        deferrable=True,
        poll_interval=POLL_SECONDS,
    )
    download = OpenAIBatchDownloadOperator(task_id="download", batch_id=create.output)

    @task
    def vectors(downloaded: dict[str, Any]) -> dict[str, int]:
        """Dimensions per document, read from the downloaded output file."""
        from airflow_provider_openai_batch.storage import open_source

        dims: dict[str, int] = {}
        with open_source(downloaded["output_uri"]) as stream:
            for line in stream:
                row = json.loads(line)
                dims[row["custom_id"]] = len(row["response"]["body"]["data"][0]["embedding"])
        return dims

    vectors(download.output)
