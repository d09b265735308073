"""Where users run: Azure OpenAI (classic and v1 endpoints, with Azure's quirks) and OpenAI-compatible servers."""

from __future__ import annotations

import json

import pytest

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import deferring_server, jsonl, request_line, run_dag, task_states, xcoms


@pytest.fixture(autouse=True)
def _db(airflow_db):
    return None


def chain(source: str, endpoint: str = "/v1/chat/completions"):
    def build():
        up = OpenAIBatchUploadOperator(task_id="upload", source=source, endpoint=endpoint)
        create = OpenAIBatchCreateOperator(task_id="create", input_file_id=up.output, endpoint=endpoint)
        wait = OpenAIBatchSensor(task_id="wait", batch_id=create.output, deferrable=True, poke_interval=0.2)
        OpenAIBatchDownloadOperator(task_id="download", batch_id=wait.output)

    return build


@pytest.mark.parametrize("form", ["classic", "v1"])
def test_azure(form, monkeypatch, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([request_line(i, model="my-gpt4o-mini-deployment") for i in range(8)]))
    with deferring_server(azure_quirks=True) as server:
        if form == "classic":
            conn = {
                "conn_type": "openai_batch",
                "host": server.azure_endpoint,
                "password": server.api_key,
                "extra": {"api_type": "azure", "api_version": "2024-10-21"},
            }
        else:
            conn = {"conn_type": "openai_batch", "host": server.azure_v1_base_url, "password": server.api_key}
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(conn))
        run = run_dag(chain(str(source)))
        sync_client, async_client = (
            ("AzureOpenAI", "AsyncAzureOpenAI") if form == "classic" else ("OpenAI", "AsyncOpenAI")
        )
        assert server.count_from("batches.create", sync_client) == 1
        assert server.count_from("batches.retrieve", async_client) >= 1
    assert set(task_states(run).values()) == {"success"}
    downloaded = xcoms(run, "download")[-1]
    assert downloaded["model"] == "my-gpt4o-mini-deployment"
    assert (downloaded["output_lines"], downloaded["error_lines"]) == (8, 0)
    assert downloaded["error_file_id"]  # Azure names a zero-byte error file when nothing failed ...
    assert downloaded["error_uri"] is None  # ... which is not worth a location: nothing failed
    # No batch page can be named from an Azure connection (nor for the v1 endpoint's host): no link.
    console = "azure" if form == "classic" else None  # the fake's v1 endpoint is on 127.0.0.1, not *.azure.com
    assert xcoms(run, "wait", key="openai_batch_link")[-1]["console"] == console
    assert not xcoms(run, "wait", key="_link_OpenAIBatchLink")[-1]


def test_azure_quirks_parse_strictly(monkeypatch):
    from airflow_provider_openai_batch.batch_status import summarize
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    with FakeOpenAIServer(azure_quirks=True) as server:
        conn = {
            "conn_type": "openai_batch",
            "host": server.azure_endpoint,
            "password": server.api_key,
            "extra": {"api_type": "azure", "api_version": "2024-10-21"},
        }
        monkeypatch.setenv("AIRFLOW_CONN_AZ", json.dumps(conn))
        hook = OpenAIBatchHook("az", strict_response_validation=True)
        batch = hook.create_batch(hook.upload_file(jsonl([request_line(0)])).id, "/v1/chat/completions")
        assert batch.request_counts is None and batch.output_file_id == ""
        summary = summarize(batch)
        assert summary["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert summary["output_file_id"] is None and summary["error_file_id"] is None


def test_compatible_server_with_its_own_endpoint_and_window(monkeypatch, tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/rerank", "body": {"model": "rr-1", "query": f"q{i}"}}
        for i in range(5)
    ]
    source.write_bytes(jsonl(rows))
    with deferring_server(allowed_endpoints=None, completion_windows=("48h",)) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_OPENAI_DEFAULT",
            json.dumps({"conn_type": "openai_batch", "host": server.base_url, "password": server.api_key}),
        )

        def build():
            up = OpenAIBatchUploadOperator(
                task_id="upload", source=str(source), endpoint="/v1/rerank", allowed_endpoints=None
            )
            create = OpenAIBatchCreateOperator(
                task_id="create", input_file_id=up.output, endpoint="/v1/rerank", completion_window="48h"
            )
            wait = OpenAIBatchSensor(task_id="wait", batch_id=create.output, deferrable=True, poke_interval=0.2)
            OpenAIBatchDownloadOperator(task_id="download", batch_id=wait.output)

        run = run_dag(build)
        (batch,) = server.state.batches.values()
    assert set(task_states(run).values()) == {"success"}
    assert batch.completion_window == "48h" and batch.endpoint == "/v1/rerank"
    assert xcoms(run, "download")[-1]["output_lines"] == 5
    assert not xcoms(run, "wait", key="_link_OpenAIBatchLink")[-1]  # a compatible server has no batch page
