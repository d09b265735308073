"""
A nightly job too big for one batch: 120,000 requests are validated and split into files of at most 50,000,
the batches run in parallel through dynamic task mapping, and the results of every shard are joined back to
the original input, one row per request, in input order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

EMBEDDING_MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_EMBEDDING_MODEL", "text-embedding-3-small")
#: Seconds between status polls: one minute suits real batches; the offline demo and the tests use less.
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))

REQUESTS = int(os.environ.get("OPENAI_BATCH_EXAMPLE_SHARDED_REQUESTS", "120000"))

with DAG(
    dag_id="example_openai_batch_sharded",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    doc_md=__doc__,
) as dag:

    @task
    def write_input(run_id: str | None = None) -> str:
        """Stands in for the extract step of an ETL job: one embedding request per product description."""
        home = Path(os.environ.get("AIRFLOW_HOME", "/tmp")) / "openai_batch_inputs"
        home.mkdir(parents=True, exist_ok=True)
        path = home / f"products-{(run_id or 'manual').replace(':', '_')}.jsonl"
        with path.open("w") as out:
            for i in range(REQUESTS):
                request = {
                    "custom_id": f"product-{i:06d}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": EMBEDDING_MODEL, "input": f"product {i} description"},
                }
                out.write(json.dumps(request) + "\n")
        return str(path)

    source = write_input()
    upload = OpenAIBatchUploadOperator(task_id="upload", source=source, endpoint="/v1/embeddings", sharding="always")
    create = OpenAIBatchCreateOperator.partial(task_id="create", endpoint="/v1/embeddings").expand(
        input_file_id=upload.output
    )
    wait = OpenAIBatchSensor.partial(task_id="wait", deferrable=True, poke_interval=POLL_SECONDS).expand(
        batch_id=create.output
    )
    download = OpenAIBatchDownloadOperator.partial(task_id="download").expand(batch_id=wait.output)

    @task
    def join(input_path: str, downloads: list[dict[str, Any]]) -> dict[str, Any]:
        """One row per input request, in input order, joined across every shard's output and error files."""
        from airflow_provider_openai_batch.results import iter_joined, write_joined

        results = [uri for d in downloads for uri in (d["output_uri"], d["error_uri"]) if uri]
        target = Path(input_path).with_suffix(".joined.jsonl")
        counts = write_joined(iter_joined(input_path, results), target)
        return {"joined_uri": str(target), "counts": counts, "shards": len(downloads)}

    join(source, download.output)
