"""
What a person sees in the Airflow UI: task logs without per-request HTTP lines, an extra link only where a batch
page exists, result locations under their own XCom keys, and a connection form whose hints fit.

The browser itself is driven by ``make ui-check`` (scripts/ui_check.py); these tests pin each behaviour with
real Airflow (dag.test, the API server's hook metadata) against FakeOpenAIServer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from airflow_provider_openai_batch.hooks.openai_batch import REQUEST_LOGGERS, OpenAIBatchHook
from airflow_provider_openai_batch.links.openai_batch import OpenAIBatchLink, batch_page_url, console_of
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchTrigger
from tests.conftest import connection_env, deferring_server, jsonl, request_line, run_dag, task_states, xcoms

REQUEST_LINE = "HTTP Request:"
#: Wider than this, a placeholder is cut off in the connection form's inputs (measured by make ui-check).
MAX_PLACEHOLDER_CHARS = 40


@pytest.fixture(autouse=True)
def _restore_request_loggers() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in REQUEST_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _request_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(REQUEST_LINE)]


# --- quiet logs -----------------------------------------------------------------------------------------


def test_hook_calls_log_no_request_lines_at_info(conn_id, server, caplog):
    caplog.set_level(logging.INFO)
    hook = OpenAIBatchHook(conn_id)
    list(hook.list_batches())
    hook.get_file(hook.upload_file(jsonl([request_line(0)])).id)
    assert server.count("files.create") == 1  # the calls really went out
    assert _request_lines(caplog) == []


def test_request_lines_come_back_with_debug_logging(conn_id, server, caplog):
    caplog.set_level(logging.INFO)
    list(OpenAIBatchHook(conn_id).list_batches())
    caplog.set_level(logging.DEBUG)  # a user turns debug on: the next client built follows
    list(OpenAIBatchHook(conn_id).list_batches())
    assert [line.split('"')[0].strip() for line in _request_lines(caplog)] == [
        f"HTTP Request: GET {server.base_url}/batches?limit=100"
    ]


def test_a_request_logger_the_user_configured_is_left_alone(conn_id, server, caplog):
    caplog.set_level(logging.INFO)
    logging.getLogger("httpx2").setLevel(logging.INFO)
    list(OpenAIBatchHook(conn_id).list_batches())
    assert len(_request_lines(caplog)) == 1


async def test_the_triggers_event_logs_as_one_short_line(conn_id, server, hook):
    batch = hook.create_batch(hook.upload_file(jsonl([request_line(i) for i in range(3)])).id, "/v1/chat/completions")
    trigger = OpenAIBatchTrigger(
        batch_id=batch.id, conn_id=conn_id, poll_interval=0.05, end_time=batch.created_at + 60, jitter_first_poll=False
    )
    events = [event async for event in trigger.run()]
    (event,) = events
    assert event.payload["summary"]["request_counts"]["completed"] == 3  # execute_complete still gets it all
    # Airflow's triggerer logs "Trigger fired event ... result=<repr(event)>" into the task log.
    assert repr(event) == f"TriggerEvent<terminal: Batch {batch.id} ended: completed>"
    assert str(event) == repr(event)


# --- the extra link --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "azure", "console"),
    [
        ("https://api.openai.com/v1", False, "openai"),
        ("https://api.openai.com/v1/", False, "openai"),
        ("https://eu.api.openai.com/v1", False, "openai"),
        ("https://res.openai.azure.com/openai/", True, "azure"),
        ("https://res.openai.azure.com/openai/v1/", False, "azure"),
        ("https://res.cognitiveservices.azure.com/openai/v1/", False, "azure"),
        ("http://127.0.0.1:8000/v1", True, "azure"),
        ("http://127.0.0.1:8000/v1", False, None),
        ("https://llm-gateway.example.com/v1", False, None),
        ("https://api.openai.com.evil.example/v1", False, None),
        ("https://notapi.openai.com/v1", False, None),
        ("", False, None),
    ],
)
def test_the_link_follows_the_connection(base_url, azure, console):
    assert console_of(base_url, azure=azure, batch_link="auto") == console
    assert console_of(base_url, azure=azure) == console
    url = batch_page_url("batch_abc", console)
    assert url == ("https://platform.openai.com/batches/batch_abc" if console == "openai" else None)


@pytest.mark.parametrize(
    ("conn", "console"),
    [
        ({"password": "sk-1"}, "openai"),
        ({"password": "sk-1", "host": "https://eu.api.openai.com/v1"}, "openai"),
        (
            {
                "password": "k",
                "host": "https://res.openai.azure.com",
                "extra": {"api_type": "azure", "api_version": "2024-10-21"},
            },
            "azure",
        ),
        ({"password": "k", "host": "https://res.openai.azure.com/openai/v1/"}, "azure"),
        ({"password": "k", "host": "http://vllm.internal:8000/v1"}, None),
        ({"password": "k", "host": "https://gateway.example/openai/v1", "extra": {"batch_link": "openai"}}, "openai"),
        ({"password": "sk-1", "extra": {"batch_link": "none"}}, None),
    ],
)
def test_the_hook_tells_the_link_where_requests_go(monkeypatch, conn, console):
    monkeypatch.setenv("AIRFLOW_CONN_LINKED", json.dumps({"conn_type": "openai_batch", **conn}))
    hook = OpenAIBatchHook("linked")
    assert console_of(hook.base_url, azure=hook.is_azure, batch_link=hook.batch_link) == console


def test_the_link_persists_nothing_without_xcom_push():
    pushed: list[tuple[str, object]] = []

    class TI:
        def xcom_push(self, key: str, value: object) -> None:
            pushed.append((key, value))

    class Quiet:
        do_xcom_push = False

    OpenAIBatchLink.persist(
        {"ti": TI()}, Quiet(), batch_id="batch_1", base_url="https://api.openai.com/v1", azure=False
    )
    assert pushed == []
    OpenAIBatchLink.persist(
        {"ti": TI()}, object(), batch_id="batch_1", base_url="https://api.openai.com/v1", azure=False
    )
    assert pushed == [("openai_batch_link", {"batch_id": "batch_1", "console": "openai"})]


def _links_as_the_api_serves_them(run, task_id: str) -> dict[str, str | None]:
    """What GET …/taskInstances/{task_id}/links answers: the serialized task's links for this task instance."""
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        dag = SerializedDagModel.get_dag(run.dag_id, session=session)
        task = dag.get_task(task_id)
        ti = run.get_task_instance(task_id, session=session)
        return {name: task.get_extra_links(ti, name) or None for name in task.extra_links}


