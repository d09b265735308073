"""
Metrics as a StatsD server receives them: Airflow's real StatsD client, configured through ``[metrics]`` in a fresh
process (Airflow reads it once), sending UDP to a listener on 127.0.0.1; names, values and tags are asserted.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL, ENDPOINT = "ft:gpt-4o-mini:acme::x1", "/v1/chat/completions"
#: The model's ':' cannot be in a StatsD name; Airflow drops a metric whose tagged name holds one.
MODEL_TAG = "ft_gpt-4o-mini_acme__x1"

#: What the task sends: every function once, with values a test can tell apart.
CALLS = """
    metrics.batch_created(tags)
    metrics.batch_ended_from_object(
        {"status": "completed", "created_at": 1_700_000_000, "completed_at": 1_700_000_090}, tags
    )
    metrics.batch_ended("expired", tags)
    metrics.batch_ended("in_progress", tags)
    metrics.requests_ended({"succeeded": 97, "failed": 2, "expired": 0, "missing": 1, "invalid_output": 4,
                            "refused": 5, "truncated": 6}, tags)
    metrics.tokens_used({"input_tokens": 1234, "cached_input_tokens": 200, "output_tokens": 567,
                         "reasoning_tokens": 0, "total_tokens": 1801}, tags)
    metrics.cost(0.012345, "USD", tags)
    metrics.estimated_cost(0.5, None, "USD", tags)
    metrics.queue_refused(tags)
"""

EXPECTED = {
    "batches.created": (1.0, "c"),
    "batches.ended.completed": (1.0, "c"),
    "batches.duration": (90_000.0, "ms"),
    "batches.ended.expired": (1.0, "c"),
    "requests.succeeded": (97.0, "c"),
    "requests.failed": (2.0, "c"),
    "requests.missing": (1.0, "c"),
    "requests.invalid_output": (4.0, "c"),
    "requests.refused": (5.0, "c"),
    "requests.truncated": (6.0, "c"),
    "tokens.input": (1234.0, "c"),
    "tokens.cached_input": (200.0, "c"),
    "tokens.output": (567.0, "c"),
    "cost.usage": (12_345.0, "c"),
    "cost.estimate_low": (500_000.0, "c"),
    "queue.refusals": (1.0, "c"),
}


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def metrics_env(port: int, *, influx_tags: bool) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": str(influx_tags),
    }


def received(sock: socket.socket) -> dict[str, tuple[float, str]]:
    """``{name without the airflow. prefix and tags: (value, type)}`` of our metrics, plus their raw names."""
    out: dict[str, tuple[float, str]] = {}
    while True:
        try:
            packet = sock.recv(65_535).decode()
        except TimeoutError:
            return out
        for line in packet.splitlines():
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if name.startswith("airflow.openai_batch."):
                out[name.removeprefix("airflow.openai_batch.")] = (float(value), kind)


def run(code: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_values_names_and_tags_reach_statsd(listener: socket.socket) -> None:
    code = f"""
from airflow_provider_openai_batch import metrics
tags = metrics.metric_tags(model={MODEL!r}, endpoint={ENDPOINT!r}, dag_id="nightly", task_id="score")
{textwrap.indent(textwrap.dedent(CALLS), "")}
"""
    run(code, metrics_env(listener.getsockname()[1], influx_tags=True))
    got = received(listener)
    tags = f",model={MODEL_TAG},endpoint={ENDPOINT},dag_id=nightly,task_id=score"
    expected = {name + tags: value for name, value in EXPECTED.items()}
    expected["cost.usage" + tags + ",currency=USD"] = expected.pop("cost.usage" + tags)
    expected["cost.estimate_low" + tags + ",currency=USD"] = expected.pop("cost.estimate_low" + tags)
    assert got == expected


def test_without_tag_support_the_names_alone_carry_the_meaning(listener: socket.socket) -> None:
    code = f"""
