"""``python -m airflow_provider_openai_batch estimate``, run as a user would: a fresh process, no Airflow set up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.estimate import estimate_file

ROOT = Path(__file__).resolve().parent.parent
PRICES = {"gpt-4o-mini": {"input": 0.075, "output": 0.30}}


def run(*args: str, home: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """No AIRFLOW_* variable, an empty home: what a laptop without Airflow configured has."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "airflow_provider_openai_batch", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        check=False,
        timeout=120,
    )


def lines(count: int, **body: Any) -> str:
    out = []
    for n in range(count):
        request = {
            "model": "gpt-4o-mini",
            "max_completion_tokens": 50,
            "messages": [{"role": "user", "content": f"Translate sentence {n} into French, please."}],
            **body,
        }
        out.append(json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": request}))
    return "\n".join(out) + "\n"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def test_estimate_prints_the_table(home: Path) -> None:
    path = home / "requests.jsonl"
    path.write_text(lines(12))
    done = run("estimate", str(path), "--price-table", json.dumps(PRICES), "--budget", "100", home=home)
    assert done.returncode == 0, done.stderr
    expected = estimate_file(path, price_table=PRICES, enqueued_token_budget=100)
    assert f"requests           {12}" in done.stdout
    assert f"input tokens       {expected['input_tokens']:,} (o200k_base)" in done.stdout
    assert "max output tokens  600" in done.stdout
    queue = expected["queue"]
    assert queue is not None
    assert f"queue              {queue['fills']} fills of 100 tokens" in done.stdout
    assert f"queue time         {queue['max_wait']} (a wave takes up to its completion window" in done.stdout


def test_estimate_json_is_the_estimate(home: Path) -> None:
    path = home / "requests.jsonl"
    path.write_text(lines(3))
    table = home / "prices.json"
    table.write_text(json.dumps(PRICES))
    done = run("estimate", str(path), "--price-table", str(table), "--json", home=home)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout[done.stdout.index("{") :])
    assert printed == json.loads(json.dumps(estimate_file(path, price_table=PRICES)))


def test_estimate_reads_standard_input(home: Path) -> None:
    done = run("estimate", "-", "--json", home=home, stdin=lines(4).encode())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[done.stdout.index("{") :])["requests"] == 4


def test_an_invalid_file_exits_1_naming_line_and_field(home: Path) -> None:
    path = home / "bad.jsonl"
    path.write_text(lines(2) + '{"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n')
    done = run("estimate", str(path), home=home)
    assert done.returncode == 1
    assert f"{path}:line 3, field 'method': must be 'POST', got 'GET'" in done.stderr
    assert f"{path}:line 3, field 'body.messages': missing" in done.stderr
    assert done.stdout.strip() == "" or "requests" not in done.stdout


def test_a_bad_price_table_exits_1(home: Path) -> None:
    path = home / "requests.jsonl"
    path.write_text(lines(1))
    done = run("estimate", str(path), "--price-table", '{"gpt-4o-mini": 3}', home=home)
    assert done.returncode == 1
    assert "--price-table: expected" in done.stderr
    missing = run("estimate", str(path), "--price-table", str(home / "nope.json"), home=home)
    assert missing.returncode == 1
    assert "--price-table:" in missing.stderr


def test_a_missing_file_and_bad_arguments(home: Path) -> None:
    done = run("estimate", str(home / "absent.jsonl"), home=home)
    assert done.returncode == 1
    assert "absent.jsonl" in done.stderr
    assert run("estimate", "x.jsonl", "--budget", "0", home=home).returncode == 2
    assert run(home=home).returncode == 2
