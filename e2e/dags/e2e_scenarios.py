"""
The DAGs `make e2e` runs besides the example DAGs. Each scenario talks to its own fake OpenAI server (its own
connection id), so the batches, files and calls each scenario counts at the far end are its own.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

SMALL_INPUT = str(Path(__file__).resolve().parents[2] / "example_dags" / "data" / "landmarks.jsonl")
#: Written by the harness before the download scenario runs: enough requests for a download that takes a while.
BIG_INPUT = os.environ.get("E2E_BIG_INPUT", "/nonexistent/big.jsonl")
RESULTS = os.environ.get("E2E_RESULTS", "/tmp/e2e-results")
#: Written by the harness before the one-task job scenario runs: requests of which some fail once (transient).
JOB_INPUT = os.environ.get("E2E_JOB_INPUT", "/nonexistent/job.jsonl")
#: Requests per shard of the one-task job: a handful of requests make several shards, so several batches a round.
JOB_SHARD_REQUESTS = int(os.environ.get("E2E_JOB_SHARD_REQUESTS", "3"))
ENDPOINT = "/v1/chat/completions"
MAPPED_WAITS = 50
START = pendulum.datetime(2026, 1, 1, tz="UTC")


def _args(retries: int = 2) -> dict[str, object]:
    return {"retries": retries, "retry_delay": timedelta(seconds=2)}


def mapped_waits(dag_id: str, conn_id: str) -> DAG:
    """One upload, 50 mapped creates (one batch each), 50 mapped deferrable sensors."""
    with DAG(dag_id, schedule=None, start_date=START, catchup=False, max_active_tasks=64, default_args=_args()) as dag:
        upload = OpenAIBatchUploadOperator(task_id="upload", source=SMALL_INPUT, endpoint=ENDPOINT, conn_id=conn_id)
        create = OpenAIBatchCreateOperator.partial(
            task_id="create", input_file_id=upload.output, endpoint=ENDPOINT, conn_id=conn_id
        ).expand(metadata=[{"wait": str(i)} for i in range(MAPPED_WAITS)])
        OpenAIBatchSensor.partial(
            task_id="wait", deferrable=True, poke_interval=2, max_poll_interval=None, conn_id=conn_id
        ).expand(batch_id=create.output)
    return dag


triggerer_killed = mapped_waits("e2e_triggerer_killed", "openai_s2")
scheduler_restarted = mapped_waits("e2e_scheduler_restarted", "openai_s5")

with DAG(
    "e2e_worker_killed_in_create", schedule=None, start_date=START, catchup=False, default_args=_args()
) as worker_killed_in_create:
    # A blocking wait keeps the create task running after its API call, so the worker can die in between.
    OpenAIBatchCreateOperator(
        task_id="create",
        input_file_id=OpenAIBatchUploadOperator(
            task_id="upload", source=SMALL_INPUT, endpoint=ENDPOINT, conn_id="openai_s3"
        ).output,
        endpoint=ENDPOINT,
        conn_id="openai_s3",
        wait_for_completion=True,
        deferrable=False,
        poll_interval=2,
        max_poll_interval=None,
    )

with DAG(
    "e2e_worker_killed_in_download", schedule=None, start_date=START, catchup=False, default_args=_args()
) as worker_killed_in_download:
    big = OpenAIBatchUploadOperator(task_id="upload", source=BIG_INPUT, endpoint=ENDPOINT, conn_id="openai_s4")
    made = OpenAIBatchCreateOperator(task_id="create", input_file_id=big.output, endpoint=ENDPOINT, conn_id="openai_s4")
    ended = OpenAIBatchSensor(
        task_id="wait", batch_id=made.output, deferrable=True, poke_interval=2, conn_id="openai_s4"
    )
    OpenAIBatchDownloadOperator(
        task_id="download", batch_id=ended.output, destination=f"{RESULTS}/s4/{{{{ run_id }}}}", conn_id="openai_s4"
    )

with DAG("e2e_two_tries", schedule=None, start_date=START, catchup=False, default_args=_args()) as two_tries:
    first = OpenAIBatchUploadOperator(task_id="upload", source=SMALL_INPUT, endpoint=ENDPOINT, conn_id="openai_s6")
    batch = OpenAIBatchCreateOperator(
        task_id="create", input_file_id=first.output, endpoint=ENDPOINT, conn_id="openai_s6"
    )
    OpenAIBatchSensor(task_id="wait", batch_id=batch.output, deferrable=True, poke_interval=2, conn_id="openai_s6")

with DAG("e2e_one_task_job", schedule=None, start_date=START, catchup=False, default_args=_args()) as one_task_job:
    # The whole job in one task: shards of JOB_SHARD_REQUESTS requests, one batch each, a second round for the
    # requests that failed for a transient reason; the harness kills the worker running it at a step of its choice.
    @task.openai_batch(
        endpoint=ENDPOINT,
        destination=f"{RESULTS}/s7/{{{{ run_id }}}}/joined.jsonl",
        conn_id="openai_s7",
        max_requests_per_file=JOB_SHARD_REQUESTS,
        max_rounds=2,
        poll_interval=2,
        max_poll_interval=None,
        deferrable=True,
    )
    def job() -> str:
        return JOB_INPUT

    job()
