"""
The job knows its cost before it is paid: a dry run sends nothing and returns the estimate, whose shards are the
ones the job cuts; a budget below the estimate sends nothing; a budget passed mid-job stops further submissions
(what never ran then fails the job). The upload operator's dry run sends nothing either.

Real HTTP to FakeOpenAIServer, whose request counters show what was sent; ``test_job``'s driver plays Airflow.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.exceptions import BatchFailedError, BatchInputError, CostBudgetError
from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import FAST, connection_env, request_line
from tests.test_job import Driver, synced_clock
from tests.test_lifecycle import TI

ENDPOINT = "/v1/chat/completions"
PRICES = {"gpt-4o-mini": {"input": 0.075, "output": 0.30}}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(timings=FAST, clock=synced_clock()) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


def capped(n: int, cap: int = 50) -> list[dict[str, Any]]:
    return [request_line(i, max_tokens=cap) for i in range(n)]


def job(tmp_path: Path, source: Any, **kwargs: Any) -> OpenAIBatchJobOperator:
    return OpenAIBatchJobOperator(
        task_id="job",
        source=source,
        endpoint=ENDPOINT,
        destination=str(tmp_path / "joined.jsonl"),
        poll_interval=0.05,
        deferrable=True,
        price_table=PRICES,
        **kwargs,
    )


def sent(server: FakeOpenAIServer) -> int:
    return sum(server.calls.values())


def test_a_dry_run_sends_nothing_and_returns_the_estimate(fake, tmp_path):
    estimate = job(tmp_path, capped(10), dry_run=True, max_requests_per_file=4).execute({"ti": TI("r")})
    assert sent(fake) == 0
    assert estimate["requests"] == 10 and estimate["shards"] == 3
    assert estimate["max_output_tokens"] == 500 and estimate["uncapped_requests"] == 0
    assert estimate["tokenizer"] == "o200k_base"
    assert estimate["cost"] is not None
    assert 0 < estimate["cost"]["low"] < estimate["cost"]["high"]
    assert not (tmp_path / "joined.jsonl").exists()


def test_under_a_token_budget_the_estimate_cuts_the_shards_the_job_runs(fake, tmp_path):
    """
    Each request holds its input plus its 50-token cap in the queue; a 200-token budget takes three of them per
    shard. The dry run says so before anything is sent, and the job then runs exactly those shards.
    """
    lines = capped(12)
    estimate = job(tmp_path, lines, dry_run=True, max_enqueued_tokens=200).execute({"ti": TI("r")})
    assert sent(fake) == 0
    queue = estimate["queue"]
    assert queue is not None and queue["fits"]
    assert estimate["shards"] == 4
    assert queue["fills"] == 4  # no two shards fit the budget together: one wave each
    assert queue["max_wait"] == "at most 4 x 24h"
    result = Driver(lambda: job(tmp_path, lines, max_enqueued_tokens=200), f"r-{uuid.uuid4()}", None).attempt()
    assert result is not None and result["counts"]["succeeded"] == 12
    first_round = [b for b in result["batches"] if b["round"] == 0]
    assert len(first_round) == fake.count("batches.create") == estimate["shards"]


def test_the_upload_operators_dry_run_sends_nothing_and_returns_the_estimate(fake, tmp_path, capfd, caplog):
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator

    upload = OpenAIBatchUploadOperator(
        task_id="upload",
        source=capped(10),
        endpoint=ENDPOINT,
        max_requests_per_file=4,
        price_table=PRICES,
        dry_run=True,
    )
    ti = TI("r")
    ti.task_id = "upload"
    with caplog.at_level("INFO"):
        estimate = upload.execute({"ti": ti})
    assert sent(fake) == 0, fake.calls
    assert estimate["requests"] == 10 and estimate["shards"] == 3
    assert estimate["cost"] is not None and estimate["cost"]["high"] is not None
    logged = capfd.readouterr().out + "\n".join(record.getMessage() for record in caplog.records)
    assert "Estimate:\nfile               upload.jsonl\n" in logged  # the name the upload would give the file
    assert "shards             3\n" in logged
    assert "Dry run: nothing was sent" in logged


def test_the_upload_operators_dry_run_rejects_a_bad_file_as_the_upload_would(fake, tmp_path):
    bad = capped(3)
    bad[1]["method"] = "GET"
    upload = dry_upload(bad)
    with pytest.raises(BatchInputError, match=r"line 2, field 'method': must be 'POST'"):
        upload.execute({"ti": TI("r")})
    assert sent(fake) == 0


def dry_upload(source: Any) -> Any:
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator

    return OpenAIBatchUploadOperator(task_id="upload", source=source, endpoint=ENDPOINT, dry_run=True)


def test_a_budget_below_the_estimate_sends_nothing(fake, tmp_path):
    with pytest.raises(CostBudgetError, match=r"not sent: the estimate is .* above max_cost=1e-06"):
        job(tmp_path, capped(10), max_cost=0.000001).execute({"ti": TI("r")})
    assert sent(fake) == 0


def test_a_budget_needs_an_output_cap_on_every_request(fake, tmp_path):
    with pytest.raises(CostBudgetError, match=r"no upper bound"):
        job(tmp_path, [request_line(i) for i in range(3)], max_cost=100.0).execute({"ti": TI("r")})
    assert sent(fake) == 0


def test_a_budget_passed_mid_job_stops_further_submissions(fake, tmp_path, monkeypatch):
    """
    An estimate can be short (uncounted images, a price change): the spend of what ended is the guard. Here the
    estimate is made to say a tenth of the first piece's real cost; the first piece goes, its usage shows the rest
    would pass the budget, and nothing more is sent.
    """
    from airflow_provider_openai_batch.operators import job as job_module

    first_piece = _spend(capped(4))
    real_estimate = job_module.estimate_file

    def short(*args: Any, **kwargs: Any) -> Any:
        estimate = real_estimate(*args, **kwargs)
        estimate["cost"] = {"currency": "USD", "low": first_piece / 20, "high": first_piece / 10}
        return estimate

    monkeypatch.setattr(job_module, "estimate_file", short)
    before = fake.count("batches.create")
    make = lambda: job(  # noqa: E731
        tmp_path, capped(12), max_cost=first_piece * 1.5, max_requests_per_file=4, max_enqueued_requests=4
    )
    with pytest.raises(BatchFailedError, match=r"never ran.*max_cost=.* would have been passed: 2 piece"):
        Driver(make, f"r-{uuid.uuid4()}", None).attempt()
    assert fake.count("batches.create") - before == 1, "only the first piece was sent"
    rows = (tmp_path / "joined.jsonl").read_text().splitlines()
    assert len(rows) == 12, "the joined result still holds every row (8 of them missing)"


def _spend(lines: list[dict[str, Any]]) -> float:
    """What the fake's usage for ``lines`` costs at ``PRICES``."""
    from airflow_provider_openai_batch.results import estimate_cost
    from airflow_provider_openai_batch.testing import responses

    usage = {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0}
    for line in lines:
        i, o = responses.usage_of(ENDPOINT, line["body"])
        usage["input_tokens"] += i
        usage["output_tokens"] += o
    priced = estimate_cost(usage, "gpt-4o-mini", PRICES)
    assert priced is not None
    return float(priced["total"])
