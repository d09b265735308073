"""
Chaos: the full example DAG, 20 times, with 30 % of API calls failing (429, 5xx, dropped connections), and
every run finishes with complete, correct results. Slow by nature, so it runs under ``make chaos``.
"""

from __future__ import annotations

import importlib
import json

import pytest

from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import FAST, connection_env, task_states, xcoms

pytestmark = pytest.mark.chaos
RUNS = 20
#: (failed, total) API calls per run, to show the chaos was as heavy as promised.
TALLY: list[tuple[int, int]] = []


@pytest.mark.parametrize("seed", range(RUNS))
def test_example_dag_survives_chaos(seed, monkeypatch, airflow_db):
    with FakeOpenAIServer(timings=FAST) as server:
        server.faults.chaos(0.3, kinds=("429", "500", "502", "503", "drop"), seed=seed)
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server, max_retries=10))
        monkeypatch.setenv("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "0.2")
        dag = importlib.reload(importlib.import_module("example_dags.example_openai_batch")).dag
        run = dag.test()
        injected = len(server.faults.injected)
        total = sum(server.calls.values())
    assert set(task_states(run).values()) == {"success"}, task_states(run)
    assert server.batches_created == 1
    TALLY.append((injected, total))
    assert injected >= 1, "no fault was injected in this run"
    joined = xcoms(run, "join_results")[-1]
    assert joined["counts"] == {"succeeded": 20}
    with open(joined["joined_uri"]) as rows:
        results = [json.loads(line) for line in rows]
    assert [r["custom_id"] for r in results] == [f"landmark-{i:03d}" for i in range(20)]
    for row in results:
        assert (
            row["response"]["choices"][0]["message"]["content"] == "echo: " + row["request"]["messages"][-1]["content"]
        )


JOB_RUNS = 5


@pytest.mark.parametrize("seed", range(JOB_RUNS))
def test_one_task_example_survives_chaos(seed, monkeypatch, airflow_db):
    """The one-task job (@task.openai_batch) under the same chaos: exactly one batch, every row, table updated."""
    import sqlite3
    from pathlib import Path

    with FakeOpenAIServer(timings=FAST) as server:
        server.faults.chaos(0.3, kinds=("429", "500", "502", "503", "drop"), seed=100 + seed)
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server, max_retries=10))
        monkeypatch.setenv("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "0.2")
        module = importlib.reload(importlib.import_module("example_dags.example_openai_batch_job"))
        run = module.dag.test()
        assert len(server.faults.injected) >= 1, "no fault was injected in this run"
    assert set(task_states(run).values()) == {"success"}, task_states(run)
    assert server.batches_created == 1
    job = xcoms(run, "label_reviews")[-1]
    assert job["counts"]["succeeded"] == 25
    with open(job["joined_uri"]) as rows:
        assert [json.loads(line)["custom_id"] for line in rows] == [f"review-{i}" for i in range(25)]
    labels = sqlite3.connect(Path(module.HOME) / "reviews.sqlite").execute("SELECT sentiment FROM reviews").fetchall()
    assert all(label for (label,) in labels)


@pytest.mark.parametrize("seed", range(JOB_RUNS))
def test_typed_example_survives_chaos(seed, monkeypatch, airflow_db):
    """The typed example under the same chaos: one batch, and every row's typed columns in the table."""
    pytest.importorskip("pyarrow", reason="the typed example writes Parquet: the [parquet] extra")
    import sqlite3
    from pathlib import Path

    from airflow_provider_openai_batch.outputs import output_schema
    from airflow_provider_openai_batch.testing import responses

    with FakeOpenAIServer(timings=FAST) as server:
        server.faults.chaos(0.3, kinds=("429", "500", "502", "503", "drop"), seed=200 + seed)
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server, max_retries=10))
        monkeypatch.setenv("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "0.2")
        module = importlib.reload(importlib.import_module("example_dags.example_openai_batch_typed"))
        run = module.dag.test()
        assert len(server.faults.injected) >= 1, "no fault was injected in this run"
    assert set(task_states(run).values()) == {"success"}, task_states(run)
    assert server.batches_created == 1
    assert xcoms(run, "label_reviews")[-1]["counts"]["succeeded"] == 40
    schema = output_schema(module.ReviewLabel).schema
    table = sqlite3.connect(Path(module.HOME) / "reviews.sqlite")
    rows = table.execute("SELECT id, sentiment, score, needs_reply FROM reviews ORDER BY id").fetchall()
    assert [(str(id_), s, n, bool(r)) for id_, s, n, r in rows] == [
        (str(i), *responses.schema_value(schema, str(i)).values()) for i in range(40)
    ]


def test_the_chaos_was_thirty_percent():
    assert len(TALLY) == RUNS, "run the whole module: the tally covers every run"
    failed, total = map(sum, zip(*TALLY, strict=True))
    print(f"chaos: {failed} of {total} API calls failed ({100 * failed / total:.0f} %) across {RUNS} runs")
    assert 0.2 <= failed / total <= 0.4
