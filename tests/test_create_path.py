"""
The one create path holds one live batch per task instance in the races an adversarial read found: a third try
after a settled race, an orphaned try whose create lands more than a minute late, a listing that lags a create,
and two deployments made from one configuration.

Every call is real HTTP to FakeOpenAIServer with the real SDK. Where a case needs the worker's clock and OpenAI's to
move together by more than a test should sleep, both are one ``FakeClock``: the server's, and the one the create
path reads (``batches.time``), which is what "the clocks agree" means.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
import uuid
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_openai_batch import batches, idempotency
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import IDEMPOTENCY_METADATA_KEY
from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchCreateOperator
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Timings
from tests.conftest import FAST, connection_env, jsonl, request_line
from tests.test_idempotency import MemoryStateStore
from tests.test_lifecycle import TI

ENDPOINT = "/v1/chat/completions"
STALL = {"fake_scenario": "stall"}


def live(server: FakeOpenAIServer) -> list[str]:
    """Our batches that are still working (not ended, not being cancelled)."""
    return [
        b.id
        for b in server.state.batches.values()
        if IDEMPOTENCY_METADATA_KEY in (b.metadata or {})
        and server.state.status(b) in ("validating", "in_progress", "finalizing")
    ]


def create_op(file_id: str, **kwargs: Any) -> OpenAIBatchCreateOperator:
    kwargs.setdefault("metadata", STALL)
    return OpenAIBatchCreateOperator(task_id="create", input_file_id=file_id, endpoint=ENDPOINT, **kwargs)


def context_of(ti: TI, store: MemoryStateStore | None) -> dict[str, Any]:
    context: dict[str, Any] = {"ti": ti}
    if store is not None:
        context["task_state_store"] = store
    return context


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """One clock for OpenAI and the worker; sleeps stay real (and short)."""
    shared = FakeClock()
    monkeypatch.setattr(batches, "time", types.SimpleNamespace(time=shared, sleep=time.sleep))
    return shared


@pytest.fixture
def fake(clock: FakeClock, monkeypatch: pytest.MonkeyPatch):
    with FakeOpenAIServer(timings=FAST, clock=clock) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


@pytest.mark.parametrize("with_store", [False, True], ids=["metadata_scan", "task_state_store_without_record"])
def test_a_third_try_after_a_settled_race_waits_for_the_survivor(fake, clock, with_store):
    """
    Two tries raced more than a minute apart; the loser cancelled itself and is now the *newest* batch with the
    key. A third try (the winner died before recording its batch) must take the still-running winner, not see
    "cancelled" and pay for a third batch that nothing settles against the winner.
    """
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    ti = TI(f"r-{uuid.uuid4()}", retries=3)
    winner = create_op(file_id).execute(context_of(ti, None))  # try 1: its record never reached the store
    clock.advance(61)
    metadata = dict(fake.state.batches[winner].metadata or {})
    hook = OpenAIBatchHook()
    loser = hook.create_batch(file_id, ENDPOINT, metadata=metadata).id  # try 2 raced it, lost, cancelled its own
    hook.cancel_batch(loser)
    clock.advance(5)
    assert fake.state.status(fake.state.batches[loser]) == "cancelled"

    ti.retry()
    ti.retry()
    third = create_op(file_id).execute(context_of(ti, MemoryStateStore() if with_store else None))

    assert third == winner
    assert live(fake) == [winner]
    assert len(fake.state.batches) == 2


#: The task's state store in the races below: none (Airflow before 3.3), one shared by every try, or one that holds
#: the loser's record (a try that recorded its batch before a later look cancelled it).
STORES = ["no_store", "shared_store", "store_holding_the_loser"]


def store_of(kind: str) -> MemoryStateStore | None:
    return None if kind == "no_store" else MemoryStateStore()


def hold_the_loser(store: MemoryStateStore | None, kind: str, loser: str) -> None:
    """The record a try whose batch lost would have left, had it recorded before it settled."""
    if kind == "store_holding_the_loser":
        assert store is not None
        record = store.get(idempotency.STATE_STORE_KEY) or {"batches": {}}
        for entry in record["batches"].values():
            entry["batch_id"] = loser
        store.set(idempotency.STATE_STORE_KEY, record)


@pytest.mark.parametrize("store_kind", STORES)
def test_an_orphan_whose_create_lands_62_s_late_cancels_its_duplicate(fake, clock, store_kind):
    """
    Try 1 looked, found nothing and sent its create; the call hung (the SDK waits up to 600 s) while Airflow
    failed the try and ran try 2, which created its batch. Try 1's create lands 62 s after try 2's: its settle
    window starts when try 1 started looking, so it still sees try 2's batch and cancels its own. A third try then
    takes try 2's batch, whatever the store says.
    """
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    ti = TI(f"r-{uuid.uuid4()}", retries=3)
    store = store_of(store_kind)
    orphan = create_op(file_id)
    real_create = orphan.hook.create_batch
    second: dict[str, str] = {}

    def hangs_while_try_2_runs(*args: Any, **kwargs: Any) -> Any:
        clock.advance(300)  # Airflow's heartbeat timeout: try 1 is failed, try 2 starts
        retry = TI(ti.run_id, retries=3)
        retry.retry()
        second["batch"] = create_op(file_id).execute(context_of(retry, store))
        clock.advance(62)
        return real_create(*args, **kwargs)

    orphan.hook.create_batch = hangs_while_try_2_runs  # type: ignore[method-assign]
    returned = orphan.execute(context_of(ti, store))

    assert returned == second["batch"]
    assert live(fake) == [second["batch"]]
    assert len(fake.state.batches) == 2
    loser = next(batch_id for batch_id in fake.state.batches if batch_id != second["batch"])
    hold_the_loser(store, store_kind, loser)
    clock.advance(5)
    third = TI(ti.run_id, retries=3)
    third.retry()
    third.retry()
    assert create_op(file_id).execute(context_of(third, store)) == second["batch"]
    assert live(fake) == [second["batch"]]
    assert len(fake.state.batches) == 2


# --- a listing that lags a create ------------------------------------------------------------------------------


@pytest.fixture(params=["settle", "waiter"])
def lagging(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """
    New batches stay out of the list for a while (real time), longer than the settle pause. ``settle``: 3 s, and the
    settle step lists again until its own batch shows. ``waiter``: 4 s, longer than the settle step waits (1 s here),
    so the waiter's second look (at 5 s) settles it.
    """
    monkeypatch.setattr(idempotency, "SETTLE_PAUSE", 1.5)
    monkeypatch.setattr(batches, "SETTLE_RELIST", 0.5)
    lag = 3.0
    if request.param == "waiter":
        monkeypatch.setattr(batches, "SETTLE_WAIT_FOR_OWN", 1.0)
        monkeypatch.setattr(batches, "SIBLING_LOOK_AFTER", 5.0)
        lag = 4.0
    timings = Timings(validating=0.2, in_progress=8.0, finalizing=0.2, cancelling=0.2)
    with FakeOpenAIServer(timings=timings, list_lag=lag) as srv:
        srv.who_settles = request.param  # type: ignore[attr-defined]
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


def race(file_id: str, run: Any, *, wait: bool = True) -> dict[int, Any]:
    """Two tries that both looked and found nothing before either creates (a barrier holds each create)."""
    ready = threading.Barrier(2, timeout=30)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def one_try(number: int) -> None:
        op = create_op(file_id, metadata=None, wait_for_completion=wait, poll_interval=0.5, max_poll_interval=None)
        real_create = op.hook.create_batch

        def create_when_both_have_looked(*args: Any, **kwargs: Any) -> Any:
            ready.wait()
            return real_create(*args, **kwargs)

        op.hook.create_batch = create_when_both_have_looked  # type: ignore[method-assign]
        try:
            results[number] = run(op)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=one_try, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def a_third_try_takes(
    survivor: str, server: FakeOpenAIServer, file_id: str, run_id: str, store: Any, kind: str
) -> None:
    """After the race, a retry reuses the survivor, whatever record the racing tries left in the store."""
    loser = next(batch_id for batch_id in server.state.batches if batch_id != survivor)
    hold_the_loser(store, kind, loser)
    ti = TI(run_id)
    ti.retry()
    assert create_op(file_id, metadata=None).execute(context_of(ti, store)) == survivor
    assert len(server.state.batches) == 2


@pytest.mark.parametrize("store_kind", STORES)
def test_a_lagging_listing_still_ends_with_one_batch_running_blocking(lagging, store_kind):
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    run_id = f"r-{uuid.uuid4()}"
    store = store_of(store_kind)
    returned = race(file_id, lambda op: op.execute(context_of(TI(run_id), store)))

    made = {b.id: lagging.state.status(b) for b in lagging.state.batches.values()}
    assert len(made) == 2, "both tries created a batch (the race happened)"
    assert sorted(made.values()) == ["cancelled", "completed"], made
    survivor = next(batch_id for batch_id, status in made.items() if status == "completed")
    assert returned == {1: survivor, 2: survivor}
    a_third_try_takes(survivor, lagging, file_id, run_id, store, store_kind)


@pytest.mark.parametrize("store_kind", STORES)
def test_a_lagging_listing_still_ends_with_one_batch_running_deferred(lagging, store_kind):
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    run_id = f"r-{uuid.uuid4()}"
    store = store_of(store_kind)

    def until_deferred(op: OpenAIBatchCreateOperator) -> tuple[OpenAIBatchCreateOperator, Any, TI]:
        ti = TI(run_id)
        op.deferrable = True
        with pytest.raises(TaskDeferred) as deferred:
            op.execute(context_of(ti, store))
        return op, deferred.value.trigger, ti

    deferred = race(file_id, until_deferred)
    assert len(lagging.state.batches) == 2, "both tries created a batch (the race happened)"

    async def fire(trigger: Any) -> Any:
        async for event in trigger.run():
            return event.payload

    async def both() -> list[Any]:
        return list(await asyncio.gather(*(fire(trigger) for _, trigger, _ in deferred.values())))

    events = asyncio.run(both())
    made = {b.id: lagging.state.status(b) for b in lagging.state.batches.values()}
    assert sorted(made.values()) == ["cancelled", "completed"], made
    survivor = next(batch_id for batch_id, status in made.items() if status == "completed")
    assert {event["batch_id"] for event in events} == {survivor}
    followed = 1 if lagging.who_settles == "waiter" else 0  # else the loser's settle adopted the survivor already
    assert [event.get("followed", False) for event in events].count(True) == followed
    for (op, _, ti), event in zip(deferred.values(), events, strict=True):
        assert op.execute_complete(context_of(ti, store), event) == survivor
        assert ti.xcom["batch_id"] == survivor
    a_third_try_takes(survivor, lagging, file_id, run_id, store, store_kind)


@pytest.mark.parametrize("store_kind", STORES)
def test_a_lagging_listing_without_a_wait_still_ends_with_one_batch_running(lagging, store_kind):
    """
    The create does not wait (the default): a sensor downstream does. However long the listing lags, the race
    ends with one batch running, and both tries name it, so each sensor waits for the batch that runs.
    """
    from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    run_id = f"r-{uuid.uuid4()}"
    store = store_of(store_kind)
    returned = race(file_id, lambda op: op.execute(context_of(TI(run_id), store)), wait=False)

    assert len(lagging.state.batches) == 2, "both tries created a batch (the race happened)"
    assert len(live(lagging)) == 1, {b.id: lagging.state.status(b) for b in lagging.state.batches.values()}
    survivor = live(lagging)[0]
    assert returned == {1: survivor, 2: survivor}
    for batch_id in returned.values():
        sensor = OpenAIBatchSensor(task_id="wait", batch_id=batch_id, mode="poke", poke_interval=0.5, deferrable=False)
        while not (done := sensor.poke({"ti": TI(run_id)})):
            time.sleep(0.5)
        assert done.xcom_value["batch_id"] == survivor
    made = {b.id: lagging.state.status(b) for b in lagging.state.batches.values()}
    assert sorted(made.values()) == ["cancelled", "completed"], made
    a_third_try_takes(survivor, lagging, file_id, run_id, store, store_kind)


def test_nothing_is_logged_between_the_create_and_the_settle(fake, caplog, monkeypatch):
    """
    An orphaned try (its supervisor gone) is killed by Airflow 3.3 at its first log line: it must have settled,
    cancelling a duplicate, before it says anything. Here the create's answer is lost (the try looks for what it
    made) and the listings fail once each (the SDK retries them): what they have to say comes after the settle.
    """
    import logging

    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    fake.faults.script("batches.create", "drop_after")
    fake.faults.script("batches.list", "500", "500")
    caplog.set_level(logging.INFO)
    marks: dict[str, int] = {}
    op = create_op(file_id)
    real_create = op.hook.create_batch

    def create(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault("create", len(caplog.records))
        return real_create(*args, **kwargs)

    real_settle = batches.CreatePath.settle_many

    def settle_many(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_settle(self, *args, **kwargs)
        marks["settled"] = len(caplog.records)
        return result

    op.hook.create_batch = create  # type: ignore[method-assign]
    monkeypatch.setattr(batches.CreatePath, "settle_many", settle_many)
    batch_id = op.execute(context_of(TI(f"r-{uuid.uuid4()}"), None))

    assert len(fake.state.batches) == 1 and live(fake) == [batch_id]
    in_the_window = [record.getMessage() for record in caplog.records[marks["create"] : marks["settled"]]]
    assert in_the_window == []
    said = [record.getMessage() for record in caplog.records]
    assert any("checking whether it took effect" in line for line in said), said  # said, after the settle
    assert any("Retrying request" in line for line in said), said


def test_a_trigger_rebuilt_after_it_followed_the_survivor_still_ends_on_it(fake, clock, monkeypatch):
    """
    The trigger's second look cancelled its own batch and switched to an older try's; then the triggerer
    restarted. Airflow rebuilds the trigger from the arguments it deferred with (its own batch, the look still
    pending): it must look again before taking its own batch's "cancelled" for the task's outcome.
    """
    from airflow_provider_openai_batch.triggers.openai_batch import EVENT_TERMINAL, OpenAIBatchTrigger

    monkeypatch.setattr(batches, "SIBLING_LOOK_AFTER", -3600.0)  # due at once, whatever the server's clock says
    file_id = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(3)])).id
    hook = OpenAIBatchHook()
    key = uuid.uuid4().hex
    since = clock()
    # Two tries' batches of one second (the clock stands still until the test moves it): the lower id wins.
    one, other = (hook.create_batch(file_id, ENDPOINT, metadata={IDEMPOTENCY_METADATA_KEY: key}) for _ in range(2))
    survivor, own = (one.id, other) if one.id < other.id else (other.id, one)
    deferred_with = {
        "batch_id": own.id,
        "conn_id": "openai_default",
        "poll_interval": 0.1,
        "end_time": time.time() + 60,
        "jitter_first_poll": False,
        "created_at": float(own.created_at),
        "max_poll_interval": None,
        "sibling_look": batches.SiblingLook(key, None, since).to_json(),
    }

    async def first_event(trigger: Any) -> Any:
        async for event in trigger.run():
            return event.payload

    async def until_restart() -> None:
        with pytest.raises(asyncio.TimeoutError):  # the survivor is still running when the triggerer restarts
            await asyncio.wait_for(first_event(OpenAIBatchTrigger(**deferred_with)), timeout=2)

    asyncio.run(until_restart())
    assert fake.state.status(fake.state.batches[own.id]) in ("cancelling", "cancelled")  # the first run followed
    clock.advance(60)
    assert fake.state.status(fake.state.batches[own.id]) == "cancelled"

    event = asyncio.run(first_event(OpenAIBatchTrigger(**deferred_with)))

    assert event["status"] == EVENT_TERMINAL
    assert event["batch_id"] == survivor and event.get("followed") is True
    ti = TI(f"r-{uuid.uuid4()}")
    assert create_op(file_id).execute_complete({"ti": ti}, event) == survivor
    assert ti.xcom["batch_id"] == survivor
