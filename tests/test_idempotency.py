"""
A retry never pays twice: the create operator run again and again with one task identity, crashing at every
point of its work and in every order, leaves exactly one batch on the server.

The task context is a narrow stand-in (ti with xcom_push, and the Task SDK's task_state_store where Airflow
3.3 has one); every API call is real HTTP to FakeOpenAIServer, which is what the assertions count.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_openai_batch import idempotency
from airflow_provider_openai_batch.batches import CreatePath
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import IDEMPOTENCY_METADATA_KEY
from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchCreateOperator
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import FAST, connection_env, jsonl, request_line


class Crash(Exception):
    """The worker died here (OOM kill, node loss, SIGKILL): nothing after this point ran."""


class FakeTI:
    def __init__(self, run_id: str, map_index: int = -1) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = "nightly", "create", run_id, map_index
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class MemoryStateStore:
    """The Task SDK's TaskStateStoreAccessor interface (get/set/delete), kept across tries like Airflow does."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(timings=FAST) as srv:
        previous = os.environ.get("AIRFLOW_CONN_OPENAI_DEFAULT")
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = connection_env(srv)
        try:
            yield srv
        finally:
            if previous is None:
                os.environ.pop("AIRFLOW_CONN_OPENAI_DEFAULT", None)
            else:
                os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = previous


@pytest.fixture(scope="module")
def input_file_id(shared_server) -> str:
    return OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(5)])).id


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch):
    monkeypatch.setattr(idempotency, "RETRY_BASE_DELAY", 0.01)


def batches_for(server: FakeOpenAIServer, ti: FakeTI, file_id: str, metadata: dict | None = None) -> list[str]:
    work = idempotency.work_parts(file_id, "/v1/chat/completions", "24h", metadata, None)
    key = idempotency.idempotency_key((ti.dag_id, ti.task_id, ti.run_id, ti.map_index), *work)
    return [b.id for b in server.state.batches.values() if (b.metadata or {}).get(IDEMPOTENCY_METADATA_KEY) == key]


