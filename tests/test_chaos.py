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


def test_the_chaos_was_thirty_percent():
    assert len(TALLY) == RUNS, "run the whole module: the tally covers every run"
    failed, total = map(sum, zip(*TALLY, strict=True))
    print(f"chaos: {failed} of {total} API calls failed ({100 * failed / total:.0f} %) across {RUNS} runs")
    assert 0.2 <= failed / total <= 0.4