from airflow_provider_openai_batch import metrics
tags = metrics.metric_tags(model={MODEL!r}, endpoint={ENDPOINT!r})
{textwrap.dedent(CALLS)}
"""
    run(code, metrics_env(listener.getsockname()[1], influx_tags=False))
    assert received(listener) == EXPECTED


def summed(sock: socket.socket) -> dict[str, float]:
    """``{name without the airflow. prefix: value}`` of our metrics, counters summed over every packet."""
    out: dict[str, float] = {}
    while True:
        try:
            packet = sock.recv(65_535).decode()
        except TimeoutError:
            return out
        for line in packet.splitlines():
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if name.startswith("airflow.openai_batch."):
                key = name.removeprefix("airflow.openai_batch.")
                out[key] = out.get(key, 0.0) + float(value) if kind == "c" else float(value)


@pytest.fixture(scope="module")
def job_run(airflow_db: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, float], int]:
    """
    A real ``@task.openai_batch`` job against the fake, run by ``dag.test()`` in a process whose StatsD client
    sends to a listener here: (the job's result, the metrics received summed, the batches the fake created).
    """
    from airflow.serialization.serialized_objects import LazyDeserializedDAG

    from airflow_provider_openai_batch.testing import FakeOpenAIServer
    from tests.conftest import FAST, connection_env

    if not hasattr(LazyDeserializedDAG, "from_dag"):
        pytest.skip("Airflow 3.0 cannot register a DAG defined outside the DAG folder; the tests above cover 3.0")
    tmp_path = tmp_path_factory.mktemp("metrics-job")
    result_path = tmp_path / "result.json"
    code = f"""
import json
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task
from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.dag_processing.collection import update_dag_parsing_results_in_db
from airflow.serialization.serialized_objects import LazyDeserializedDAG
from airflow.utils.session import create_session

from airflow_provider_openai_batch import idempotency

idempotency.SETTLE_PAUSE = 0.0  # no racing try to wait for in a test

with DAG("metrics_job", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False) as dag:
    @task.openai_batch(
        task_id="score",
        endpoint={ENDPOINT!r},
        destination={str(tmp_path / "joined.jsonl")!r},
        max_requests_per_file=4,
        price_table={{"gpt-4o-mini": {{"input": 0.075, "output": 0.30}}}},
        poll_interval=0.05,
        deferrable=False,
    )
    def score():
        return [
            {{
                "custom_id": f"review-{{i}}",
                "method": "POST",
                "url": {ENDPOINT!r},
                "body": {{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": f"Rate review {{i}}"}}]}},
            }}
            for i in range(10)
        ]

    @task
    def keep(result):
        Path({str(result_path)!r}).write_text(json.dumps(result))

    keep(score())

with create_session() as session:
    DagBundlesManager().sync_bundles_to_db(session=session)
    session.flush()
    update_dag_parsing_results_in_db(
        "dags-folder", None, [LazyDeserializedDAG.from_dag(dag)], {{}}, None, set(), session
    )
run = dag.test()
assert str(run.state) == "success", run.state
"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    try:
        with FakeOpenAIServer(timings=FAST) as server:
            env = metrics_env(sock.getsockname()[1], influx_tags=True)
            env["AIRFLOW_CONN_OPENAI_DEFAULT"] = connection_env(server)
            run(code, env)
            created = server.batches_created
        got = summed(sock)
    finally:
        sock.close()
    return json.loads(result_path.read_text()), got, created


JOB_TAGS = f",model=gpt-4o-mini,endpoint={ENDPOINT},dag_id=metrics_job,task_id=score"


def test_a_job_run_by_dag_test_sends_what_its_result_reports(
    job_run: tuple[dict[str, Any], dict[str, float], int],
) -> None:
    """The counters StatsD receives are the job's own result: batches, succeeded requests, usage tokens, cost."""
    result, got, created = job_run
    usage = result["usage_totals"]
    assert created == len(result["batches"]) == 3  # 10 requests, 4 a file
    created_sent = {name: value for name, value in got.items() if name.startswith("batches.created,")}
    assert sum(created_sent.values()) == 3
    assert all(name.endswith(",dag_id=metrics_job,task_id=score") for name in created_sent)
    assert got["batches.ended.completed" + JOB_TAGS] == 3
    assert got["requests.succeeded" + JOB_TAGS] == result["counts"]["succeeded"] == 10
    assert got["tokens.input" + JOB_TAGS] == usage["input_tokens"] > 0
    assert got["tokens.output" + JOB_TAGS] == usage["output_tokens"] > 0
    assert got["cost.usage" + JOB_TAGS + ",currency=USD"] == round(result["cost_estimate"]["total"] * 1_000_000)
    assert not any(name.startswith("requests.failed") for name in got), "no request failed"


def test_a_jobs_created_batches_carry_the_model_tag(job_run: tuple[dict[str, Any], dict[str, float], int]) -> None:
    _, got, _ = job_run
    assert got.get("batches.created" + JOB_TAGS) == 3


def test_a_metric_that_cannot_be_sent_does_not_fail_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_openai_batch import metrics

    class Broken:
        @staticmethod
        def incr(*args: object, **kwargs: object) -> None:
            raise OSError("statsd host unreachable")

        timing = incr

    monkeypatch.setattr(metrics, "_stats", lambda: Broken)
    metrics.batch_created(metrics.metric_tags(model="gpt-4o"))
    metrics.batch_ended("completed", metrics.metric_tags(), created_at=1.0, ended_at=2.0)


def test_a_batch_ended_from_the_sdks_batch_sends_its_create_to_end_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from openai.types import Batch

    from airflow_provider_openai_batch import metrics

    sent: list[tuple[str, object]] = []

    class Recorder:
        @staticmethod
        def incr(name: str, count: int, tags: object = None) -> None:
            sent.append((name, count))

        @staticmethod
        def timing(name: str, value: object, tags: object = None) -> None:
            sent.append((name, value))

    monkeypatch.setattr(metrics, "_stats", lambda: Recorder)
    batch = Batch.model_construct(
        id="batch_1", status="expired", created_at=1_700_000_000, expired_at=1_700_086_400, in_progress_at=1
    )
    metrics.batch_ended_from_object(batch, metrics.metric_tags())
    assert sent == [
        ("openai_batch.batches.ended.expired", 1),
        ("openai_batch.batches.duration", datetime.timedelta(hours=24)),
    ]


def test_tags_leave_out_what_is_unknown() -> None:
    from airflow_provider_openai_batch import metrics

    assert metrics.metric_tags(model="gpt-4o", endpoint=None, dag_id="", task_id="t") == {
        "model": "gpt-4o",
        "task_id": "t",
    }
    assert metrics.tags_from_context({}, model=None, endpoint="/v1/embeddings") == {"endpoint": "/v1/embeddings"}
