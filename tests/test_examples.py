"""Every example DAG runs green with dag.test() against FakeOpenAIServer, its sensors really deferring."""

from __future__ import annotations

import importlib
import json
import os

import pytest

from tests.conftest import deferring_server, task_states, xcoms


@pytest.fixture
def server():
    """Batches still running when each sensor first looks, so every sensor here really defers."""
    with deferring_server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch, airflow_db, conn_id):
    monkeypatch.setenv("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "0.2")


def _load(module: str):
    imported = importlib.import_module(f"example_dags.{module}")
    return importlib.reload(imported).dag


@pytest.mark.skipif(
    __import__("tests.conftest", fromlist=["AIRFLOW_VERSION"]).AIRFLOW_VERSION < (3, 1),
    reason="the example's download updates an Asset, which Airflow 3.0's dag.test() cannot register (its DAG "
    "processor does, in a deployment); the other examples cover the operators on 3.0",
)
def test_example_openai_batch(server, capfd, caplog):
    dag = _load("example_openai_batch")
    run = dag.test()
    out, err = capfd.readouterr()
    logs = out + err + "\n".join(record.getMessage() for record in caplog.records)
    assert set(task_states(run).values()) == {"success"}
    assert server.count_from("batches.retrieve", "AsyncOpenAI") >= 1  # the trigger polled: the sensor deferred
    assert server.batches_created == 1
    summary = xcoms(run, "wait")[-1]
    assert summary["status"] == "completed"
    assert summary["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    joined = xcoms(run, "join_results")[-1]
    assert joined["counts"] == {"succeeded": 20}
    with open(joined["joined_uri"]) as rows:
        ids = [json.loads(line)["custom_id"] for line in rows]
    assert ids == [f"landmark-{i:03d}" for i in range(20)]
    # The task logs say what happened, without the transport's line per HTTP request (a poll a minute for a day
    # would bury them: the hook keeps those lines at WARNING unless debug logging is on).
    assert f"batch {summary['batch_id']} in_progress" in logs  # the trigger's progress lines are there
    assert "HTTP Request:" not in logs
    # The fake is an OpenAI-compatible server, not OpenAI: it has no batch page, so there is no link.
    for task_id in ("create", "wait", "download"):
        assert xcoms(run, task_id, key="openai_batch_link")[-1] == {"batch_id": summary["batch_id"], "console": None}
        assert not xcoms(run, task_id, key="_link_OpenAIBatchLink")[-1]
    # Where the results landed: their own XCom keys, and an Asset event the Assets view lists.
    downloaded = xcoms(run, "download")[-1]
    assert xcoms(run, "download", key="output_uri")[-1] == downloaded["output_uri"]
    assert xcoms(run, "download", key="error_uri") == {}  # no error file: nothing pushed, pulling it gives None
    assert _asset_events("example_openai_batch_results", run) == [
        {"output_uri": downloaded["output_uri"], "output_lines": 20, "batch_id": summary["batch_id"]}
    ]


def _asset_events(name: str, run) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == name, AssetEvent.source_run_id == run.run_id)
        ).all()
        return [{k: e.extra[k] for k in ("output_uri", "output_lines", "batch_id")} for e in events]


def test_example_taskflow_maps_over_files(server):
    dag = _load("example_openai_batch_taskflow")
    run = dag.test()
    states = task_states(run)
    assert set(states.values()) == {"success"}
    assert {k for k in states if k.startswith("wait[")} == {"wait[0]", "wait[1]", "wait[2]"}
    assert server.batches_created == 3
    assert xcoms(run, "report")[-1] == {"batches": 3, "succeeded": 9, "failed": 0, "output_lines": 9}


def test_example_embeddings(server):
    dag = _load("example_openai_batch_embeddings")
    run = dag.test()
    assert set(task_states(run).values()) == {"success"}
    assert server.count_from("batches.retrieve", "AsyncOpenAI") >= 1
    assert xcoms(run, "vectors")[-1] == {f"doc-{i}": 8 for i in range(5)}


def test_example_sharded_120k(server):
    dag = _load("example_openai_batch_sharded")
    run = dag.test()
    states = task_states(run)
    assert set(states.values()) == {"success"}, states
    assert {k for k in states if k.startswith("create[")} == {"create[0]", "create[1]", "create[2]"}
    assert sorted(b.metadata and len(b.requests) for b in server.state.batches.values()) == [20_000, 50_000, 50_000]
    joined = xcoms(run, "join")[-1]
    assert joined["counts"] == {"succeeded": 120_000}
    assert joined["shards"] == 3
    with open(joined["joined_uri"]) as rows:
        ids = [json.loads(line)["custom_id"] for line in rows]
    assert ids == [f"product-{i:06d}" for i in range(120_000)]


