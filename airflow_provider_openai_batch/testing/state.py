"""
The fake server's memory: files on disk, batches, and the status machine that moves them on a clock.

Status is derived from the clock whenever a batch is read, so tests can use a real clock (fast timings) or a
``FakeClock`` they advance by hand, and a batch never needs a background task to make progress.

The account is modelled here too: each model's enqueued-token queue (``queue_limits``). Whether a batch gets into
its model's queue is decided at the moment its validation ends on the clock, in the order of those moments, against
the batches admitted before it that had not yet ended at that moment: the same outcome whichever batch is read first.

The CPU work is done where OpenAI does it, off the request path: a create answers at once and a worker thread reads
the input file while the batch says ``validating``, then writes the batch's answers ahead while it runs, so the read
that finds it ``completed`` only writes the files. Only the work moves: every status, count and outcome is still
decided by the clock, and a reader that needs the validation's results at or after its end on the clock waits for the
worker (the worker never takes the state's lock, so waiting under it is safe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from airflow_provider_openai_batch.endpoints import batch_endpoints
from airflow_provider_openai_batch.testing import responses
from airflow_provider_openai_batch.testing.input_rules import check_input
from airflow_provider_openai_batch.testing.tokens import batch_tokens

T = TypeVar("T")

#: When a full queue refuses a batch: OpenAI fails it at the end of validation; Azure's fail-fast answers 400 at create.
QueueRefusalMode = Literal["at_validation", "at_create"]
QueueUnit = Literal["tokens", "requests"]
#: The organization OpenAI's refusal message names.
ORGANIZATION = "org-fake"
#: ``errors.data[].code`` of a queue refusal, and ``error.code`` of Azure's 400 at create.
QUEUE_ERROR_CODE = "token_limit_exceeded"
#: An answer written ahead: the md5 of its ``custom_id`` (the output file's order), its output line, and its usage.
Answer = tuple[bytes, bytes, int, int]


class FakeClock:
    """A clock tests move by hand: ``clock.advance(3600)`` makes an hour pass for every batch at once."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class HeldClock:
    """
    A clock that stands still until ``release()``, then runs at real speed from there.

    For a run that must see a batch still running when it first looks (a sensor that should defer), however
    slow or fast the machine: hold the clock until the waiting side has polled, then let the batch go on.
    """

    def __init__(self) -> None:
        self._held_at = time.time()
        self._released_at: float | None = None

    def __call__(self) -> float:
        released = self._released_at
        return self._held_at if released is None else self._held_at + (time.time() - released)

    def release(self) -> None:
        if self._released_at is None:
            self._released_at = time.time()


@dataclass
class Timings:
    """Seconds a batch spends in each phase on the server's clock (defaults keep tests quick)."""

    validating: float = 0.2
    in_progress: float = 0.6
    finalizing: float = 0.2
    cancelling: float = 0.2
    #: When a batch ``expires`` (scenario ``expire``): this share of its requests is done by then.
    expire_fraction: float = 0.5


@dataclass(frozen=True)
class QueueRefusal:
    """A batch its model's full queue refused (test instrumentation: what the account turned away, and why)."""

    model: str
    #: ``"tokens"`` (``queue_limits``) or ``"requests"`` (``request_queue_limits``).
    unit: QueueUnit
    #: What the batch would have added, and what the queue already held at that moment, in ``unit``.
    asked: int
    enqueued: int
    limit: int
    #: The clock moment of the decision: the end of validation, or the create call (``at_create``).
    at: float
    #: The failed batch; ``None`` when refused at create (no batch exists).
    batch_id: str | None
    message: str


