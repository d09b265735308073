"""
The one-task job's lifecycle is the blocks' table (docs/lifecycle.md): a clear or mark success of a deferred job
leaves its batches running, mark failed cancels them (deferred and blocking); a retry continues, a clear runs the
source again; mapped jobs keep their results apart; request dicts are data, never templates; a generator streams; a
Parquet destination without pyarrow is refused before anything is sent; requests that never ran fail the job unless
allowed; a compatible server's transient failure is resent.

Real HTTP to FakeOpenAIServer; ``test_job``'s driver plays Airflow's part.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.exceptions import BatchFailedError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
from airflow_provider_openai_batch.results import JoinedRow, is_retryable
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from airflow_provider_openai_batch.triggers.job import OpenAIBatchJobTrigger
from tests.conftest import FAST, connection_env, jsonl, request_line
from tests.test_job import Driver, synced_clock
from tests.test_lifecycle import TI

ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def job_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    """A server on ``test_job``'s clock, which its driver moves while the job is deferred."""
    with FakeOpenAIServer(timings=FAST, clock=synced_clock()) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv


def job(tmp_path: Path, source: Any, **kwargs: Any) -> OpenAIBatchJobOperator:
    kwargs.setdefault("destination", str(tmp_path / "joined.jsonl"))
    kwargs.setdefault("deferrable", True)
    return OpenAIBatchJobOperator(task_id="job", source=source, endpoint=ENDPOINT, poll_interval=0.05, **kwargs)


@pytest.mark.parametrize(("state", "cancelled"), [("failed", True), (None, False), ("success", False)])
def test_a_deferred_job_is_cancelled_only_when_the_user_stopped_it(job_server, state, cancelled, monkeypatch):
    """Airflow 3.3 calls on_kill on clear, mark failed and mark success alike: the task's state tells them apart."""
    hook = OpenAIBatchHook()
    file_id = hook.upload_file(jsonl([request_line(0)])).id
    ids = [hook.create_batch(file_id, ENDPOINT, metadata={"fake_scenario": "stall"}).id for _ in range(2)]
    trigger = OpenAIBatchJobTrigger(batch_ids=ids, conn_id="openai_default", poll_interval=1, end_times={})

    async def state_now() -> str | None:
        return state

    monkeypatch.setattr(trigger, "task_state", state_now)
    before = job_server.count("batches.cancel")
    asyncio.run(trigger.on_kill())
    assert job_server.count("batches.cancel") - before == (2 if cancelled else 0)


@pytest.mark.parametrize(("state", "cancelled"), [("failed", True), (None, False)])
def test_a_blocking_job_follows_the_same_kill_policy(job_server, tmp_path, state, cancelled, monkeypatch):
    from airflow_provider_openai_batch.operators import base

    hook = OpenAIBatchHook()
    batch_id = hook.create_batch(hook.upload_file(jsonl([request_line(0)])).id, ENDPOINT).id
    op = job(tmp_path, [request_line(0)], deferrable=False)
    op._running, op._running_ti = [batch_id], TI("r")
    monkeypatch.setattr(base, "task_instance_state", lambda ti: state)
    before = job_server.count("batches.cancel")
    op.on_kill()
    assert job_server.count("batches.cancel") - before == (1 if cancelled else 0)


def test_mapped_jobs_with_one_destination_keep_their_results_apart(job_server, tmp_path):
    run_id = f"run-{uuid.uuid4()}"
    results = {}
    for index in (0, 1):
        rows = [request_line(i + 10 * index) for i in range(3)]
        driver = Driver(lambda rows=rows: job(tmp_path, rows), run_id, None)
        driver.ti.map_index = index
        results[index] = driver.attempt()
    paths = {index: Path(str(result["joined_uri"])) for index, result in results.items() if result}
    assert paths[0] != paths[1]
    for index, path in paths.items():
        ids = [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]
        assert ids == [f"req-{i + 10 * index}" for i in range(3)]