@pytest.mark.parametrize("simulate", [True, False])
def test_example_resubmit(server, simulate):
    dag = _load("example_openai_batch_resubmit")
    run = dag.test(run_conf={"simulate_transient_failures": simulate})
    states = task_states(run)
    result = xcoms(run, "merge")[-1]
    with open(result["final"]) as rows:
        final = [json.loads(line) for line in rows]
    assert [r["custom_id"] for r in final] == [f"item-{i:02d}" for i in range(30)]
    assert result["counts"] == {"succeeded": 30}
    if simulate:
        assert result["rounds"] == 2
        assert states["upload_round_2"] == "success"
        assert server.batches_created == 2
        assert {r["custom_id"] for r in final if r["round"] == 1} == {f"item-{i:02d}" for i in range(0, 30, 5)}
        retried = [b for b in server.state.batches.values() if len(b.requests) == 6]
        assert len(retried) == 1
    else:
        assert result["rounds"] == 1
        assert states["upload_round_2"] == "skipped"
        assert server.batches_created == 1


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in __import__("pathlib").Path("example_dags").glob("example_*.py")),
)
def test_each_example_is_one_self_contained_file(name, tmp_path):
    """A user copies one file into their dags folder: it must parse there alone (no sibling imports)."""
    import shutil
    import subprocess
    import sys

    if name == "example_openai_batch_typed.py":
        pytest.importorskip("pyarrow", reason="the typed example writes Parquet: the [parquet] extra")
    shutil.copy(f"example_dags/{name}", tmp_path / name)
    code = "import runpy, sys; runpy.run_path(sys.argv[1])"
    # The user's dags folder holds this one file (Airflow puts it on sys.path); the repository is not on the path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / name)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_example_one_task_job(server):
    """Table rows → prompts → @task.openai_batch (one task, one deferral) → labels written back to the table."""
    import sqlite3
    from pathlib import Path

    dag = _load("example_openai_batch_job")
    run = dag.test()
    assert set(task_states(run).values()) == {"success"}
    job = xcoms(run, "label_reviews")[-1]
    assert job["counts"] == {"succeeded": 25, "failed": 0, "expired": 0, "cancelled": 0, "missing": 0}
    assert job["rounds"] == 1 and len(job["batches"]) == 1
    with open(job["joined_uri"]) as rows:
        assert [json.loads(line)["custom_id"] for line in rows] == [f"review-{i}" for i in range(25)]
    table = Path(importlib.import_module("example_dags.example_openai_batch_job").HOME) / "reviews.sqlite"
    labels = sqlite3.connect(table).execute("SELECT sentiment FROM reviews ORDER BY id").fetchall()
    assert len(labels) == 25 and all(label for (label,) in labels)


def test_example_typed_columns_back_into_the_table(server):
    """Table rows → prompts → @task.openai_batch(output_schema=...) → typed Parquet → the table's typed columns."""
    pytest.importorskip("pyarrow", reason="the typed example writes Parquet: the [parquet] extra")
    import sqlite3
    from pathlib import Path

    from airflow_provider_openai_batch.outputs import output_schema
    from airflow_provider_openai_batch.testing import responses

    module = importlib.import_module("example_dags.example_openai_batch_typed")
    dag = _load("example_openai_batch_typed")
    run = dag.test()
    assert set(task_states(run).values()) == {"success"}
    job = xcoms(run, "label_reviews")[-1]
    assert job["counts"]["succeeded"] == 40 and sum(job["counts"].values()) == 40
    assert job["joined_uri"].endswith(".parquet") and len(job["batches"]) == 1
    schema = output_schema(module.ReviewLabel).schema
    db = sqlite3.connect(Path(module.HOME) / "reviews.sqlite")
    rows = db.execute("SELECT id, sentiment, score, needs_reply, label_status FROM reviews ORDER BY id").fetchall()
    assert len(rows) == 40
    for id_, sentiment, score, needs_reply, status in rows:
        expected = responses.schema_value(schema, str(id_))  # the fake model's answer for this custom_id
        assert (sentiment, score, bool(needs_reply), status) == (
            expected["sentiment"], expected["score"], expected["needs_reply"], "succeeded"
        )  # fmt: skip
    assert {type(score) for (score,) in db.execute("SELECT score FROM reviews")} == {int}