class QueueLimitExceeded(Exception):
    """``batches.create`` refused because the model's queue is full (``queue_refusal="at_create"``): a 400."""

    def __init__(self, refusal: QueueRefusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path
    expires_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass(frozen=True)
class Validation:
    """What validating a batch's input finds: its requests and model, why it fails (``BatchError`` dicts, empty when
    it does not), and what it puts in its model's queue (counted only when the account is modelled)."""

    requests: list[tuple[str, dict[str, Any]]]
    model: str | None
    issues: list[dict[str, Any]]
    tokens: int


class RequestGate:
    """
    Lets the worker's background work give way to the requests being answered. OpenAI's API answers a create or a
    retrieve in the same time whatever it is validating or running meanwhile; here both share one interpreter, so
    the worker (validating inputs, writing answers ahead) pauses between small steps while a request is being
    answered, unless a request is waiting for the worker itself (then pausing would only slow that request).
    """

    #: Lines the worker handles between two looks at the gate, and the longest it gives way at each look.
    STEP = 256
    MAX_PAUSE = 0.05

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answering = 0
        self.waiting = 0

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around the answering of one request."""
        with self._lock:
            self.answering += 1
        try:
            yield
        finally:
            with self._lock:
                self.answering -= 1

    def result(self, future: Future[T]) -> T:
        """``future.result()``, counted as a request waiting for the worker while it is not done."""
        if future.done():
            return future.result()
        with self._lock:
            self.waiting += 1
        try:
            return future.result()
        finally:
            with self._lock:
                self.waiting -= 1

    def give_way(self) -> None:
        """While requests are being answered and none waits for the worker: pause (``MAX_PAUSE`` at most)."""
        deadline = time.monotonic() + self.MAX_PAUSE
        while self.answering > self.waiting and time.monotonic() < deadline:
            time.sleep(0.0005)

    def paced(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, giving way every ``STEP`` of them."""
        for n, item in enumerate(items, start=1):
            if n % self.STEP == 0:
                self.give_way()
            yield item


@dataclass
class StoredBatch:
    """
    A batch. ``requests``, ``model``, ``issues`` and ``tokens`` are what its validation found: reading one waits for
    the worker, so they are read only once the validation has ended on the clock (or the batch has ended); before
    that ``listed_total`` and ``listed_model``, a glance at the file at create, are what the batch shows.
    """

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: float
    scenario: str
    validation: Future[Validation]
    #: The lines of the input file and the first line's model, read at create: what the batch shows while validating.
    listed_total: int = 0
    listed_model: str | None = None
    #: Set when the batch fails for a reason of its own (the queue refused it, scenario ``fail``), over what the
    #: validation found.
    failed_with: list[dict[str, Any]] | None = None
    #: Its answers for the normal ending, written ahead by the worker (``None`` for a request marked ``fake_error``,
    #: decided at the end), while the batch is admitted or running; ``written_for``: the ``created`` stamp and
    #: ``compatible_quirks`` they were written with.
    written: Future[list[Answer | None]] | None = None
    written_for: tuple[int, bool] | None = None
    cancel_requested_at: float | None = None
    cancelled_done: int | None = None
    final_status: str | None = None
    finished_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict[str, Any] | None = None
    final_counts: dict[str, int] | None = None
    #: Creation order: breaks ties between batches whose validation ends at the same moment.
    seq: int = 0
    #: ``"pending"`` until its validation ends, then ``"admitted"`` or ``"refused"``; ``"none"`` when the batch never
    #: reaches the queue (the account is not modelled, no model, its input fails validation, cancelled first).
    queue: Literal["none", "pending", "admitted", "refused"] = "none"
    #: When it entered the queue: its validation end (``at_validation``) or its creation (``at_create``).
    admitted_at: float | None = None
    #: The state's gate (waiting for the validation is counted there, so the worker does not give way meanwhile).
    gate: RequestGate | None = None

    def _validated(self) -> Validation:
        return self.gate.result(self.validation) if self.gate is not None else self.validation.result()

    @property
    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        return self._validated().requests

    @property
    def model(self) -> str | None:
        return self._validated().model

    @property
    def tokens(self) -> int:
        """What the batch puts in its model's queue (counted only when the account is modelled)."""
        return self._validated().tokens

    @property
    def issues(self) -> list[dict[str, Any]]:
        """``BatchError`` dicts: why the batch fails (empty when it does not)."""
        return self.failed_with if self.failed_with is not None else self._validated().issues

    @issues.setter
    def issues(self, value: list[dict[str, Any]]) -> None:
        self.failed_with = value


def _id(prefix: str) -> str:
    return f"{prefix}{os.urandom(12).hex()}"


def _errors_json(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": list(issues)}


def _glance(handle: IO[bytes]) -> tuple[int, str | None]:
    """
    The lines of an open input file and its first line's ``body.model``, in a pass the C code does (a count of
    newlines): what a batch shows while it validates. For a file that passes validation the lines are its requests
    (an empty line fails it); the handle is left at the start for the validation.
    """
    first = handle.readline()
    lines, last = (1 if first.endswith(b"\n") else 0), first
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        lines += chunk.count(b"\n")
        last = chunk
    lines += 1 if last and not last.endswith(b"\n") else 0
    handle.seek(0)
    try:
        body = json.loads(first).get("body")
        model = body.get("model") if isinstance(body, dict) else None
    except (ValueError, AttributeError):
        model = None
    return lines, model if isinstance(model, str) else None


def _answer(custom_id: str, endpoint: str, body: dict[str, Any], created: int, quirks: bool) -> Answer:
    """One successful request's output line, with what sorts it in the output file and its usage."""
    line = responses.output_line(custom_id, endpoint, body, created, quirks)
    return (hashlib.md5(custom_id.encode()).digest(), json.dumps(line).encode(), *responses.usage_of(endpoint, body))


def _answers(
    endpoint: str, requests: Iterable[tuple[str, dict[str, Any]]], created: int, quirks: bool
) -> list[Answer | None]:
    """The answers of a batch's requests as its normal ending writes them; ``None`` for a request marked
    ``fake_error``, whose fate is decided at the end (a transient one's depends on the runs before)."""
    return [
        None if body.get("fake_error") else _answer(custom_id, endpoint, body, created, quirks)
        for custom_id, body in requests
    ]


def _short(limit: int) -> str:
    """Azure's way of writing a limit in its message: ``30K``, ``2M``."""
    for size, suffix in ((1_000_000, "M"), (1_000, "K")):
        if limit >= size and limit % size == 0:
            return f"{limit // size}{suffix}"
    return str(limit)


class FakeState:
    """Files and batches held by one ``FakeOpenAIServer``; every method is thread-safe."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        timings: Timings | None = None,
        storage_dir: str | os.PathLike[str] | None = None,
        allowed_endpoints: tuple[str, ...] | None = batch_endpoints(),
        completion_windows: tuple[str, ...] | None = ("24h",),
        scenario: str = "complete",
        azure_quirks: bool = False,
        compatible_quirks: bool = False,
        queue_limits: Mapping[str, int] | None = None,
        request_queue_limits: Mapping[str, int] | None = None,
        queue_refusal: QueueRefusalMode | None = None,
        count_output_cap: bool = True,
    ) -> None:
        """
        The account: ``queue_limits`` maps a model to the tokens its batches may hold enqueued, and
        ``request_queue_limits`` to the requests (embeddings models); ``None`` for both (the default) does not model
        the account at all, an empty mapping tracks the queues (``peak_enqueued``) without limiting them.
        ``queue_refusal``: ``"at_validation"`` (OpenAI: the batch fails as its validation ends) or ``"at_create"``
        (Azure's fail-fast: ``batches.create`` answers 400); by default ``"at_create"`` with ``azure_quirks``.
        ``count_output_cap``: a request's output cap counts toward the queue (the stricter reading; ``tokens.py``).
        """
        self.clock = clock
        self.azure_quirks = azure_quirks
        self.compatible_quirks = compatible_quirks
        self.timings = timings or Timings()
        self._tmp = None if storage_dir else tempfile.TemporaryDirectory(prefix="fake-openai-")
        self.dir = Path(storage_dir or self._tmp.name)  # type: ignore[union-attr]
        #: ``BatchCreateParams.endpoint``: every endpoint the installed SDK lists (``None``: any, a compatible server).
        self.allowed_endpoints = allowed_endpoints
        self.completion_windows = completion_windows
        self.scenario = scenario
        #: Fates for the next batches created, in order (``FakeOpenAIServer.script_batches``); then ``scenario``.
        self.scripted_scenarios: list[str] = []
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, StoredBatch] = {}
        #: How often each transient ``fake_error`` (``"times": n``) has failed so far, by custom_id.
        self.failures: dict[str, int] = {}
        self.queue_limits = dict(queue_limits) if queue_limits is not None else None
        self.request_queue_limits = dict(request_queue_limits) if request_queue_limits is not None else None
        self.queue_refusal: QueueRefusalMode = queue_refusal or ("at_create" if azure_quirks else "at_validation")
        self.count_output_cap = count_output_cap
        #: Every batch a full queue turned away, in the order decided.
        self.queue_refusals: list[QueueRefusal] = []
        self._seq = count(1)
        self._pending: list[StoredBatch] = []
        self._admitted: defaultdict[str, list[StoredBatch]] = defaultdict(list)
        self._peak: defaultdict[tuple[str, QueueUnit], int] = defaultdict(int)
        self._lock = threading.RLock()
        #: Validates inputs and writes answers ahead, one task at a time in the order given; never takes ``_lock``.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-openai-worker")
        #: The worker gives way to requests being answered (the server marks each one).
        self.gate = RequestGate()

    @property
    def models_account(self) -> bool:
        """Whether the account's queues are modelled (a limit mapping was given, even an empty one)."""
        return self.queue_limits is not None or self.request_queue_limits is not None

    def close(self) -> None:
        """Stop the worker (answers not yet written ahead are dropped; validations still queued run, so every batch
        stays readable) and delete the files."""
        with self._lock:
            ahead = [batch.written for batch in self.batches.values() if batch.written is not None]
        for written in ahead:
            written.cancel()
        self._worker.shutdown(wait=True)
        if self._tmp is not None:
            self._tmp.cleanup()

    def _submit(self, work: Callable[..., Any], *args: Any) -> bool:
        """Hand ``work`` to the worker; ``False`` once the worker is shut down (a closed state, the interpreter
        exiting)."""
        try:
            self._worker.submit(work, *args)
        except RuntimeError:
            return False
        return True

    # --- files -------------------------------------------------------------------------------

    def add_file(
        self, filename: str, purpose: str, write: Callable[[Any], None], expires_after: int | None = None
    ) -> StoredFile:
        file_id = _id("file-")
        path = self.dir / file_id
        with path.open("wb") as out:
            write(out)
        now = int(self.clock())
        stored = StoredFile(
            id=file_id,
            filename=filename,
            purpose=purpose,
            bytes=path.stat().st_size,
            created_at=now,
            path=path,
            expires_at=now + expires_after if expires_after else None,
        )
        with self._lock:
            # Keep creation order stable even when two uploads land in the same second.
            stored.created_at = now
            self.files[file_id] = stored
        return stored

    def list_files(self, purpose: str | None) -> list[StoredFile]:
        with self._lock:
            items = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        return items

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            stored = self.files.pop(file_id, None)
        if stored is None:
            return False
        stored.path.unlink(missing_ok=True)
        return True

    # --- batches -----------------------------------------------------------------------------

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> StoredBatch:
        """
        Answers at once, as OpenAI does: the input is validated by the worker while the batch says ``validating``.
        Except with refusals at create (Azure's fail-fast), which need the batch's tokens to answer: then the input
        is validated here. Raises ``QueueLimitExceeded`` when the model's queue is full and refusals come at create.
        """
        stored = self.files[input_file_id]
        # Opened now: the worker reads what was uploaded even if the file is deleted while the batch validates.
        handle = stored.path.open("rb")
        try:
            return self._create_batch(handle, input_file_id, endpoint, completion_window, metadata)
        except BaseException:
            handle.close()  # not handed to the worker: that is the last thing a create does
            raise

    def _create_batch(
        self,
        handle: IO[bytes],
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> StoredBatch:
        listed_total, listed_model = _glance(handle)
        at_create = self.models_account and self.queue_refusal == "at_create"
        validation: Future[Validation] = Future()
        if at_create:
            self._validate(handle, endpoint, validation, None)
        with self._lock:
            now = self.clock()
            if at_create:
                # Judged against the queue as it stands now: the admissions due by now are decided first. Otherwise
                # nothing here depends on them (they are decided in the order of their moments whenever read), and
                # deciding them would wait for validations still running.
                self._settle_queue(now)
            if at_create and validation.result().model is not None:
                found = validation.result()
                refusal = self._judge(found.model or "", found.tokens, len(found.requests), now, None)
                if refusal is not None:
                    raise QueueLimitExceeded(refusal)
            scripted = self.scripted_scenarios.pop(0) if self.scripted_scenarios else None
            scenario = (metadata or {}).get("fake_scenario") or scripted or self.scenario
            batch = StoredBatch(
                id=_id("batch_"),
                input_file_id=input_file_id,
                endpoint=endpoint,
                completion_window=completion_window,
                metadata=metadata,
                created_at=now,
                scenario=scenario,
                validation=validation,
                listed_total=listed_total,
                listed_model=listed_model,
                seq=next(self._seq),
                gate=self.gate,
            )
            if at_create:
                if batch.model is not None:
                    # Admitted as it is created: it holds its tokens while validating, whatever validation finds.
                    self._admit(batch, now)
                elif not batch.issues:
                    self._write_ahead(batch)
            elif self.models_account and scenario != "fail":
                # Whether it enters the queue (it has a model and no issues) is known once validated.
                batch.queue = "pending"
                self._pending.append(batch)
            self.batches[batch.id] = batch
            if not at_create:
                # Not queued: answers are written ahead as soon as the validation finds nothing wrong.
                ahead = batch.queue == "none" and self._answers_due(batch)
                if ahead:
                    batch.written, batch.written_for = Future(), self._written_for(batch)
                if not self._submit(self._validate, handle, endpoint, validation, batch if ahead else None):
                    self._validate(handle, endpoint, validation, None)  # no worker: here, and nothing written ahead
                    batch.written = None
        return batch

    def cancel(self, batch_id: str) -> StoredBatch:
        with self._lock:
            batch = self.batches[batch_id]
            now = self.clock()
            self._advance(batch, now)
            if batch.final_status is None and batch.cancel_requested_at is None:
                if batch.queue == "pending":  # cancelled while validating: it never reaches the queue
                    self._pending.remove(batch)
                    batch.queue = "none"
                if batch.written is not None:  # it will not end as planned
                    batch.written.cancel()
                    batch.written = None
                batch.cancel_requested_at = now
                batch.cancelled_done = self._done_count(batch, batch.cancel_requested_at)
            return batch

    # --- the worker's tasks (never under ``_lock``) -------------------------------------------------

    def _validate(
        self, handle: IO[bytes], endpoint: str, into: Future[Validation], then_write: StoredBatch | None
    ) -> None:
        """Validate the input, then, for ``then_write`` when nothing is wrong, queue the writing of its answers."""
        try:
            with handle:
                report = check_input(self.gate.paced(handle), endpoint)
                tokens = 0
                if self.models_account:
                    bodies = (body for _, body in self.gate.paced(report.requests))
                    tokens = batch_tokens(endpoint, bodies, model=report.model, with_cap=self.count_output_cap)
        except BaseException as error:
            into.set_exception(error)
            if then_write is not None and then_write.written is not None:
                then_write.written.cancel()
            return
        found = Validation(report.requests, report.model, report.errors, tokens)
        into.set_result(found)
        written = then_write.written if then_write is not None else None
        if written is None or then_write is None or then_write.written_for is None:
            return
        if found.issues:
            written.cancel()
            return
        requests = self.gate.paced(found.requests)
        if not self._submit(self._write, written, then_write.endpoint, requests, *then_write.written_for):
            written.cancel()

    @staticmethod
    def _write(
        into: Future[list[Answer | None]], endpoint: str, requests: Iterable[Any], created: int, quirks: bool
    ) -> None:
        if not into.set_running_or_notify_cancel():
            return  # the batch ended or was cancelled first
        try:
            into.set_result(_answers(endpoint, requests, created, quirks))
        except BaseException as error:
            into.set_exception(error)

    def _answers_due(self, batch: StoredBatch) -> bool:
        """Whether a batch's answers are worth writing ahead: it ends by running its requests (not ``fail``, not
        ``stall``, which only a cancel ends)."""
        return batch.scenario not in ("fail", "stall") and batch.cancel_requested_at is None

    def _written_for(self, batch: StoredBatch) -> tuple[int, bool]:
        """The ``created`` stamp of its answers when it ends as planned (``_finish`` at its finalized moment)."""
        return int(self._phase_times(batch)[2]), self.compatible_quirks

    def _write_ahead(self, batch: StoredBatch) -> None:
        """Queue the writing of a validated batch's answers on the worker (under ``_lock``; it only submits)."""
        if batch.written is not None or not self._answers_due(batch):
            return
        written: Future[list[Answer | None]] = Future()
        batch.written, batch.written_for = written, self._written_for(batch)
        if not self._submit(self._write, written, batch.endpoint, self.gate.paced(batch.requests), *batch.written_for):
            batch.written = None

    def _written_answers(self, batch: StoredBatch, created: int) -> list[Answer | None] | None:
        """The answers written ahead, when they were written for this ending (else ``None``: compute them), and
        forget them: they are needed once."""
        written, batch.written = batch.written, None
        if written is None or batch.written_for != (created, self.compatible_quirks):
            if written is not None:
                written.cancel()
            return None
        if written.cancel():  # still queued behind other work: computing them here is quicker than waiting
            return None
        return self.gate.result(written)

    # --- the account: each model's enqueued-token queue ----------------------------------------

    def _ends_at(self, batch: StoredBatch) -> float:
        """The moment ``batch`` ends on the clock as things stand (a cancel moves it); ``inf``: not foreseeable."""
        if batch.final_status is not None and batch.finished_at is not None:
            return batch.finished_at
        if batch.cancel_requested_at is not None:
            return batch.cancel_requested_at + self.timings.cancelling
        validated, _, finalized = self._phase_times(batch)
        if batch.scenario == "fail" or batch.issues:
            return validated
        return math.inf if batch.scenario == "stall" else finalized

    def _held(self, model: str, at: float) -> tuple[int, int]:
        """Tokens and requests of ``model``'s queue at the moment ``at``: the admitted batches not yet ended then."""
        tokens = requests = 0
        for batch in self._admitted.get(model, ()):
            if batch.admitted_at is not None and batch.admitted_at <= at < self._ends_at(batch):
                tokens, requests = tokens + batch.tokens, requests + len(batch.requests)
        return tokens, requests

    def _judge(self, model: str, tokens: int, requests: int, at: float, batch_id: str | None) -> QueueRefusal | None:
        """Records and returns the refusal when a batch of ``tokens`` / ``requests`` does not fit ``model``'s queue at
        the moment ``at``; ``None`` when it fits (or the model has no limit)."""
        held_tokens, held_requests = self._held(model, at)
        checks: tuple[tuple[QueueUnit, int, int, dict[str, int] | None], ...] = (
            ("tokens", tokens, held_tokens, self.queue_limits),
            ("requests", requests, held_requests, self.request_queue_limits),
        )
        for unit, asked, held, limits in checks:
            limit = (limits or {}).get(model)
            if limit is not None and held + asked > limit:
                refusal = QueueRefusal(
                    model=model,
                    unit=unit,
                    asked=asked,
                    enqueued=held,
                    limit=limit,
                    at=at,
                    batch_id=batch_id,
                    message=self._refusal_message(model, unit, limit),
                )
                self.queue_refusals.append(refusal)
                return refusal
        return None

    def _refusal_message(self, model: str, unit: QueueUnit, limit: int) -> str:
        if self.azure_quirks:
            return (
                f"The number of enqueued {unit} has surpassed the configured limit of {_short(limit)} for the "
                f"deployment '{model}'. Please either increase the limit or try again once the current jobs have "
                "finished."
            )
        kind = "token" if unit == "tokens" else "request"
        return (
            f"Enqueued {kind} limit reached for {model} in organization {ORGANIZATION}. Limit: {limit:,} enqueued "
            f"{unit}. Please try again once some in_progress batches have been completed."
        )

    def _admit(self, batch: StoredBatch, at: float) -> None:
        model = batch.model or ""
        held_tokens, held_requests = self._held(model, at)
        batch.queue, batch.admitted_at = "admitted", at
        self._admitted[model].append(batch)
        self._peak[(model, "tokens")] = max(self._peak[(model, "tokens")], held_tokens + batch.tokens)
        self._peak[(model, "requests")] = max(self._peak[(model, "requests")], held_requests + len(batch.requests))
        if not batch.issues:
            self._write_ahead(batch)

    def _settle_queue(self, now: float) -> None:
        """
        Decide every batch whose validation ended by ``now``, in the order of those moments (then of creation), each
        against the queue as it stood at its own moment: reading batches in any order gives the same outcomes.
        """
        due = [batch for batch in self._pending if self._phase_times(batch)[0] <= now]
        if not due:
            return
        due.sort(key=lambda batch: (self._phase_times(batch)[0], batch.seq))
        for batch in due:
            self._pending.remove(batch)
            validated = self._phase_times(batch)[0]
            # Waits for the worker if it has not validated the batch yet: this is the moment its validation ends.
            if batch.issues or batch.model is None:  # it fails validation, or has no model's queue to enter
                batch.queue = "none"
                if not batch.issues:
                    self._write_ahead(batch)
                continue
            refusal = self._judge(batch.model or "", batch.tokens, len(batch.requests), validated, batch.id)
            if refusal is None:
                self._admit(batch, validated)
                continue
            # Failed at the end of validation, before any request ran: no usage, no files, nothing charged.
            batch.queue = "refused"
            batch.issues = [{"code": QUEUE_ERROR_CODE, "line": None, "message": refusal.message, "param": None}]
            batch.final_status, batch.finished_at = "failed", validated

    def enqueued(self, model: str) -> int:
        """Tokens ``model``'s queue holds now: its admitted batches not yet ended."""
        with self._lock:
            now = self.clock()
            self._settle_queue(now)
            return self._held(model, now)[0]

    def peak_enqueued(self, model: str) -> int:
        """The most tokens ``model``'s queue ever held at once (never above its limit when it has one)."""
        with self._lock:
            self._settle_queue(self.clock())
            return self._peak[(model, "tokens")]

    def peak_enqueued_requests(self, model: str) -> int:
        """The most requests ``model``'s queue ever held at once."""
        with self._lock:
            self._settle_queue(self.clock())
            return self._peak[(model, "requests")]

    def refusals(self, model: str | None = None) -> int:
        """How many batches a full queue refused (for ``model``, or for any), at validation or at create."""
        with self._lock:
            self._settle_queue(self.clock())
            return sum(1 for refusal in self.queue_refusals if model is None or refusal.model == model)

    def tokens_of(self, batch_id: str) -> int:
        """What the batch puts in its model's queue, as this fake counts it (``tokens.py``)."""
        with self._lock:
            return self.batches[batch_id].tokens

    # --- the status machine --------------------------------------------------------------------

    def _phase_times(self, batch: StoredBatch) -> tuple[float, float, float]:
        t = self.timings
        validated = batch.created_at + t.validating
        processed = validated + t.in_progress
        return validated, processed, processed + t.finalizing

    def _done_count(self, batch: StoredBatch, now: float) -> int:
        validated, _, _ = self._phase_times(batch)
        if now <= validated:
            return 0
        total = len(batch.requests)
        if batch.scenario == "stall":
            return min(total, max(0, total // 3))
        fraction = min(1.0, (now - validated) / max(self.timings.in_progress, 1e-9))
        if batch.scenario == "expire":
            fraction = min(fraction, self.timings.expire_fraction)
        return math.floor(total * fraction + 1e-6)

    def status(self, batch: StoredBatch) -> str:
        with self._lock:
            self._advance(batch)
            return self._status_now(batch)

    def _status_now(self, batch: StoredBatch, now: float | None = None) -> str:
        if batch.final_status is not None:
            return batch.final_status
        now = self.clock() if now is None else now
        validated, processed, _ = self._phase_times(batch)
        if batch.cancel_requested_at is not None:
            return "cancelling"
        if now < validated or batch.queue == "pending":
            return "validating"
        if now < processed or batch.scenario == "stall":
            return "in_progress"
        return "finalizing"

    def _advance(self, batch: StoredBatch, now: float | None = None) -> None:
        """Settle a batch whose terminal moment has passed (by ``now``, default the clock's): decide its status and
        write its result files. Once its validation has ended, the queue admissions due by then are decided first,
        all of them, in their order; before that nothing about it depends on them (so reading a batch that is still
        validating never waits for the worker to validate the others)."""
        now = self.clock() if now is None else now
        validated, _, finalized = self._phase_times(batch)
        if now >= validated:
            self._settle_queue(now)
        if batch.final_status is not None or batch.queue == "pending":
            return
        if batch.cancel_requested_at is not None:
            if now >= batch.cancel_requested_at + self.timings.cancelling:
                self._finish(batch, "cancelled", batch.cancelled_done or 0, batch.cancel_requested_at)
            return
        if now < validated:
            return  # nothing is decided before the validation ends (and its results are not read)
        if batch.issues:
            batch.final_status, batch.finished_at = "failed", validated
            batch.written = None  # cancelled by the worker as it found the issues
            return
        if batch.scenario == "fail":
            batch.issues = [
                {"code": "fake_failure", "line": None, "message": "The batch failed (scenario 'fail').", "param": None}
            ]
            batch.final_status, batch.finished_at = "failed", validated
            return
        if batch.scenario == "stall":
            return
        if now >= finalized:
            done = self._done_count(batch, finalized)
            self._finish(batch, "expired" if batch.scenario == "expire" else "completed", done, finalized)

    def _finish(self, batch: StoredBatch, status: str, done: int, at: float) -> None:
        """
        Write the result files and final counts. Requests that never ran (expired, cancelled) go to the error file
        as ``batch_expired`` / ``batch_cancelled`` and are *not* counted as failed: OpenAI reports an expired batch
        of 10 with one done as ``{total: 10, completed: 1, failed: 0}``, one output line and nine error lines.
        """
        created = int(at)
        out_lines: list[tuple[bytes, bytes]] = []
        err_lines: list[bytes] = []
        failed = in_tokens = out_tokens = 0
        quirks = self.compatible_quirks
        written = self._written_answers(batch, created)
        for index, (custom_id, body) in enumerate(batch.requests):
            if index >= done:
                reason = "batch_expired" if status == "expired" else "batch_cancelled"
                err_lines.append(json.dumps(responses.unprocessed_line(custom_id, reason, quirks)).encode())
            elif self._fails(custom_id, body):
                failed += 1
                err_lines.append(
                    json.dumps(responses.failed_request_line(custom_id, body["fake_error"], quirks)).encode()
                )
            else:
                answer = written[index] if written is not None else None
                if answer is None:  # not written ahead, or marked and not failing this time (a transient error)
                    answer = _answer(custom_id, batch.endpoint, body, created, quirks)
                digest, line, i, o = answer
                out_lines.append((digest, line))
                in_tokens, out_tokens = in_tokens + i, out_tokens + o
        # OpenAI does not keep input order in result files; neither do we, so joins are exercised for real.
        out_lines.sort()
        batch.output_file_id = self._write_result(batch, "output", [line for _, line in out_lines])
        batch.error_file_id = self._write_result(batch, "error", err_lines)
        batch.usage = {
            "input_tokens": in_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tokens + out_tokens,
        }
        batch.final_counts = {"total": len(batch.requests), "completed": len(out_lines), "failed": failed}
        batch.final_status, batch.finished_at = status, at

    def _fails(self, custom_id: str, body: Any) -> bool:
        """A request marked ``fake_error`` fails; with ``"times": n`` only its first n runs fail (transient)."""
        spec = body.get("fake_error") if isinstance(body, dict) else None
        if not spec:
            return False
        times = spec.get("times") if isinstance(spec, dict) else None
        if times is None:
            return True
        seen = self.failures.get(custom_id, 0)
        if seen >= int(times):
            return False
        self.failures[custom_id] = seen + 1
        return True

    def _write_result(self, batch: StoredBatch, kind: str, lines: list[bytes]) -> str | None:
        """No file when there is nothing to write (``output_file_id`` is null when every request failed), except on
        Azure and the compatible servers modelled here, which send a zero-byte error file when nothing failed."""
        if not lines and not ((self.azure_quirks or self.compatible_quirks) and kind == "error"):
            return None

        def write(out: Any) -> None:
            for line in lines:
                out.write(line + b"\n")

        return self.add_file(f"{batch.id}_{kind}.jsonl", "batch_output", write).id

    def _validation_ended(self, batch: StoredBatch, now: float) -> bool:
        """Whether what the validation found may be shown: its end on the clock has come, or the batch has ended."""
        return batch.final_status is not None or now >= self._phase_times(batch)[0]

    def counts(self, batch: StoredBatch, now: float | None = None) -> dict[str, int]:
        """
        ``request_counts``. Before the validation ends on the clock, the file's lines as the total (``_glance``):
        never the worker's findings, which would make the answer depend on how fast the worker is.
        """
        now = self.clock() if now is None else now
        if not self._validation_ended(batch, now):
            return {"total": batch.listed_total, "completed": 0, "failed": 0}
        total = len(batch.requests)
        status = self._status_now(batch, now)
        if status == "validating" or batch.issues:
            return {"total": 0 if batch.issues else total, "completed": 0, "failed": 0}
        if batch.final_counts is not None:
            return dict(batch.final_counts)
        cancelled = batch.cancel_requested_at is not None
        done = (batch.cancelled_done or 0) if cancelled else self._done_count(batch, now)
        # While running, a marked request counts as failed once done (its real fate is decided at the end).
        failed = sum(1 for _, body in batch.requests[:done] if isinstance(body, dict) and body.get("fake_error"))
        return {"total": total, "completed": done - failed, "failed": failed}

    def batch_json(self, batch: StoredBatch) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            self._advance(batch, now)
            status = self._status_now(batch, now)
            validated, processed, _ = self._phase_times(batch)
            created = int(batch.created_at)
            ended = int(batch.finished_at) if batch.finished_at is not None else None
            counts: dict[str, int] | None = self.counts(batch, now)
            known = self._validation_ended(batch, now)
            issues = batch.issues if known else None
            output_file_id, error_file_id = batch.output_file_id, batch.error_file_id
            if self.azure_quirks:
                output_file_id, error_file_id = output_file_id or "", error_file_id or ""
                if status == "validating":
                    counts = None
            return {
                "id": batch.id,
                "object": "batch",
                "endpoint": batch.endpoint,
                "model": batch.model if known else batch.listed_model,
                "errors": _errors_json(issues) if issues else None,
                "input_file_id": batch.input_file_id,
                "completion_window": batch.completion_window,
                "status": status,
                "output_file_id": output_file_id,
                "error_file_id": error_file_id,
                "created_at": created,
                "in_progress_at": int(validated) if status not in ("validating", "failed") else None,
                "expires_at": created + 86_400,
                "finalizing_at": int(processed) if status in ("finalizing", "completed", "expired") else None,
                "completed_at": ended if status == "completed" else None,
                "failed_at": ended if status == "failed" else None,
                "expired_at": ended if status == "expired" else None,
                "cancelling_at": int(batch.cancel_requested_at) if batch.cancel_requested_at else None,
                "cancelled_at": ended if status == "cancelled" else None,
                "request_counts": counts,
                "usage": batch.usage,
                "metadata": batch.metadata,
            }
