"""
``make demo``: the example DAG end to end, offline, against the embedded FakeOpenAIServer.

A fresh ``AIRFLOW_HOME`` on SQLite, the fake server on a free port, ``airflow dags test example_openai_batch``,
then where the results landed and a few results joined to their inputs. With ``DEMO_REAL=1`` and
``OPENAI_API_KEY`` set, the same DAG runs against the real API instead (and costs real money).

The demo shows the sensor deferring, so it must not depend on how fast the machine is: the fake server's clock is
held until the ``wait`` task has deferred (seen in the run's output), so the batch is still running whenever the
sensor first looks, however slow the machine; then the clock runs and the batch finishes in about a second.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from airflow_provider_openai_batch.testing import HeldClock

ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "example_openai_batch"
#: If the sensor has not deferred after this long, let the batch run anyway (the demo then reports it).
HOLD_AT_MOST = 900.0


def deferred(line: str) -> bool:
    return "Pausing task as DEFERRED" in line and "task_id=wait" in line


@contextlib.contextmanager
def openai_endpoint(clock: HeldClock) -> Iterator[dict[str, str]]:
    """The connection to use: the real API when asked for, else a fake server started here."""
    if os.environ.get("DEMO_REAL") == "1":
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise SystemExit("DEMO_REAL=1 needs OPENAI_API_KEY")
        yield {"conn_type": "openai_batch", "password": key}
        return
    from airflow_provider_openai_batch.testing import FakeOpenAIServer

    with FakeOpenAIServer(clock=clock) as server:
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
        "PYTHONUNBUFFERED": "1",
    }
    airflow = [sys.executable, "-m", "airflow"]
    print(f"AIRFLOW_HOME={home}")
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    clock = HeldClock()
    with openai_endpoint(clock) as connection:
        env["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(connection)
        returncode, lines = run_releasing(clock, [*airflow, "dags", "test", DAG_ID], env)
    log = "".join(lines)
    (home / "dags-test.log").write_text(log)
    if returncode != 0:
        print(log[-6000:])
        print(f"\nairflow dags test failed (full log: {home / 'dags-test.log'})", file=sys.stderr)
        return returncode
    did_defer = any(deferred(line) for line in lines)
    if did_defer:
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
    return 0 if did_defer else 1


def run_releasing(clock: HeldClock, command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``command``, keeping its output; release the clock once the sensor has deferred (or after a bound)."""
    lines: list[str] = []
    timer = threading.Timer(HOLD_AT_MOST, clock.release)
    timer.daemon = True
    timer.start()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if deferred(line):
                clock.release()
    timer.cancel()
    return proc.returncode, lines


if __name__ == "__main__":
    raise SystemExit(main())
