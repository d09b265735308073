"""
Two deployments made from one configuration never share a batch or an upload, and one deployment's salt is the
same on every try: the default salt is a random id kept in the deployment's own metadata database (the Airflow
Variable ``openai_batch_deployment_id``), read through the Task SDK in a real ``dag.test()`` run.

The second deployment is the same configuration over an empty metadata database: the first deployment's DAG run and
Variable are deleted between the runs, so both runs have the same scheduled-looking ``run_id``.
"""

from __future__ import annotations

import pendulum
import pytest

from airflow_provider_openai_batch import idempotency
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import DEPLOYMENT_ID_VARIABLE, IDEMPOTENCY_METADATA_KEY
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchUploadOperator,
)
from tests.conftest import jsonl, register, request_line, xcoms

LOGICAL_DATE = pendulum.datetime(2026, 3, 1, tz="UTC")
#: What the official docker-compose gives every deployment made from it.
COMPOSE_API_URL = "http://airflow-apiserver:8080/execution/"


def run_once(file_id: str, source: object) -> object:
    from airflow.sdk import DAG

    with DAG(dag_id="salted", schedule=None, start_date=LOGICAL_DATE, catchup=False) as dag:
        OpenAIBatchCreateOperator(
            task_id="create",
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            metadata={"fake_scenario": "stall"},
        )
        OpenAIBatchUploadOperator(task_id="upload", source=source, endpoint="/v1/chat/completions")
    register(dag)
    return dag.test(run_after=LOGICAL_DATE, logical_date=LOGICAL_DATE)


def forget_deployment() -> None:
    """An empty metadata database: no DAG run, no Variable (and no salt cached in this process)."""
    from airflow.api.common.delete_dag import delete_dag
    from airflow.models import Variable

    delete_dag("salted")
    Variable.delete(DEPLOYMENT_ID_VARIABLE)
    idempotency._salt_cache.clear()


def variable() -> str | None:
    from airflow.models import Variable

    return Variable.get(DEPLOYMENT_ID_VARIABLE, default_var=None)


def test_two_deployments_from_one_config_share_nothing(airflow_db, server, conn_id, tmp_path, monkeypatch):
    monkeypatch.delenv("AIRFLOW__OPENAI_BATCH__DEPLOYMENT_SALT", raising=False)
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", COMPOSE_API_URL)
    idempotency._salt_cache.clear()
    from airflow.models import Variable

    Variable.delete(DEPLOYMENT_ID_VARIABLE)
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl([request_line(i) for i in range(4)]))

    first = run_once(file_id, str(source))
    first_id = variable()
    assert first_id, "the deployment's id was kept in its metadata database"
    first_run_id = first.run_id
    first_upload = xcoms(first, "upload")[-1]
    forget_deployment()
    second = run_once(file_id, str(source))
    second_id = variable()

    assert second.run_id == first_run_id
    assert first_id != second_id
    made = [b for b in server.state.batches.values() if b.input_file_id == file_id]
    assert len(made) == 2, "each deployment created its own batch for the same run, task and input"
    assert len({(b.metadata or {})[IDEMPOTENCY_METADATA_KEY] for b in made}) == 2
    second_upload = xcoms(second, "upload")[-1]
    assert first_upload != second_upload, "the second deployment did not reuse the first one's upload"
    names = {f.filename for f in server.state.files.values() if f.filename.startswith("requests.")}
    assert len(names) == 2


def test_the_salt_is_kept_across_runs_of_one_deployment(airflow_db, server, conn_id, tmp_path, monkeypatch):
    """Within a deployment the id is read back, never made again: a retry on another worker computes the same key."""
    monkeypatch.delenv("AIRFLOW__OPENAI_BATCH__DEPLOYMENT_SALT", raising=False)
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl([request_line(i) for i in range(4)]))
    run_once(file_id, str(source))
    kept = variable()
    from airflow.api.common.delete_dag import delete_dag

    delete_dag("salted")
    idempotency._salt_cache.clear()  # another worker process: nothing cached
    run_once(file_id, str(source))
    assert variable() == kept


@pytest.mark.parametrize("explicit", ["prod-eu-1"])
def test_an_explicit_salt_wins(explicit, monkeypatch):
    monkeypatch.setenv("AIRFLOW__OPENAI_BATCH__DEPLOYMENT_SALT", explicit)
    assert idempotency.deployment_salt() == explicit
