"""
Two tries of one task instance running at the same time end with one batch running.

On a Celery deployment this happens when only the pool process supervising a task dies: Airflow fails the try
and starts the next one while the orphaned task process keeps running (shown by `make e2e`'s scenario 6).
Both tries look for an earlier batch, find none, and create one each; each then settles by the same rule.
"""

from __future__ import annotations

import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_openai_batch import idempotency
from airflow_provider_openai_batch.batches import CreatePath
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import (
    FIRST_TRY_METADATA_KEY,
    IDEMPOTENCY_METADATA_KEY,
    RACE_SKEW,
    surviving_batch,
)
from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchCreateOperator
from tests.conftest import jsonl, request_line
from tests.test_idempotency import FakeTI

KEY = "k" * 32
SETTLE_PAUSE = idempotency.SETTLE_PAUSE


@pytest.fixture(autouse=True)
def _settle_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pause here (conftest turns it off for the rest of the suite)."""
    monkeypatch.setattr(idempotency, "SETTLE_PAUSE", SETTLE_PAUSE)


def batch(batch_id: str, created_at: int, status: str = "validating", key: str = KEY) -> SimpleNamespace:
    return SimpleNamespace(
        id=batch_id, created_at=created_at, status=status, metadata={IDEMPOTENCY_METADATA_KEY: key, "team": "x"}
    )


def test_every_racing_try_agrees_on_the_oldest_batch():
    first, second, third = batch("batch_b", 1000), batch("batch_a", 1003), batch("batch_c", 1007)
    listing = [third, second, first]  # newest first, as the API lists
    for own in (first, second, third):
        assert surviving_batch(own, listing, KEY, since=995) is first


def test_a_tie_in_created_at_is_broken_by_id_the_same_way_for_both():
    one, other = batch("batch_1", 1000), batch("batch_2", 1000)
    assert surviving_batch(one, [other, one], KEY, since=990) is one
    assert surviving_batch(other, [other, one], KEY, since=990) is one


@pytest.mark.parametrize("status", ["failed", "expired", "cancelled", "cancelling"])
def test_a_dead_or_dying_batch_does_not_survive(status):
    own = batch("batch_new", 1005)
    assert surviving_batch(own, [own, batch("batch_old", 1000, status)], KEY, since=990) is own


def test_a_completed_racer_still_wins():
    """A fast batch may already have completed when the slower try lists: it is still the survivor."""
    own, first = batch("batch_new", 1005), batch("batch_old", 1000, "completed")
    assert surviving_batch(own, [own, first], KEY, since=990) is first


def test_other_keys_and_earlier_tries_batches_are_not_contenders():
    own = batch("batch_new", 5000)
    other_task = batch("batch_other", 4990, key="z" * 32)
    before_this_try = batch("batch_earlier", int(4995 - RACE_SKEW.total_seconds()) - 1, "completed")
    no_metadata = SimpleNamespace(id="batch_none", created_at=4990, status="validating", metadata=None)
    assert surviving_batch(own, [own, other_task, before_this_try, no_metadata], KEY, since=4995) is own


def test_a_batch_of_the_run_before_a_clear_is_no_racer():
    """A clear starts a new run of tries (a new first try): its fresh batch must not yield to the old run's."""
    own = batch("batch_new", 1005)
    own.metadata[FIRST_TRY_METADATA_KEY] = "3"
    before_clear = batch("batch_before_clear", 1000)
    before_clear.metadata[FIRST_TRY_METADATA_KEY] = "1"
    assert surviving_batch(own, [own, before_clear], KEY, since=990, first=3) is own
    assert surviving_batch(before_clear, [own, before_clear], KEY, since=990, first=1) is before_clear


