"""
Metrics as a StatsD server receives them: Airflow's real StatsD client, configured through ``[metrics]`` in a fresh
process (Airflow reads it once), sending UDP to a listener on 127.0.0.1; names, values and tags are asserted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

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
    metrics.requests_ended({"succeeded": 97, "failed": 2, "expired": 0, "missing": 1}, tags)
    metrics.tokens_used({"input_tokens": 1234, "cached_input_tokens": 200, "output_tokens": 567,
                         "reasoning_tokens": 0, "total_tokens": 1801}, tags)
    metrics.cost(0.012345, "USD", tags)
    metrics.estimated_cost(0.5, None, "USD", tags)
    metrics.queue_refused(tags)
    metrics.queue_waited(30.5, tags)
    metrics.poll_failures(3, tags)
"""

EXPECTED = {
    "batches.created": (1.0, "c"),
    "batches.ended.completed": (1.0, "c"),
    "batches.duration": (90_000.0, "ms"),
    "batches.ended.expired": (1.0, "c"),
    "requests.succeeded": (97.0, "c"),
    "requests.failed": (2.0, "c"),
    "requests.missing": (1.0, "c"),
    "tokens.input": (1234.0, "c"),
    "tokens.cached_input": (200.0, "c"),
    "tokens.output": (567.0, "c"),
    "cost.usage": (12_345.0, "c"),
    "cost.estimate_low": (500_000.0, "c"),
    "queue.refusals": (1.0, "c"),
    "queue.wait": (30_500.0, "ms"),
    "poll.failures": (3.0, "c"),
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


def test_a_task_run_by_dag_test_sends_them_tagged_with_its_dag_and_task(
    listener: socket.socket, airflow_db: None
) -> None:
    from airflow.serialization.serialized_objects import LazyDeserializedDAG

    if not hasattr(LazyDeserializedDAG, "from_dag"):
        pytest.skip("Airflow 3.0 cannot register a DAG defined outside the DAG folder; the tests above cover 3.0")
    code = f"""
import pendulum
from airflow.sdk import DAG, task
from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.dag_processing.collection import update_dag_parsing_results_in_db
from airflow.serialization.serialized_objects import LazyDeserializedDAG
from airflow.utils.session import create_session

from airflow_provider_openai_batch import metrics

with DAG("metrics_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False) as dag:
    @task(task_id="send")
    def send(**context):
        tags = metrics.tags_from_context(context, model={MODEL!r}, endpoint={ENDPOINT!r})
{textwrap.indent(textwrap.dedent(CALLS), " " * 8)}

    send()

with create_session() as session:
    DagBundlesManager().sync_bundles_to_db(session=session)
    session.flush()
    update_dag_parsing_results_in_db(
        "dags-folder", None, [LazyDeserializedDAG.from_dag(dag)], {{}}, None, set(), session
    )
run = dag.test()
assert str(run.state) == "success", run.state
"""
    run(code, metrics_env(listener.getsockname()[1], influx_tags=True))
    got = received(listener)
    tags = f",model={MODEL_TAG},endpoint={ENDPOINT},dag_id=metrics_probe,task_id=send"
    assert got["batches.created" + tags] == (1.0, "c")
    assert got["batches.duration" + tags] == (90_000.0, "ms")
    assert got["tokens.input" + tags] == (1234.0, "c")
    assert got["cost.usage" + tags + ",currency=USD"] == (12_345.0, "c")
    assert len(got) == len(EXPECTED)


def test_a_metric_that_cannot_be_sent_does_not_fail_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_openai_batch import metrics

    class Broken:
        @staticmethod
        def incr(*args: object, **kwargs: object) -> None:
            raise OSError("statsd host unreachable")

        timing = incr

    monkeypatch.setattr(metrics, "_stats", lambda: Broken)
    metrics.batch_created(metrics.metric_tags(model="gpt-4o"))
    metrics.queue_waited(1.0, metrics.metric_tags())


def test_tags_leave_out_what_is_unknown() -> None:
    from airflow_provider_openai_batch import metrics

    assert metrics.metric_tags(model="gpt-4o", endpoint=None, dag_id="", task_id="t") == {
        "model": "gpt-4o",
        "task_id": "t",
    }
    assert metrics.tags_from_context({}, model=None, endpoint="/v1/embeddings") == {"endpoint": "/v1/embeddings"}
