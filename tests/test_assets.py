"""The download operator updates an Asset; a DAG scheduled on it is queued, and finds the results in the event."""

from __future__ import annotations

import pendulum
import pytest
from airflow.sdk import DAG, Asset, task
from sqlalchemy import select

from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchDownloadOperator
from tests.conftest import register, task_states, xcoms

RESULTS = Asset("file:///data/openai-batch/nightly-results")


def test_downstream_dag_runs_on_the_download(airflow_db, hook, server, input_file):
    from airflow.models.asset import AssetDagRunQueue, AssetEvent
    from airflow.utils.session import create_session

    batch = hook.create_batch(hook.upload_file(input_file).id, "/v1/chat/completions")
    hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)
    start = pendulum.datetime(2026, 1, 1, tz="UTC")
    with DAG("asset_producer", schedule=None, start_date=start, catchup=False) as producer:
        OpenAIBatchDownloadOperator(task_id="download", batch_id=batch.id, asset=RESULTS.uri)
    with DAG("asset_consumer", schedule=[RESULTS], start_date=start, catchup=False) as consumer:

        @task(inlets=[RESULTS])
        def read_results(inlet_events=None) -> dict:
            event = inlet_events[RESULTS][-1]
            with open(event.extra["output_uri"]) as results:
                return {"batch_id": event.extra["batch_id"], "lines": sum(1 for _ in results)}

        read_results()
    register(producer)
    register(consumer)

    produced = producer.test()
    assert task_states(produced) == {"download": "success"}
    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_dag_id == "asset_producer")).all()
        queued = session.scalars(
            select(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == "asset_consumer")
        ).all()
        assert len(events) == 1
        assert events[0].extra["batch_id"] == batch.id
        assert events[0].extra["output_lines"] == 10
        assert queued, "the scheduler has nothing queued for the consumer DAG"

    consumed = consumer.test()
    assert xcoms(consumed, "read_results")[-1] == {"batch_id": batch.id, "lines": 10}


def test_openlineage_facets(conn_id, hook, server, input_file, tmp_path):
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator

    upload = OpenAIBatchUploadOperator(task_id="upload", source=str(input_file), endpoint="/v1/chat/completions")
    file_id = upload.execute({})
    facets = upload.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in facets.inputs] == [("file", str(input_file))]
    assert [(d.namespace, d.name) for d in facets.outputs] == [
        (f"openai://127.0.0.1:{server.port}", f"files/{file_id}")
    ]

    batch = hook.create_batch(file_id, "/v1/chat/completions")
    done = hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)

    class TI:
        dag_id, task_id, run_id, map_index = "d", "download", "r", -1

        def xcom_push(self, key, value):
            pass

    download = OpenAIBatchDownloadOperator(task_id="download", batch_id=batch.id, destination=str(tmp_path / "res"))
    download.execute({"ti": TI()})
    facets = download.get_openlineage_facets_on_complete(None)
    assert [d.name for d in facets.inputs] == [f"files/{done.output_file_id}"]
    assert [(d.namespace, d.name) for d in facets.outputs] == [("file", str(tmp_path / "res" / "output.jsonl"))]