def test_request_dicts_are_never_templates(job_server, tmp_path):
    """A ``{{ ds }}`` in a prompt stays as written and a ``{% if`` does not fail the task."""
    rows = [
        request_line(0, messages=[{"role": "user", "content": "Summarise {{ ds }} for me"}]),
        request_line(1, messages=[{"role": "user", "content": "Keep {% if x %} as text"}]),
    ]
    op = job(tmp_path, rows)
    op.render_template_fields({"ds": "2026-01-01"})
    assert op.source is rows
    result = Driver(lambda: op, f"run-{uuid.uuid4()}", None).attempt()
    assert result is not None and result["counts"]["succeeded"] == 2


def test_a_generator_is_streamed(job_server, tmp_path):
    result = Driver(lambda: job(tmp_path, (request_line(i) for i in range(5))), f"run-{uuid.uuid4()}", None).attempt()
    assert result is not None and result["counts"]["succeeded"] == 5


def test_a_wrong_source_names_what_it_may_be(job_server, tmp_path):
    before = job_server.count("files.create")
    with pytest.raises(TypeError, match=r"item 1 is a int, not a request dict"):
        job(tmp_path, [request_line(0), 3]).execute({"ti": TI("r")})
    assert job_server.count("files.create") == before


def test_the_decorator_names_the_function_and_what_it_may_return(job_server, tmp_path):
    from airflow_provider_openai_batch.decorators.openai_batch import _OpenAIBatchDecoratedOperator

    def build_prompts() -> dict[str, str]:
        return {"custom_id": "x"}

    op = _OpenAIBatchDecoratedOperator(
        task_id="job", python_callable=build_prompts, endpoint=ENDPOINT, destination=str(tmp_path / "out.jsonl")
    )
    with pytest.raises(TypeError, match=r"'build_prompts'.*returned dict.*may return request dicts"):
        op.resolve_source({})


