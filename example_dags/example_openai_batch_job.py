"""
The whole nightly job in one task: rows from a table become prompts, ``@task.openai_batch`` runs the batch job
(shard, upload, one batch per shard, one deferred wait, download, join, resubmit what failed for a transient
reason) and the labels are written back to the table.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, task

HOME = Path(os.environ.get("AIRFLOW_HOME", "/tmp")) / "openai_batch_job"
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))
MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_MODEL", "gpt-4o-mini")


def reviews() -> sqlite3.Connection:
    """Stands in for the warehouse: a table of product reviews, each waiting for a sentiment label."""
    HOME.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(HOME / "reviews.sqlite")
    db.execute("CREATE TABLE IF NOT EXISTS reviews (id INTEGER PRIMARY KEY, text TEXT, sentiment TEXT)")
    if not db.execute("SELECT count(*) FROM reviews").fetchone()[0]:
        db.executemany("INSERT INTO reviews (id, text) VALUES (?, ?)", [(i, f"Review {i}") for i in range(25)])
        db.commit()
    return db


with DAG(
    dag_id="example_openai_batch_job",
    schedule=None,  # a nightly job would say "@daily"; the examples run when triggered (tests, demo, make e2e)
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    doc_md=__doc__,
) as dag:

    @task.openai_batch(
        endpoint="/v1/chat/completions",
        destination=str(HOME / "labels-{{ ds }}.jsonl"),
        poll_interval=POLL_SECONDS,
        deferrable=True,
    )
    def label_reviews() -> list[dict[str, Any]]:
        rows = reviews().execute("SELECT id, text FROM reviews ORDER BY id").fetchall()
        ask = "Answer positive, negative or neutral: "
        return [
            {
                "custom_id": f"review-{id_}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": ask + text}]},
            }
            for id_, text in rows
        ]

    @task
    def write_back(job: dict[str, Any]) -> dict[str, int]:
        db = reviews()
        with open(job["joined_uri"]) as joined, db:
            for row in map(json.loads, joined):
                if row["status"] == "succeeded":
                    label = row["response"]["choices"][0]["message"]["content"]
                    db.execute("UPDATE reviews SET sentiment = ? WHERE id = ?", (label, int(row["custom_id"][7:])))
        return dict(job["counts"])

    write_back(label_reviews())
