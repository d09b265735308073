"""
Shared fixtures: an isolated Airflow home on SQLite, a FakeOpenAIServer per test, and the connection to it.

Airflow reads its configuration at import time, so the environment is set here, before anything imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HOME = Path(tempfile.mkdtemp(prefix="airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME / 'airflow.db'}"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parent.parent / "example_dags")
os.environ.pop("OPENAI_API_KEY", None)

import pytest  # noqa: E402

from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook  # noqa: E402
from airflow_provider_openai_batch.testing import FakeOpenAIServer, HeldClock, Timings  # noqa: E402


def _attach_memory_filesystem() -> None:
    """Any fsspec filesystem can back an ObjectStoragePath once attached; the tests use fsspec's in-memory one."""
    import fsspec
    from airflow.sdk.io.store import attach

    attach("memory", fs=fsspec.filesystem("memory"))


_attach_memory_filesystem()

#: The batch summary the sensor and cancel operators push (DESIGN.md's XCom contract).
SUMMARY_KEYS = frozenset(
    {
        "batch_id",
        "status",
        "endpoint",
        "model",
        "input_file_id",
        "output_file_id",
        "error_file_id",
        "request_counts",
        "usage",
        "errors",
    }
)

AIRFLOW_VERSION = tuple(int(part) for part in __import__("airflow").__version__.split(".")[:2])

FAST = Timings(validating=0.05, in_progress=0.2, finalizing=0.05, cancelling=0.05)
#: Seconds a batch spends in each phase once ``deferring_server``'s clock runs (it stands still until a trigger polls).
DEFERRING = Timings(validating=0.5, in_progress=2.0, finalizing=0.5, cancelling=0.2)


@contextlib.contextmanager
def deferring_server(timings: Timings | None = None, **kwargs: Any) -> Iterator[FakeOpenAIServer]:
    """
    A fake server whose clock stands still until a batch has been waited on, then runs at real speed.

    So a sensor always finds its batch running when it first looks, and defers, however fast or slow the machine: a
    test that needs a trigger must not rest on a batch outlasting the time between its create and the first look.
    "Waited on": a trigger (an async client) read a batch, or a blocking wait read one a second time.
    """
    clock = HeldClock()
    done = threading.Event()
    with FakeOpenAIServer(timings=timings or DEFERRING, clock=clock, **kwargs) as server:

        def waited_on() -> bool:
            with server._calls_lock:
                reads = [(client, n) for (route, client), n in server.clients.items() if route == "batches.retrieve"]
            return any(n >= (1 if client.startswith("Async") else 2) for client, n in reads)

        def release() -> None:
            deadline = time.monotonic() + 600  # a run that never waits fails on its own assertions
            while not done.wait(0.05) and not waited_on() and time.monotonic() < deadline:
                pass
            clock.release()

        watcher = threading.Thread(target=release, daemon=True)
        watcher.start()
        try:
            yield server
        finally:
            done.set()
            watcher.join()


def connection_env(server: FakeOpenAIServer, **extra: object) -> str:
    return json.dumps(
        {"conn_type": "openai_batch", "host": server.base_url, "password": server.api_key, "extra": extra}
    )


@pytest.fixture(autouse=True)
def _no_settle_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creates skip the pause that lets a same-second racer show up (tests/test_duplicate_tries.py keeps it)."""
    from airflow_provider_openai_batch import idempotency

    monkeypatch.setattr(idempotency, "SETTLE_PAUSE", 0.0)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(timings=FAST) as srv:
        yield srv


@pytest.fixture
def conn_id(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """``openai_default`` pointing at the fake server, as an environment-variable connection."""
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server, max_retries=3))
    return "openai_default"


@pytest.fixture
def hook(conn_id: str) -> OpenAIBatchHook:
    return OpenAIBatchHook(conn_id, strict_response_validation=True)


def request_line(i: int, *, url: str = "/v1/chat/completions", model: str = "gpt-4o-mini", **body: object) -> dict:
    # The fields each endpoint's SDK request type marks Required (what the fake server checks, as OpenAI does).
    if url.endswith("embeddings") or url.endswith("moderations"):
        payload: dict[str, object] = {"model": model, "input": f"text {i}"}
    elif url.endswith("responses"):
        payload = {"model": model, "input": f"question {i}"}
    elif url == "/v1/completions":
        payload = {"model": model, "prompt": f"question {i}"}
    else:
        payload = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]}
    payload.update(body)
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": payload}


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


@pytest.fixture
def input_file(tmp_path: Path) -> Path:
    path = tmp_path / "input.jsonl"
    path.write_bytes(jsonl([request_line(i) for i in range(10)]))
    return path


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated SQLite metadata DB for dag.test(), once per session."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


def xcoms(dag_run, task_id: str, key: str = "return_value") -> dict[int, object]:
    """XCom values a task pushed in a dag.test() run, by map index (-1 when not mapped)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(
            XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=task_id, key=key)
        ).all()
        return {row.map_index: XComModel.deserialize_value(row) for row in rows}


def task_states(dag_run) -> dict[str, str]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return {
            (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state)
            for ti in dag_run.get_task_instances(session=session)
        }


def register(dag) -> None:
    """Write a DAG defined inside a test to the metadata DB, as the DAG processor does for files it parses."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.collection import update_dag_parsing_results_in_db
    from airflow.serialization.serialized_objects import LazyDeserializedDAG
    from airflow.utils.session import create_session

    with create_session() as session:
        DagBundlesManager().sync_bundles_to_db(session=session)
        session.flush()
        if hasattr(LazyDeserializedDAG, "from_dag"):
            lazy = LazyDeserializedDAG.from_dag(dag)
            update_dag_parsing_results_in_db("dags-folder", None, [lazy], {}, None, set(), session)
        else:
            pytest.skip(
                "Airflow 3.0 cannot register a DAG defined inside a test (no LazyDeserializedDAG.from_dag); "
                "there the example DAGs, which live in the DAG folder, cover the operators end to end"
            )


def run_dag(build, **dag_kwargs):
    """Define a DAG in a test, register it as the DAG processor would, and run it with dag.test()."""
    import pendulum
    from airflow.sdk import DAG

    with DAG(
        dag_id=build.__qualname__.replace(".<locals>.build", "").replace(".", "_"),
        schedule=dag_kwargs.pop("schedule", None),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        **dag_kwargs,
    ) as dag:
        build()
    register(dag)
    return dag.test()