def attempt(
    point: str,
    server: FakeOpenAIServer,
    ti: FakeTI,
    store: MemoryStateStore | None,
    file_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> str | None:
    """One try of the task, dying at ``point``; returns the batch id when the try got that far."""
    op = OpenAIBatchCreateOperator(
        task_id="create",
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        wait_for_completion=point == "after_defer",
        deferrable=True,
        poll_interval=0.05,
    )
    context: dict[str, Any] = {"ti": ti}
    if store is not None:
        context["task_state_store"] = store
    hook = op.hook
    real_create, real_list = hook.create_batch, hook.list_batches
    with monkeypatch.context() as patch:
        if point == "before_call":
            patch.setattr(hook, "create_batch", lambda *a, **k: (_ for _ in ()).throw(Crash()))
        elif point == "after_call":

            def created_then_crash(*args: Any, **kwargs: Any) -> Any:
                real_create(*args, **kwargs)
                raise Crash()

            patch.setattr(hook, "create_batch", created_then_crash)
        elif point == "lost_answer":
            server.faults.script("batches.create", "drop_after")
        elif point == "lost_answer_then_crash":
            server.faults.script("batches.create", "drop_after")
            # Dies when it looks for what the lost answer made.
            patch.setattr(hook, "list_batches", lambda *a, **k: (_ for _ in ()).throw(Crash()))
        elif point == "transient":
            server.faults.script("batches.create", "503", "429")
        elif point == "after_push":
            real_push = op.push_batch_id

            def pushed_then_crash(ctx: Any, batch_id: str) -> None:
                real_push(ctx, batch_id)
                raise Crash()

            patch.setattr(op, "push_batch_id", pushed_then_crash)
        elif point == "after_record":
            real_remember = CreatePath.remember

            def recorded_then_crash(*args: Any) -> None:
                real_remember(*args)
                raise Crash()

            patch.setattr(CreatePath, "remember", recorded_then_crash)
        try:
            batch_id = op.execute(context)
        except (Crash, TaskDeferred):
            batch_id = None
        finally:
            server.faults.clear()
            patch.setattr(hook, "list_batches", real_list)
    if point == "in_sensor" and batch_id:
        # The batch was made; the downstream wait then died and the whole run was cleared.
        server.faults.script("batches.retrieve", *["500"] * 4)
        with pytest.raises(Exception, match="500"):
            OpenAIBatchHook(max_retries=1).get_batch(batch_id)
        server.faults.clear()
    return batch_id


POINTS = (
    "ok",
    "before_call",
    "after_call",
    "lost_answer",
    "lost_answer_then_crash",
    "transient",
    "after_push",
    "after_record",
    "after_defer",
    "in_sensor",
)
SEQUENCES = [
    *itertools.product(POINTS, repeat=2),
    *[s for s in itertools.product(POINTS[1:], repeat=3) if len(set(s)) == 3][::24],
]


@pytest.mark.parametrize("with_store", [True, False], ids=["task_state_store", "metadata_scan_only"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=["-".join(s) for s in SEQUENCES])
def test_one_batch_whatever_happens(sequence, with_store, shared_server, input_file_id, monkeypatch):
    ti = FakeTI(run_id=f"scheduled__{uuid.uuid4()}")
    store = MemoryStateStore() if with_store else None
    returned = [attempt(point, shared_server, ti, store, input_file_id, monkeypatch) for point in sequence]
    final = attempt("ok", shared_server, ti, store, input_file_id, monkeypatch)
    made = batches_for(shared_server, ti, input_file_id)
    assert made == [final], f"{sequence}: server holds {made}"
    assert {r for r in returned if r} <= {final}
    assert ti.xcom["batch_id"] == final


def test_enough_cases():
    assert len(SEQUENCES) * 2 >= 100


def test_a_new_map_index_or_input_is_a_new_batch(shared_server, input_file_id, monkeypatch):
    run_id = f"scheduled__{uuid.uuid4()}"
    first = attempt("ok", shared_server, FakeTI(run_id, 0), None, input_file_id, monkeypatch)
    other_index = attempt("ok", shared_server, FakeTI(run_id, 1), None, input_file_id, monkeypatch)
    other_file = OpenAIBatchHook().upload_file(jsonl([request_line(i) for i in range(6)])).id
    other_input = attempt("ok", shared_server, FakeTI(run_id, 0), None, other_file, monkeypatch)
    assert len({first, other_index, other_input}) == 3


@pytest.mark.parametrize("ending", ["failed", "expired", "cancelled"])
def test_a_dead_batch_is_replaced(ending, shared_server, monkeypatch):
    scenario = {"failed": "fail", "expired": "expire", "cancelled": "stall"}[ending]
    hook = OpenAIBatchHook()
    file_id = hook.upload_file(jsonl([request_line(i, tag=scenario) for i in range(4)])).id
    ti = FakeTI(run_id=f"scheduled__{uuid.uuid4()}")
    op = OpenAIBatchCreateOperator(
        task_id="create", input_file_id=file_id, endpoint="/v1/chat/completions", metadata={"fake_scenario": scenario}
    )
    first = op.execute({"ti": ti})
    if ending == "cancelled":
        hook.cancel_batch(first)
    deadline = time.monotonic() + 10
    while hook.get_batch(first).status != ending:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = op.execute({"ti": ti})
    assert second != first
    assert len(batches_for(shared_server, ti, file_id, {"fake_scenario": scenario})) == 2


def test_a_completed_batch_is_reused_without_waiting(shared_server, input_file_id, monkeypatch):
    ti = FakeTI(run_id=f"scheduled__{uuid.uuid4()}")
    first = attempt("ok", shared_server, ti, None, input_file_id, monkeypatch)
    assert first is not None
    OpenAIBatchHook().wait_for_batch(first, poll_interval=0.05, timeout=10)
    before = shared_server.count("batches.retrieve")
    op = OpenAIBatchCreateOperator(
        task_id="create",
        input_file_id=input_file_id,
        endpoint="/v1/chat/completions",
        wait_for_completion=True,
        deferrable=True,
    )
    assert op.execute({"ti": ti}) == first  # no TaskDeferred: nothing to wait for
    assert shared_server.count("batches.retrieve") - before == 1
    assert batches_for(shared_server, ti, input_file_id) == [first]


def test_metadata_limits_are_checked_before_sending(shared_server, input_file_id):
    op = OpenAIBatchCreateOperator(
        task_id="create",
        input_file_id=input_file_id,
        endpoint="/v1/chat/completions",
        metadata={f"k{i}": "v" for i in range(16)},
    )
    before = shared_server.count("batches.create")
    with pytest.raises(ValueError, match="16 keys; at most 13"):
        op.execute({"ti": FakeTI("r")})
    op.metadata = {"note": "x" * 513}
    with pytest.raises(ValueError, match="field 'note': 513 characters"):
        op.execute({"ti": FakeTI("r")})
    assert shared_server.count("batches.create") == before


def test_upload_answer_lost_is_not_sent_twice(shared_server, tmp_path):
    from airflow_provider_openai_batch.operators.openai_batch import OpenAIBatchUploadOperator

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([request_line(i, salt=str(uuid.uuid4())) for i in range(3)]))
    before = len(shared_server.state.files)
    shared_server.faults.script("files.create", "drop_after")
    op = OpenAIBatchUploadOperator(task_id="upload", source=str(path), endpoint="/v1/chat/completions")
    file_id = op.execute({})
    assert len(shared_server.state.files) == before + 1
    assert json.loads(shared_server.state.files[file_id].path.read_bytes().splitlines()[0])["custom_id"] == "req-0"