def test_two_tries_racing_end_with_one_batch_running(server, conn_id):
    """
    Both tries have looked and found nothing before either creates (a barrier holds each create call until
    both are ready, which is the race's precondition); the creates then go over real HTTP to the fake server.
    """
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    ti = FakeTI(run_id=f"scheduled__{uuid.uuid4()}")
    ready = threading.Barrier(2, timeout=30)
    returned: dict[int, str] = {}
    errors: list[BaseException] = []

    def one_try(number: int) -> None:
        op = OpenAIBatchCreateOperator(
            task_id="create",
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            metadata={"fake_scenario": "stall"},
        )
        real_create = op.hook.create_batch

        def create_when_both_have_looked(*args: Any, **kwargs: Any) -> Any:
            ready.wait()
            return real_create(*args, **kwargs)

        op.hook.create_batch = create_when_both_have_looked  # type: ignore[method-assign]
        try:
            returned[number] = op.execute({"ti": ti})
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=one_try, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    made = [b for b in server.state.batches.values() if b.input_file_id == file_id]
    assert len({(b.metadata or {}).get(IDEMPOTENCY_METADATA_KEY) for b in made}) == 1  # one key: one task instance
    assert len(made) == 2, "both tries created a batch (the race happened)"
    hook = OpenAIBatchHook()
    deadline = time.monotonic() + 30
    statuses = {b.id: hook.get_batch(b.id).status for b in made}
    while sorted(statuses.values()) != ["cancelled", "in_progress"]:
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
        statuses = {b.id: hook.get_batch(b.id).status for b in made}
    survivor = next(batch_id for batch_id, status in statuses.items() if status == "in_progress")
    assert returned == {1: survivor, 2: survivor}
    assert ti.xcom["batch_id"] == survivor


class LogSocketGone:
    """The logger of an orphaned task process: its supervisor died with the log socket, so every line raises."""

    def __getattr__(self, name: str) -> Any:
        def write(*args: Any, **kwargs: Any) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        return write


def found_nothing(path: CreatePath, keys: Any) -> dict[str, Any]:
    """A lookup that ran (and found nothing) before the other try created: what both racers saw."""
    path.looked.update(dict.fromkeys(keys, time.time()))
    return {}


def test_an_orphaned_try_that_cannot_log_still_cancels_its_duplicate(server, conn_id, monkeypatch):
    """
    On Celery, killing the pool process that supervises a task leaves the task process running with a dead log
    socket: its first log line raises BrokenPipeError. It must have cancelled its duplicate before that.
    """
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    ti = FakeTI(run_id=f"scheduled__{uuid.uuid4()}")

    def create_op() -> OpenAIBatchCreateOperator:
        return OpenAIBatchCreateOperator(
            task_id="create",
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            metadata={"fake_scenario": "stall"},
        )

    survivor = create_op().execute({"ti": ti})  # the next try, started by Airflow while the orphan hung in create
    orphan = create_op()
    orphan._cached_logger = LogSocketGone()  # type: ignore[assignment]
    monkeypatch.setattr(CreatePath, "earlier", found_nothing)  # it looked before try 2 created
    with pytest.raises(BrokenPipeError):
        orphan.execute({"ti": FakeTI(ti.run_id)})

    statuses = {b.id: server.state.status(b) for b in server.state.batches.values()}
    assert len(statuses) == 2, "the orphan created its batch"
    assert statuses.pop(survivor) == "in_progress"
    assert next(iter(statuses.values())) in ("cancelling", "cancelled")


def test_a_failed_duplicate_check_keeps_the_batch_and_the_try(server, conn_id, monkeypatch):
    """The listing after create failing (after the SDK's retries) must not fail a try whose batch exists."""
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    op = OpenAIBatchCreateOperator(task_id="create", input_file_id=file_id, endpoint="/v1/chat/completions")
    monkeypatch.setattr(CreatePath, "earlier", found_nothing)
    server.faults.script("batches.list", *["500"] * 4)  # the connection allows 3 retries
    batch_id = op.execute({"ti": FakeTI(run_id=f"scheduled__{uuid.uuid4()}")})
    assert list(server.state.batches) == [batch_id]
    assert server.state.status(server.state.batches[batch_id]) != "cancelling"


def test_in_the_same_second_the_earlier_trys_batch_wins_whatever_the_ids():
    """A first try that skipped its settle (the job: no later try had begun) must win a same-second tie."""
    from airflow_provider_openai_batch.idempotency import TRY_METADATA_KEY

    first_try, retry = batch("batch_z", 1000), batch("batch_a", 1000)
    first_try.metadata[TRY_METADATA_KEY], retry.metadata[TRY_METADATA_KEY] = "1", "2"
    for own in (first_try, retry):
        assert surviving_batch(own, [retry, first_try], KEY, since=990) is first_try
