"""
``make demo``: the example DAG end to end, offline, against the embedded FakeOpenAIServer.

A fresh ``AIRFLOW_HOME`` on SQLite, the fake server on a free port, ``airflow dags test example_openai_batch``,
then where the results landed and a few results joined to their inputs. With ``DEMO_REAL=1`` and
``OPENAI_API_KEY`` set, the same DAG runs against the real API instead (and costs real money).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "example_openai_batch"


@contextlib.contextmanager
def openai_endpoint() -> Iterator[dict[str, str]]:
    """The connection to use: the real API when asked for, else a fake server started here."""
    if os.environ.get("DEMO_REAL") == "1":
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise SystemExit("DEMO_REAL=1 needs OPENAI_API_KEY")
        yield {"conn_type": "openai_batch", "password": key}
        return
    from airflow_provider_openai_batch.testing import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        print(f"FakeOpenAIServer on {server.base_url}")
        yield {"conn_type": "openai_batch", "host": server.base_url, "password": server.api_key or ""}


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="openai-batch-demo-"))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
        "OPENAI_BATCH_EXAMPLE_POLL_SECONDS": "1" if os.environ.get("DEMO_REAL") != "1" else "30",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    airflow = [sys.executable, "-m", "airflow"]
    print(f"AIRFLOW_HOME={home}")
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    with openai_endpoint() as connection:
        env["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(connection)
        run = subprocess.run([*airflow, "dags", "test", DAG_ID], env=env, capture_output=True, text=True)
    log = run.stdout + run.stderr
    (home / "dags-test.log").write_text(log)
    if run.returncode != 0:
        print(log[-6000:])
        print(f"\nairflow dags test failed (full log: {home / 'dags-test.log'})", file=sys.stderr)
        return run.returncode
    deferred = [line for line in log.splitlines() if "Pausing task as DEFERRED" in line and "task_id=wait" in line]
    if deferred:
        print(f"airflow dags test {DAG_ID}: success; the sensor deferred and its trigger waited for the batch")
    else:
        print(f"airflow dags test {DAG_ID}: success, but the sensor did not defer", file=sys.stderr)
    joined = sorted(home.glob("openai_batch_results/**/joined.jsonl"))
    if not joined:
        print("no joined results were written", file=sys.stderr)
        return 1
    folder = joined[0].parent
    print(f"results landed in {folder}:")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name:14} {sum(1 for _ in path.open()):>5} lines")
    print("first joined results (input order, joined on custom_id):")
    with joined[0].open() as rows:
        for line in itertools.islice(rows, 5):
            row = json.loads(line)
            question = row["request"]["messages"][-1]["content"]
            answer = (row["response"] or {}).get("choices", [{}])[0].get("message", {}).get("content")
            print(f"  {row['custom_id']} [{row['status']}] {question!r} -> {answer!r}")
    return 0 if deferred else 1


if __name__ == "__main__":
    raise SystemExit(main())
