"""
Shared fixtures: an isolated Airflow home on SQLite, a FakeOpenAIServer per test, and the connection to it.

Airflow reads its configuration at import time, so the environment is set here, before anything imports it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME / 'airflow.db'}"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parent.parent / "example_dags")
os.environ.pop("OPENAI_API_KEY", None)

import pytest  # noqa: E402

from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook  # noqa: E402
from airflow_provider_openai_batch.testing import FakeOpenAIServer, Timings  # noqa: E402


def _attach_memory_filesystem() -> None:
    """Any fsspec filesystem can back an ObjectStoragePath once attached; the tests use fsspec's in-memory one."""
    import fsspec
    from airflow.sdk.io.store import attach

    attach("memory", fs=fsspec.filesystem("memory"))


_attach_memory_filesystem()

FAST = Timings(validating=0.05, in_progress=0.2, finalizing=0.05, cancelling=0.05)


def connection_env(server: FakeOpenAIServer, **extra: object) -> str:
    return json.dumps(
        {"conn_type": "openai_batch", "host": server.base_url, "password": server.api_key, "extra": extra}
    )


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
    if url.endswith("embeddings"):
        payload: dict[str, object] = {"model": model, "input": f"text {i}"}
    elif url.endswith("responses"):
        payload = {"model": model, "input": f"question {i}"}
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
