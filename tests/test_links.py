"""
OpenAIBatchLink (``links/openai_batch.py``): what ``persist`` stores when a task learns its batch id, and what
``get_link`` makes of it, for every kind of connection; then the same through Airflow itself, which renders a
task's links after it runs.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_openai_batch.get_provider_info import get_provider_info
from airflow_provider_openai_batch.links.openai_batch import OpenAIBatchLink
from tests.conftest import connection_env, run_dag, xcoms

PAGE = "https://platform.openai.com/batches/batch_abc"


class TaskInstance:
    """What ``persist`` is handed as ``context["ti"]`` and ``get_link`` as ``ti_key``: one task instance's XComs."""

    def __init__(self) -> None:
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


@pytest.fixture
def ti(monkeypatch: pytest.MonkeyPatch) -> TaskInstance:
    """A task instance whose XComs ``get_link`` reads back (Airflow's XCom store, narrowed to one task)."""
    from airflow.providers.common.compat.sdk import XCom

    instance = TaskInstance()

    def get_value(*, ti_key: Any, key: str) -> Any:
        assert ti_key is instance
        return instance.xcoms.get(key)

    monkeypatch.setattr(XCom, "get_value", get_value)
    return instance


class Operator:
    do_xcom_push = True


def _round_trip(ti: TaskInstance, **connection: Any) -> str:
    OpenAIBatchLink.persist({"ti": ti}, Operator(), batch_id="batch_abc", **connection)
    return OpenAIBatchLink().get_link(Operator(), ti_key=ti)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("connection", "console", "link"),
    [
        ({"base_url": "https://api.openai.com/v1", "azure": False}, "openai", PAGE),
        ({"base_url": "https://eu.api.openai.com/v1", "azure": False}, "openai", PAGE),  # data residency
        ({"base_url": "https://res.openai.azure.com/openai/", "azure": True}, "azure", ""),  # no page to name
        ({"base_url": "https://res.openai.azure.com/openai/v1/", "azure": False}, "azure", ""),  # Azure's v1 path
        ({"base_url": "http://vllm.internal:8000/v1", "azure": False}, None, ""),  # a compatible server: no page
        ({"base_url": "https://gateway.example/v1", "azure": False, "batch_link": "openai"}, "openai", PAGE),
        ({"base_url": "https://api.openai.com/v1", "azure": False, "batch_link": "none"}, None, ""),
        ({"base_url": "https://api.openai.com/v1", "azure": False, "batch_link": "auto"}, "openai", PAGE),
    ],
)
def test_the_link_persisted_is_the_link_shown(ti, connection, console, link):
    assert _round_trip(ti, **connection) == link
    assert ti.xcoms == {OpenAIBatchLink.key: {"batch_id": "batch_abc", "console": console}}


def test_persist_stores_the_batch_and_whose_console_only(ti):
    OpenAIBatchLink.persist(
        {"ti": ti}, Operator(), batch_id="batch_1", base_url="https://api.openai.com/v1", azure=False
    )
    assert ti.xcoms == {"openai_batch_link": {"batch_id": "batch_1", "console": "openai"}}


def test_nothing_is_persisted_for_a_task_that_pushes_no_xcom(ti):
    quiet = Operator()
    quiet.do_xcom_push = False
    OpenAIBatchLink.persist({"ti": ti}, quiet, batch_id="batch_1", base_url="https://api.openai.com/v1", azure=False)
    assert ti.xcoms == {}
    assert OpenAIBatchLink().get_link(quiet, ti_key=ti) == ""  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "stored", [None, "batch_abc", ["batch_abc"], {"console": "openai"}, {"batch_id": "", "console": "openai"}]
)
def test_no_link_from_anything_but_what_persist_stores(ti, stored):
    # a task that failed before it had a batch, or a value of another shape
    if stored is not None:
        ti.xcoms[OpenAIBatchLink.key] = stored
    assert OpenAIBatchLink().get_link(Operator(), ti_key=ti) == ""  # type: ignore[arg-type]


def test_the_link_is_registered_and_on_every_operator_that_knows_a_batch():
    from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
    from airflow_provider_openai_batch.operators.openai_batch import (
        OpenAIBatchCancelOperator,
        OpenAIBatchCreateOperator,
        OpenAIBatchDownloadOperator,
    )
    from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

    assert "airflow_provider_openai_batch.links.openai_batch.OpenAIBatchLink" in get_provider_info()["extra-links"]
    for operator in (
        OpenAIBatchCreateOperator,
        OpenAIBatchSensor,
        OpenAIBatchCancelOperator,
        OpenAIBatchDownloadOperator,
        OpenAIBatchJobOperator,
    ):
        assert any(isinstance(link, OpenAIBatchLink) for link in operator.operator_extra_links), operator
    assert OpenAIBatchLink.name == "OpenAI Batch"


@pytest.mark.parametrize(("batch_link", "shown"), [("openai", True), ("none", False)])
def test_airflow_renders_the_link_a_create_persisted(airflow_db, server, monkeypatch, input_file, batch_link, shown):
    """A real run: Airflow calls ``get_link`` after the task and stores what it returns."""
    from airflow_provider_openai_batch.operators.openai_batch import (
        OpenAIBatchCreateOperator,
        OpenAIBatchUploadOperator,
    )

    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server, batch_link=batch_link))

    def build() -> None:
        up = OpenAIBatchUploadOperator(task_id="upload", source=str(input_file), endpoint="/v1/chat/completions")
        OpenAIBatchCreateOperator(task_id="create", input_file_id=up.output, endpoint="/v1/chat/completions")

    run = run_dag(build)
    batch_id = xcoms(run, "create")[-1]
    rendered = xcoms(run, "create", key="_link_OpenAIBatchLink")[-1]
    assert rendered == (f"https://platform.openai.com/batches/{batch_id}" if shown else "")