def test_parquet_without_pyarrow_is_refused_before_anything_is_sent(job_server, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    before = job_server.count("files.create")
    with pytest.raises(ValueError, match=r"parquet.*pip install 'airflow-provider-openai-batch\[parquet\]'"):
        job(tmp_path, [request_line(0)], destination=str(tmp_path / "out.parquet")).execute({"ti": TI("r")})
    assert job_server.count("files.create") == before


def test_requests_that_never_ran_fail_the_job_unless_allowed(job_server, tmp_path):
    job_server.script_batches("expire")  # half of the batch's requests never run
    driver = Driver(lambda: job(tmp_path, [request_line(i) for i in range(4)], max_rounds=1), f"r-{uuid.uuid4()}", None)
    with pytest.raises(BatchFailedError, match=r"2 request\(s\) never ran.*max_unrun_requests.*expired"):
        driver.attempt()
    assert (tmp_path / "joined.jsonl").exists(), "the joined result is written first: nothing is lost"
    job_server.script_batches("expire")
    allowed = Driver(
        lambda: job(tmp_path, [request_line(i) for i in range(4)], max_rounds=1, max_unrun_requests=2),
        f"r-{uuid.uuid4()}",
        None,
    ).attempt()
    assert allowed is not None and allowed["counts"]["expired"] == 2


def test_a_clear_runs_the_source_again_and_a_retry_continues(job_server, tmp_path):
    calls: list[int] = []

    class Counting(OpenAIBatchJobOperator):
        def resolve_source(self, context: Any) -> Any:
            calls.append(1)
            return [request_line(i, messages=[{"role": "user", "content": f"v{len(calls)}"}]) for i in range(2)]

    def make() -> OpenAIBatchJobOperator:
        return Counting(
            task_id="job",
            endpoint=ENDPOINT,
            destination=str(tmp_path / "joined.jsonl"),
            poll_interval=0.05,
            deferrable=True,
            retries=2,
        )

    driver = Driver(make, f"r-{uuid.uuid4()}", None)
    driver.ti = TI(driver.ti.run_id, retries=2)
    driver.ti.task_id = "job"
    assert driver.attempt(crash="deferred") is None  # try 1 died while deferred
    driver.ti.retry()
    assert driver.attempt() is not None
    assert len(calls) == 1, "a retry continues from the work folder"
    driver.ti.clear(retries=2)
    assert driver.attempt() is not None
    assert len(calls) == 2, "a clear means run it again: the source is read again"


def test_a_compatible_servers_upstream_5xx_is_resent():
    """Some compatible servers report an upstream 500 as ``{type: request_failed, message: "Error code: 500 ..."}``."""
    row = JoinedRow(
        custom_id="a",
        status="failed",
        request={},
        error={"type": "request_failed", "message": "Error code: 500 - {'error': 'upstream'}"},
    )
    assert is_retryable(row)
    row.error = {"type": "request_failed", "message": "Error code: 400 - bad request"}
    assert not is_retryable(row)


# --- deadlines: acted on once, then the batch is waited for -------------------------------------------------------


@pytest.fixture
def deadline_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    """
    A server on a clock of its own that starts at the worker's time (deadlines are OpenAI's ``created_at`` plus
    seconds, compared with the worker's clock): the driver moves it while the job is deferred.
    """
    from airflow_provider_openai_batch.testing import FakeClock

    clock = FakeClock()
    monkeypatch.setattr("tests.test_job.CLOCK", clock)
    with FakeOpenAIServer(timings=FAST, clock=clock) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        srv.clock_ = clock  # type: ignore[attr-defined]
        yield srv


def stalled_job(tmp_path: Path, **kwargs: Any) -> OpenAIBatchJobOperator:
    return job(tmp_path, [request_line(i) for i in range(4)], deadline=2.0, max_poll_interval=None, **kwargs)


def test_at_its_deadline_a_deferred_job_cancels_once_keeps_what_ran_and_resends_the_rest(deadline_server, tmp_path):
    job_server = deadline_server
    job_server.script_batches("stall")
    cancels = job_server.count("batches.cancel")
    result = Driver(lambda: stalled_job(tmp_path), f"r-{uuid.uuid4()}", None).attempt()
    assert result is not None and result["counts"]["succeeded"] == 4
    assert [b["status"] for b in result["batches"]] == ["cancelled", "completed"]
    assert job_server.count("batches.cancel") - cancels == 1


def test_at_its_deadline_a_blocking_job_cancels_the_batch_once_and_waits_for_it_to_end(deadline_server, tmp_path):
    """The batch takes a while to go from cancelling to cancelled: the job polls it, it does not cancel again."""
    import threading
    import time

    job_server, clock = deadline_server, deadline_server.clock_  # type: ignore[attr-defined]
    job_server.script_batches("stall")
    cancels = job_server.count("batches.cancel")
    stop = threading.Event()

    def openai_works() -> None:  # a blocking job moves no clock: OpenAI's time passes on its own, at real speed
        while not stop.is_set():
            clock.advance(max(0.0, time.time() - clock()))
            time.sleep(0.01)

    ticker = threading.Thread(target=openai_works, daemon=True)
    ticker.start()
    try:
        result = Driver(lambda: stalled_job(tmp_path, deferrable=False), f"r-{uuid.uuid4()}", None).attempt()
    finally:
        stop.set()
    assert result is not None and result["counts"]["succeeded"] == 4
    assert job_server.count("batches.cancel") - cancels == 1, "the cancel was sent again while the batch cancelled"


def test_a_deadline_without_cancelling_fails_the_try_and_the_retry_waits_for_the_batch(deadline_server, tmp_path):
    """``cancel_on_timeout=False``: the try fails (Airflow retries it); the retry waits and collects everything."""
    from airflow.providers.common.compat.sdk import AirflowSensorTimeout, TaskDeferred

    from airflow_provider_openai_batch.operators.job import JobDeadlineError
    from tests.test_job import run_trigger

    job_server = deadline_server
    job_server.script_batches("stall")
    driver = Driver(lambda: stalled_job(tmp_path, cancel_on_timeout=False), f"r-{uuid.uuid4()}", None)
    with pytest.raises(JobDeadlineError, match="a retry collects") as failed:
        driver.attempt()
    assert not isinstance(failed.value, AirflowSensorTimeout), "a sensor timeout is never retried"
    batch_id = next(iter(job_server.state.batches.values())).id
    assert job_server.state.status(job_server.state.batches[batch_id]) == "in_progress"

    with pytest.raises(TaskDeferred) as waiting:  # the retry, while the batch still runs: it waits
        stalled_job(tmp_path, cancel_on_timeout=False).execute(driver.context())
    trigger = waiting.value.trigger

    async def first_event_within(seconds: float) -> dict[str, Any] | None:
        async def first() -> dict[str, Any]:
            async for event in trigger.run():
                return dict(event.payload)
            raise AssertionError("no event")

        try:
            return await asyncio.wait_for(first(), seconds)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return None

    assert asyncio.run(first_event_within(1.0)) is None, "the retry gave up at once on the same deadline"
    job_server.state.batches[batch_id].scenario = "complete"  # the batch ends at last
    event = run_trigger(trigger)
    result = stalled_job(tmp_path, cancel_on_timeout=False).execute_complete(driver.context(), event)
    assert result["counts"]["succeeded"] == 4


# --- the work folder belongs to one task instance and one try at a time -----------------------------------------


def test_mapped_jobs_with_one_work_dir_keep_their_work_apart(job_server, tmp_path):
    run_id = f"run-{uuid.uuid4()}"
    for index in (0, 1):
        rows = [request_line(i + 10 * index) for i in range(3)]
        driver = Driver(
            lambda rows=rows: job(tmp_path, rows, work_dir=str(tmp_path / "work"), keep_work_dir=True), run_id, None
        )
        driver.ti.map_index = index
        result = driver.attempt()
        assert result is not None
        ids = [json.loads(line)["custom_id"] for line in Path(str(result["joined_uri"])).read_text().splitlines()]
        assert ids == [f"req-{i + 10 * index}" for i in range(3)], "one instance read the other's work"


def test_an_orphaned_try_stops_before_paying_again_for_what_its_retry_sent(job_server, tmp_path):
    """
    Two tries at once (a worker Airflow gave up on still runs its try): the retry continues the work folder and
    sends the pieces; the orphan, about to send the same pieces, finds the retry's name on the folder and stops.
    One batch per piece, whatever the order.
    """
    from airflow_provider_openai_batch.operators.job import JobSupersededError

    rows = [request_line(i) for i in range(6)]
    run_id = f"r-{uuid.uuid4()}"

    def make() -> OpenAIBatchJobOperator:
        return job(tmp_path, rows, max_requests_per_file=3, keep_work_dir=True, retries=2)

    orphan_ti, retry_ti = TI(run_id, retries=2), TI(run_id, retries=2)
    orphan_ti.task_id = retry_ti.task_id = "job"
    retry_ti.retry()
    orphan = make()
    real_upload = orphan._upload
    retried: list[dict[str, Any]] = []

    def retry_runs_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not retried:  # the orphan has shards to send; its retry starts now and sends them all
            driver = Driver(make, run_id, None)
            driver.ti = retry_ti
            retried.append(driver.attempt() or {})
        return real_upload(*args, **kwargs)

    orphan._upload = retry_runs_meanwhile  # type: ignore[method-assign]
    before = len(job_server.state.batches)
    with pytest.raises(JobSupersededError, match="another try of this task"):
        orphan.execute({"ti": orphan_ti})
    assert retried and retried[0]["counts"]["succeeded"] == 6
    assert len(job_server.state.batches) - before == 2, "the orphan created batches its retry had sent"


def test_a_clear_with_the_same_input_runs_again_unless_reuse_allows_completed(job_server, tmp_path):
    """A clear means run it again: a completed batch of the same content is not reused unless ``reuse`` says so."""
    rows = [request_line(i) for i in range(2)]

    def driver_for(reuse: str) -> Driver:
        made = Driver(lambda: job(tmp_path, rows, reuse=reuse, retries=1), run_id, None)
        made.ti = ti
        return made

    run_id = f"r-{uuid.uuid4()}"
    ti = TI(run_id, retries=1)
    ti.task_id = "job"
    before = len(job_server.state.batches)
    assert driver_for("active").attempt() is not None
    ti.clear(retries=1)
    assert driver_for("active").attempt() is not None
    assert len(job_server.state.batches) - before == 2, "a clear reused the completed batch"
    ti.clear(retries=1)
    assert driver_for("active_or_completed").attempt() is not None
    assert len(job_server.state.batches) - before == 2, "reuse='active_or_completed' created a new batch"


def test_a_batch_that_failed_for_its_input_fails_the_job_with_openais_errors(job_server, tmp_path):
    job_server.script_batches("fail")
    with pytest.raises(BatchFailedError, match=r"failed as a whole: \[\w+\]"):
        Driver(lambda: job(tmp_path, [request_line(0)]), f"r-{uuid.uuid4()}", None).attempt()


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The try number of every settle the create path runs, in order."""
    from airflow_provider_openai_batch.batches import CreatePath

    tries: list[int] = []
    real_settle = CreatePath.settle_many

    def counting(self: CreatePath, made: Any, held: Any = None) -> Any:
        tries.append(self.try_number or 0)
        return real_settle(self, made, held)

    monkeypatch.setattr(CreatePath, "settle_many", counting)
    return tries


def test_a_first_try_creates_without_the_settle_and_a_retry_settles(job_server, tmp_path, settled):
    """
    The settle (a pause, then a listing) is for a try that may have a racer that wins. A first try whose work folder
    holds no later try's mark right after its creates has none: no earlier try exists, and a later one begins
    looking after those creates. A retry may race the first try's orphan: it settles.
    """
    from airflow.providers.common.compat.sdk import TaskDeferred

    rows = [request_line(i) for i in range(4)]
    for try_number in (1, 2):
        ti = TI(f"r-{uuid.uuid4()}", retries=1)
        ti.task_id, ti.try_number = "job", try_number
        with pytest.raises(TaskDeferred):
            job(tmp_path / str(try_number), rows, max_requests_per_file=2, retries=1).execute({"ti": ti})
    assert settled == [2], "the first try settled (or the retry did not)"


def test_a_retry_that_misses_the_first_trys_unsettled_batches_keeps_one_per_piece(job_server, tmp_path):
    """
    The first try dies right after creating (unsettled: it had no racer that could win); the listing lags, so its
    retry does not find those batches and creates its own. The retry's settle waits until its own batches are listed,
    sees the first try's older ones there, and cancels its own: one live batch per piece.
    """
    from airflow_provider_openai_batch.idempotency import IDEMPOTENCY_METADATA_KEY
    from tests.test_job import Crash

    job_server.list_lag = 3.0
    rows = [request_line(i) for i in range(4)]
    run_id = f"r-{uuid.uuid4()}"
    ti = TI(run_id, retries=1)
    ti.task_id = "job"
    first = job(tmp_path, rows, max_requests_per_file=2, retries=1)
    real_create = first._create

    def dies_after_creating(*args: Any, **kwargs: Any) -> Any:
        real_create(*args, **kwargs)
        raise Crash()

    first._create = dies_after_creating  # type: ignore[method-assign]
    before = set(job_server.state.batches)
    with pytest.raises(Crash):
        first.execute({"ti": ti})
    ti.retry()
    driver = Driver(lambda: job(tmp_path, rows, max_requests_per_file=2, retries=1), run_id, None)
    driver.ti = ti
    result = driver.attempt()
    assert result is not None and result["counts"]["succeeded"] == 4
    made = [b for batch_id, b in job_server.state.batches.items() if batch_id not in before]
    live: dict[str, int] = {}
    for stored in made:
        if job_server.state.status(stored) != "cancelled":
            key = (stored.metadata or {})[IDEMPOTENCY_METADATA_KEY]
            live[key] = live.get(key, 0) + 1
    assert len(made) == 4, "the retry's lookup was meant to miss the first try's batches (a lagging listing)"
    assert sorted(live.values()) == [1, 1], f"live batches per piece: {live}"


def test_a_first_try_settles_when_a_later_try_marked_its_folder(job_server, tmp_path, settled):
    """
    The state's owner name is taken in turns (a first try's write can land over a later try's); each try's mark on
    the folder is not. A later try that began while the first try was sending makes the first try settle, whatever
    the owner name says.
    """
    from airflow.providers.common.compat.sdk import TaskDeferred

    ti = TI(f"r-{uuid.uuid4()}", retries=1)
    ti.task_id = "job"
    first = job(tmp_path, [request_line(i) for i in range(2)], retries=1)
    real_upload = first._upload

    def later_try_begins(*args: Any, **kwargs: Any) -> Any:
        first._work({"ti": ti}).mark_try(2)  # the retry marks the folder; the state still names try 1
        return real_upload(*args, **kwargs)

    first._upload = later_try_begins  # type: ignore[method-assign]
    with pytest.raises(TaskDeferred):
        first.execute({"ti": ti})
    assert settled == [1], "the first try skipped its settle although a later try had begun"
