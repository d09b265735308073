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