def test_a_gateway_to_openai_links_the_deferred_sensor_to_its_batch_page(airflow_db, monkeypatch, input_file, tmp_path):
    """A connection to a gateway that forwards to OpenAI (``batch_link=openai``): the link names the batch's page."""
    with deferring_server() as server:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server, batch_link="openai"))

        def build():
            up = OpenAIBatchUploadOperator(task_id="upload", source=str(input_file), endpoint="/v1/chat/completions")
            create = OpenAIBatchCreateOperator(
                task_id="create", input_file_id=up.output, endpoint="/v1/chat/completions"
            )
            wait = OpenAIBatchSensor(task_id="wait", batch_id=create.output, deferrable=True, poke_interval=0.2)
            OpenAIBatchDownloadOperator(task_id="download", batch_id=wait.output, destination=str(tmp_path))

        run = run_dag(build)
        assert server.count_from("batches.retrieve", "AsyncOpenAI") >= 1  # the sensor deferred
    assert set(task_states(run).values()) == {"success"}
    page = f"https://platform.openai.com/batches/{xcoms(run, 'create')[-1]}"
    for task_id in ("create", "wait", "download"):
        assert xcoms(run, task_id, key="_link_OpenAIBatchLink")[-1] == page
        assert _links_as_the_api_serves_them(run, task_id) == {"OpenAI Batch": page}


# --- result locations -------------------------------------------------------------------------------------


def test_download_pushes_result_locations_under_their_own_keys(airflow_db, conn_id, hook, server, tmp_path, caplog):
    batch = hook.create_batch(
        hook.upload_file(
            jsonl(
                [request_line(i) for i in range(4)]
                + [request_line(9, fake_error={"status_code": 400, "code": "invalid_prompt"})]
            )
        ).id,
        "/v1/chat/completions",
    )
    hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)

    def build():
        OpenAIBatchDownloadOperator(task_id="download", batch_id=batch.id, destination=str(tmp_path))

    run = run_dag(build)
    assert task_states(run) == {"download": "success"}
    summary = xcoms(run, "download")[-1]
    assert xcoms(run, "download", key="output_uri")[-1] == summary["output_uri"] == str(tmp_path / "output.jsonl")
    assert xcoms(run, "download", key="error_uri")[-1] == summary["error_uri"] == str(tmp_path / "errors.jsonl")


# --- the connection form ---------------------------------------------------------------------------------


@pytest.mark.skipif(
    __import__("tests.conftest", fromlist=["AIRFLOW_VERSION"]).AIRFLOW_VERSION < (3, 1),
    reason="Airflow 3.0's API server describes connection forms in another shape (no standard_fields)",
)
def test_the_connection_form_as_the_ui_receives_it():
    """The API server's hook metadata for this connection type: what the UI draws the form from."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    (meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "openai_batch"]
    standard = meta.standard_fields
    assert standard.host.title == "Base URL" and standard.password.title == "API key"
    assert standard.host.placeholder == "https://api.openai.com/v1"
    for field in (standard.host, standard.password):
        assert len(field.placeholder) <= MAX_PLACEHOLDER_CHARS, field.placeholder
    assert all(getattr(standard, name).hidden for name in ("login", "port", "url_schema"))
    extra = meta.extra_fields
    assert list(extra) == [
        "organization",
        "project",
        "api_type",
        "api_version",
        "timeout",
        "max_retries",
        "batch_link",
        "default_headers",
    ]
    assert "OpenAI-Organization header" in extra["organization"]["description"]
    assert "OpenAI-Project header" in extra["project"]["description"]
    assert all(field["description"] for field in extra.values())


def test_a_dag_run_at_debug_level_shows_request_lines(airflow_db, conn_id, hook, server, tmp_path, monkeypatch, caplog):
    """A user who sets ``[logging] logging_level = DEBUG`` gets the per-request lines back in the task log."""
    # A fresh process: no level left on the transport's logger by earlier tests in this one.
    monkeypatch.setattr(logging.getLogger("httpx2"), "level", logging.NOTSET)
    batch = hook.create_batch(hook.upload_file(jsonl([request_line(0)])).id, "/v1/chat/completions")
    hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=120)
    monkeypatch.setenv("AIRFLOW__LOGGING__LOGGING_LEVEL", "DEBUG")  # for whatever configures logging in the run
    caplog.set_level(logging.DEBUG)  # what that setting does to the root logger of a task process

    def build():
        OpenAIBatchDownloadOperator(task_id="download", batch_id=batch.id, destination=str(tmp_path))

    run = run_dag(build)
    assert task_states(run) == {"download": "success"}
    httpx2 = logging.getLogger("httpx2")
    state = (httpx2.level, httpx2.disabled, httpx2.propagate, logging.root.manager.disable, logging.root.level)
    assert f"HTTP Request: GET {server.base_url}/batches/{batch.id}" in "\n".join(_request_lines(caplog)), state
