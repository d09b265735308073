"""Connection mapping: what each connection field becomes in the SDK client (narrow unit tests)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk import Connection

from airflow_provider_openai_batch.get_provider_info import get_provider_info
from airflow_provider_openai_batch.hooks.openai_batch import DEFAULT_BASE_URL, client_kwargs


def test_defaults_to_openai():
    azure, kwargs = client_kwargs(Connection(conn_id="x", conn_type="openai_batch", password="sk-1"))
    assert not azure
    assert kwargs == {"api_key": "sk-1", "base_url": DEFAULT_BASE_URL}


def test_every_extra_is_mapped():
    conn = Connection(
        conn_id="x",
        conn_type="openai_batch",
        password="sk-1",
        host="https://proxy.example/v1/",
        extra=json.dumps(
            {
                "organization": "org-1",
                "project": "proj-1",
                "timeout": "30",
                "max_retries": 5,
                "default_headers": '{"X-Team": "etl"}',
            }
        ),
    )
    azure, kwargs = client_kwargs(conn)
    assert not azure
    assert kwargs == {
        "api_key": "sk-1",
        "base_url": "https://proxy.example/v1",
        "organization": "org-1",
        "project": "proj-1",
        "timeout": 30.0,
        "max_retries": 5,
        "default_headers": {"X-Team": "etl"},
    }


def test_official_openai_connection_works_unchanged():
    conn = Connection(
        conn_id="x",
        conn_type="openai",
        password="sk-1",
        extra=json.dumps({"openai_client_kwargs": {"base_url": "https://gw.example/v1", "timeout": 12}}),
    )
    _, kwargs = client_kwargs(conn)
    assert kwargs["base_url"] == "https://gw.example/v1"
    assert kwargs["timeout"] == 12


def test_azure_classic():
    conn = Connection(
        conn_id="x",
        conn_type="openai_batch",
        password="k",
        host="https://res.openai.azure.com/",
        extra=json.dumps({"api_type": "azure", "api_version": "2024-10-21"}),
    )
    azure, kwargs = client_kwargs(conn)
    assert azure
    assert kwargs == {
        "api_key": "k",
        "api_version": "2024-10-21",
        "azure_endpoint": "https://res.openai.azure.com",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"api_type": "azure"}, "api_version"),
        ({"api_type": "bedrock"}, "api_type"),
        ({"default_headers": "[1]"}, "default_headers"),
        ({"batch_link": "azure"}, "batch_link"),
    ],
)
def test_bad_extras_are_named(extra, message):
    conn = Connection(conn_id="x", conn_type="openai_batch", password="k", host="https://h", extra=json.dumps(extra))
    with pytest.raises(ValueError, match=message):
        client_kwargs(conn)


def test_provider_info_declares_the_connection_form():
    info = get_provider_info()
    assert info["package-name"] == "airflow-provider-openai-batch"
    (conn_type,) = info["connection-types"]
    assert conn_type["connection-type"] == "openai_batch"
    assert {"organization", "project", "api_type", "api_version"} <= set(conn_type["conn-fields"])
    assert conn_type["ui-field-behaviour"]["relabeling"] == {"password": "API key", "host": "Base URL"}
    for section in ("hooks", "operators", "sensors", "triggers"):
        for entry in info.get(section, []):
            for module in entry["python-modules"]:
                __import__(module)
    for link in info.get("extra-links", []):
        module, _, name = link.rpartition(".")
        assert hasattr(__import__(module, fromlist=[name]), name)


def test_task_openai_batch_is_a_registered_task_decorator():
    """``@task.openai_batch`` resolves through the provider's ``task-decorators`` (Airflow's ProvidersManager)."""
    from airflow.sdk import task

    (entry,) = get_provider_info()["task-decorators"]
    assert entry["name"] == "openai_batch"
    module, _, name = entry["class-name"].rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is task.openai_batch
