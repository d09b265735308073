"""
Typed results, the way a warehouse job runs them: rows of a table become prompts, ``@task.openai_batch`` asks the
model for a Pydantic model's fields (strict structured outputs) and writes every answer as typed Parquet columns,
and the columns go back into the table through a DB-API hook.

The table here is a SQLite file, reached through ``WarehouseHook``: the DB-API hook of ``common.sql`` that every
SQL provider's hook is (``SqliteHook``, ``PostgresHook``, ``SnowflakeHook``...); a production DAG uses its
database's hook the same way. Needs the ``parquet`` extra (``pip install 'airflow-provider-openai-batch[parquet]'``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Literal

import pendulum
from airflow.providers.common.sql.hooks.sql import DbApiHook
from airflow.sdk import DAG, Connection, task
from pydantic import BaseModel

HOME = Path(os.environ.get("AIRFLOW_HOME", "/tmp")) / "openai_batch_typed"
POLL_SECONDS = float(os.environ.get("OPENAI_BATCH_EXAMPLE_POLL_SECONDS", "60"))
MODEL = os.environ.get("OPENAI_BATCH_EXAMPLE_MODEL", "gpt-4o-mini")
REVIEWS = [
    "Arrived broken, and support never answered.",
    "Does what it says. Nothing more.",
    "Best purchase this year: sturdy, quiet and cheap.",
    "The strap snapped after a week; I want a refund.",
]


class ReviewLabel(BaseModel):
    """What the model answers for each review: three typed columns of the table."""

    sentiment: Literal["positive", "negative", "neutral"]
    score: int
    needs_reply: bool


class WarehouseHook(DbApiHook):
    """The warehouse's hook: here SQLite on a local file (``SqliteHook`` is this, with an Airflow connection)."""

    conn_name_attr = "warehouse_conn_id"
    default_conn_name = "warehouse_default"
    _placeholder = "?"

    def __init__(self, **kwargs: Any) -> None:
        HOME.mkdir(parents=True, exist_ok=True)
        path = str(HOME / "reviews.sqlite")
        super().__init__(connection=Connection(conn_id=self.default_conn_name, conn_type="sqlite", host=path), **kwargs)

    def get_conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.connection.host)

    @staticmethod
    def _serialize_cell(cell: object, conn: Any = None) -> Any:
        """Values go to sqlite3 as they are (DbApiHook's default makes every one a string: False → 'False')."""
        return cell


def warehouse() -> WarehouseHook:
    """The hook, with the reviews table made and filled the first time (it stands in for the warehouse's own)."""
    hook = WarehouseHook()
    hook.run(
        "CREATE TABLE IF NOT EXISTS reviews (id INTEGER PRIMARY KEY, text TEXT NOT NULL, "
        "sentiment TEXT, score INTEGER, needs_reply BOOLEAN, label_status TEXT, label_error TEXT)"
    )
    if not hook.get_first("SELECT count(*) FROM reviews")[0]:
        rows = [(i, REVIEWS[i % len(REVIEWS)]) for i in range(40)]
        hook.insert_rows("reviews", rows, target_fields=("id", "text"), executemany=True)
    return hook


with DAG(
    dag_id="example_openai_batch_typed",
    schedule=None,  # a nightly job would say "@daily"; the examples run when triggered (tests, demo, make e2e)
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    doc_md=__doc__,
) as dag:

    @task.openai_batch(
        endpoint="/v1/chat/completions",
        destination=str(HOME / "labels-{{ ds }}.parquet"),
        model=MODEL,
        system_prompt="Label the review's sentiment, score it from 1 (worst) to 5, and say if it needs a reply.",
        max_tokens=100,  # max_completion_tokens on chat completions
        output_schema=ReviewLabel,
        poll_interval=POLL_SECONDS,
        deferrable=True,
    )
    def label_reviews() -> list[tuple[int, str]]:
        """The prompts: one ``(key, prompt)`` per row; the key comes back as the row's ``custom_id``."""
        return [(id_, text) for id_, text in warehouse().get_records("SELECT id, text FROM reviews ORDER BY id")]

    @task
    def write_back(job: dict[str, Any]) -> dict[str, int]:
        """The typed columns into the table: loaded into a staging table, then merged by id."""
        import pyarrow.parquet as pq

        columns = ["custom_id", "status", "sentiment", "score", "needs_reply", "error"]
        labels = pq.read_table(job["joined_uri"], columns=columns).to_pylist()
        rows = [
            (
                int(r["custom_id"]),
                r["sentiment"],
                r["score"],
                r["needs_reply"],
                r["status"],
                (r["error"] or {}).get("message"),  # why a row has no label (refused, truncated...)
            )
            for r in labels
        ]
        hook = warehouse()
        hook.run(
            [
                "DROP TABLE IF EXISTS review_labels",
                "CREATE TABLE review_labels (id INTEGER PRIMARY KEY, sentiment TEXT, score INTEGER, "
                "needs_reply BOOLEAN, label_status TEXT, label_error TEXT)",
            ]
        )
        fields = ("id", "sentiment", "score", "needs_reply", "label_status", "label_error")
        hook.insert_rows("review_labels", rows, target_fields=fields, executemany=True)
        merged = ", ".join(f"{f} = (SELECT l.{f} FROM review_labels l WHERE l.id = reviews.id)" for f in fields[1:])
        hook.run(f"UPDATE reviews SET {merged} WHERE id IN (SELECT id FROM review_labels)")
        return dict(job["counts"])

    write_back(label_reviews())
