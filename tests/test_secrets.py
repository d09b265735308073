"""The API key never shows up: not in logs, XCom, rendered fields, serialized triggers or exception text."""

from __future__ import annotations

import importlib
import json
import uuid

import pytest
from sqlalchemy import select

from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import AIRFLOW_VERSION, FAST, deferring_server, task_states

SECRET = "sk-proj-SECRETabcdef0123456789XYZ"


def _everything_stored(run) -> str:
    """Every XCom value, rendered template field and trigger kwargs of the run, as one text."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.trigger import Trigger
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        xcoms = session.scalars(select(XComModel).where(XComModel.run_id == run.run_id)).all()
        rendered = session.scalars(
            select(RenderedTaskInstanceFields).where(RenderedTaskInstanceFields.run_id == run.run_id)
        ).all()
        triggers = session.scalars(select(Trigger)).all()
        parts = [json.dumps(XComModel.deserialize_value(x), default=str) for x in xcoms]
        parts += [json.dumps(r.rendered_fields, default=str) for r in rendered]
        parts += [f"{t.classpath} {json.dumps(t.kwargs, default=str)}" for t in triggers]
        assert xcoms, "the run pushed no XCom: nothing was checked"
        assert rendered, "no rendered fields were stored: nothing was checked"
        assert any("OpenAIBatchTrigger" in t.classpath for t in triggers), "no trigger row: nothing was checked"
        return "\n".join(parts)


def _run_example(monkeypatch, server: FakeOpenAIServer, key: str):
    monkeypatch.setenv(
        "AIRFLOW_CONN_OPENAI_DEFAULT",
        json.dumps({"conn_type": "openai_batch", "host": server.base_url, "password": key}),
    )
    monkeypatch.setenv("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "0.2")
    module = importlib.reload(importlib.import_module("example_dags.example_openai_batch"))
    return module.dag.test()


needs_quiet_supervisor = pytest.mark.skipif(
    AIRFLOW_VERSION < (3, 1),
    reason="Airflow 3.0's in-process supervisor logs each MaskSecret request, value included, at DEBUG",
)


@needs_quiet_supervisor
def test_a_full_run_never_shows_the_key(monkeypatch, capfd, caplog, airflow_db):
    with deferring_server(FAST, api_key=SECRET) as server:
        run = _run_example(monkeypatch, server, SECRET)
        assert set(task_states(run).values()) == {"success"}
    out, err = capfd.readouterr()
    logs = out + err + "\n".join(record.getMessage() for record in caplog.records)
    assert "example_openai_batch" in logs  # the capture really holds the run's output
    assert SECRET not in logs
    assert SECRET not in _everything_stored(run)


@needs_quiet_supervisor
def test_a_rejected_key_is_not_in_the_error(monkeypatch, capfd, caplog, airflow_db):
    with FakeOpenAIServer(api_key="sk-the-right-key-0000", timings=FAST) as server:
        run = _run_example(monkeypatch, server, SECRET)
        assert task_states(run)["upload"] == "failed"
        assert server.count("files.list") >= 1
    out, err = capfd.readouterr()
    logs = out + err + "\n".join(record.getMessage() for record in caplog.records)
    assert "HTTP 401" in logs
    assert SECRET not in logs


@pytest.mark.parametrize("extra_key", ["password", "openai_client_kwargs"])
def test_the_key_is_registered_for_masking(monkeypatch, extra_key):
    try:
        from airflow.sdk.log import redact
    except ImportError:  # Airflow 3.0
        from airflow.sdk.execution_time.secrets_masker import redact  # type: ignore[no-redef]

    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    secret = f"sk-proj-{uuid.uuid4().hex}"  # never seen by the masker before: earlier tests cannot make this pass
    assert secret in str(redact(f"calling with {secret}"))
    conn: dict = {"conn_type": "openai_batch", "host": "http://127.0.0.1:9/v1"}
    if extra_key == "password":
        conn["password"] = secret
    else:
        conn["extra"] = {"openai_client_kwargs": {"api_key": secret}}
    monkeypatch.setenv("AIRFLOW_CONN_MASKME", json.dumps(conn))
    OpenAIBatchHook("maskme").get_conn()
    assert secret not in str(redact(f"calling with {secret}"))


# --- secrets beyond the key: custom headers, client kwargs, the base URL ---------------------------------------------

HEADER_SECRET = "apim-sub-7Qx2Lr9Vb4Nc8Kd1Zt5W"


def _redact(text: str) -> str:
    try:
        from airflow.sdk.log import redact
    except ImportError:  # Airflow 3.0
        from airflow.sdk.execution_time.secrets_masker import redact  # type: ignore[no-redef]
    return str(redact(text))


def _fresh(label: str) -> str:
    """A value the masker has never seen, so no earlier test can make a masking assertion pass."""
    value = f"{label}-{uuid.uuid4().hex}"
    assert value in _redact(f"sent {value}")
    return value


@pytest.mark.parametrize(
    "where",
    [
        "default_headers",
        "default_headers_json",
        "client_kwargs_headers",
        "client_kwargs_query",
        "client_kwargs_secret_key",
        "host_credentials",
    ],
)
def test_every_header_value_and_client_secret_is_registered_for_masking(monkeypatch, where):
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    secret = _fresh("s3cr3t")
    host = "http://127.0.0.1:9/v1"
    extra: dict = {}
    if where == "default_headers":  # a gateway's own key, under a name Airflow does not know is secret
        extra["default_headers"] = {"Ocp-Apim-Subscription-Key": secret, "X-Team": "data-platform"}
    elif where == "default_headers_json":
        extra["default_headers"] = json.dumps({"Authorization": f"Basic {secret}"})
    elif where == "client_kwargs_headers":
        extra["openai_client_kwargs"] = {"default_headers": {"X-Gateway": secret}}
    elif where == "client_kwargs_query":
        extra["openai_client_kwargs"] = {"default_query": {"subscription-key": secret, "team": "data"}}
    elif where == "client_kwargs_secret_key":
        extra["openai_client_kwargs"] = {"webhook_secret": secret}
    else:
        host = f"http://gateway-user:{secret}@127.0.0.1:9/v1"
    monkeypatch.setenv(
        "AIRFLOW_CONN_MASKMORE",
        json.dumps({"conn_type": "openai_batch", "host": host, "password": "sk-test-key", "extra": extra}),
    )
    OpenAIBatchHook("maskmore").get_conn()
    assert secret not in _redact(f"sent {secret}")


def test_the_lineage_namespace_carries_no_credentials():
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_openai_batch.lineage import openai_dataset

    dataset = openai_dataset("https://svc:p4ss-word@gateway.example.com:8443/openai/v1", "files", "file-1")
    assert dataset.namespace == "openai://gateway.example.com:8443"
    assert "p4ss" not in dataset.namespace and "svc" not in dataset.namespace
    assert openai_dataset("https://api.openai.com/v1", "batches", "b").namespace == "openai://api.openai.com"


def test_the_fake_keeps_no_raw_key_in_the_headers_it_saw(monkeypatch):
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.testing.server import redacted_header

    with FakeOpenAIServer(api_key=SECRET, timings=FAST) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SEEN",
            json.dumps(
                {
                    "conn_type": "openai_batch",
                    "host": server.base_url,
                    "password": SECRET,
                    "extra": {"default_headers": {"Ocp-Apim-Subscription-Key": HEADER_SECRET, "X-Team": "etl"}},
                }
            ),
        )
        list(OpenAIBatchHook("seen").list_files())
        seen = list(server.headers_seen["files.list"])
    assert seen and SECRET not in json.dumps(seen) and HEADER_SECRET not in json.dumps(seen)
    # Still enough to tell which key was sent, and the other headers as they were.
    assert seen[0]["authorization"] == redacted_header(f"Bearer {SECRET}") != redacted_header("Bearer sk-other")
    assert seen[0]["ocp-apim-subscription-key"] == redacted_header(HEADER_SECRET)
    assert seen[0]["x-team"] == redacted_header("etl")


@needs_quiet_supervisor
def test_a_full_run_at_debug_level_never_shows_a_custom_header(monkeypatch, capfd, caplog, airflow_db):
    import logging

    monkeypatch.setenv("AIRFLOW__LOGGING__LOGGING_LEVEL", "DEBUG")  # for whatever configures logging in the run
    caplog.set_level(logging.DEBUG)  # what that setting does to the root logger of a task process
    with deferring_server(FAST, api_key=SECRET) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_OPENAI_DEFAULT",
            json.dumps(
                {
                    "conn_type": "openai_batch",
                    "host": server.base_url,
                    "password": SECRET,
                    "extra": {"default_headers": {"Ocp-Apim-Subscription-Key": HEADER_SECRET}},
                }
            ),
        )
        monkeypatch.setenv("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "0.2")
        module = importlib.reload(importlib.import_module("example_dags.example_openai_batch"))
        run = module.dag.test()
        assert set(task_states(run).values()) == {"success"}
        # The header was really sent on every call (so every client had it to leak).
        assert all(
            headers.get("ocp-apim-subscription-key") for calls in server.headers_seen.values() for headers in calls
        )
    out, err = capfd.readouterr()
    logs = out + err + "\n".join(record.getMessage() for record in caplog.records)
    assert "Sending HTTP Request" in logs  # the run really logged at DEBUG
    assert HEADER_SECRET not in logs and SECRET not in logs
    assert HEADER_SECRET not in _everything_stored(run)


def test_a_password_in_a_storage_uri_stays_out_of_lineage():
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_openai_batch.lineage import storage_dataset

    dataset = storage_dataset("ftp://etl:hunter2-pass@files.example.com/batches/in.jsonl")
    assert dataset.namespace == "ftp://files.example.com" and dataset.name == "batches/in.jsonl"
    # An "@" that is part of the location (a container on an account) is not a credential.
    assert storage_dataset("abfs://inputs@acct.dfs.core.windows.net/in.jsonl").namespace == (
        "abfs://inputs@acct.dfs.core.windows.net"
    )
