"""
OpenAIBatchTrigger: waits for a batch in the triggerer, on the shared async client, and yields one event.

A triggerer runs every deferred task of a deployment in one event loop, so nothing here blocks: no sync SDK
call, no thread per poll. The deadline is wall-clock epoch seconds because the trigger is serialized and may
resume in another triggerer process, where a monotonic clock means nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, Literal, TypedDict

from airflow.triggers.base import TriggerEvent
from typing_extensions import NotRequired

from airflow_provider_openai_batch.batch_status import (
    BatchSummary,
    can_survive_a_race,
    format_progress,
    is_terminal,
    progress_key,
)
from airflow_provider_openai_batch.batches import SiblingLook, afollow_survivor
from airflow_provider_openai_batch.exceptions import APIErrorPayload, OpenAIBatchAPIError, api_error_payload
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import IDEMPOTENCY_METADATA_KEY
from airflow_provider_openai_batch.polling import DEFAULT_MAX_POLL_FAILURES, PollFailures, aread_once, keep_client
from airflow_provider_openai_batch.triggers.base import OpenAIBatchBaseTrigger

__all__ = [
    "DEFAULT_MAX_POLL_FAILURES",
    "EVENT_ERROR",
    "EVENT_TERMINAL",
    "EVENT_TIMEOUT",
    "BatchEventPayload",
    "EventStatus",
    "OpenAIBatchTrigger",
]

EventStatus = Literal["terminal", "timeout", "error"]
#: The batch ended (any terminal status, success or not: the operator's outcome policy judges it).
EVENT_TERMINAL: EventStatus = "terminal"
#: The deadline passed first; ``summary`` is the last one read, or ``None`` when no poll succeeded.
EVENT_TIMEOUT: EventStatus = "timeout"
#: Polling failed for good (a 403/404, a 401 after a fresh read, or too many transient failures in a row).
EVENT_ERROR: EventStatus = "error"


class BatchEventPayload(TypedDict):
    """The payload of the trigger's one event, which ``execute_complete`` receives as ``event``."""

    status: EventStatus
    batch_id: str
    summary: BatchSummary | None
    message: str
    #: ``True`` when the second look for a duplicate switched the wait to an older try's batch (``batch_id``).
    followed: NotRequired[bool]
    #: With ``EVENT_ERROR``: the poll's last failure, raised again as the same ``OpenAIBatchAPIError`` when it resumes.
    error: NotRequired[APIErrorPayload]


class BatchTriggerEvent(TriggerEvent):
    """
    The trigger's one event, with a one-line ``repr``.

    Airflow's triggerer logs every event it fires (``Trigger fired event … result=<repr>``) into the task's log;
    the payload carries the whole batch summary for ``execute_complete``, which as a repr is one very long line.
    Only the repr is shortened: the payload Airflow stores and hands back is unchanged.
    """

    def __init__(self, payload: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(payload, **kwargs)

    def __repr__(self) -> str:
        payload = self.payload if isinstance(self.payload, dict) else {}
        return f"TriggerEvent<{payload.get('status')}: {payload.get('message')}>"

    __str__ = __repr__


class OpenAIBatchTrigger(OpenAIBatchBaseTrigger):
    """
    Poll a batch until it ends or ``end_time`` passes (connection, cadence, failures and kill policy: the base).

    :param batch_id: The batch to wait for.
    :param end_time: Absolute deadline (``time.time()`` epoch seconds); a ``timeout`` event after it.
    :param created_at: When the batch was created (epoch seconds); with ``max_poll_interval`` it lets the
        cadence relax as the batch ages (``PollPolicy.delay``).
    :param sibling_look: ``batches.SiblingLook.to_json()``: once the batch is old enough, list once more for a
        duplicate made by another try; when an older one wins, cancel this batch and wait for that one instead.

    Events (exactly one): a ``BatchEventPayload`` whose status is ``EVENT_TERMINAL``, ``EVENT_TIMEOUT`` or
    ``EVENT_ERROR``.
    """

    fields = ("batch_id", "end_time", "created_at", "sibling_look")

    def __init__(
        self,
        batch_id: str,
        conn_id: str,
        poll_interval: float,
        end_time: float,
        cancel_on_kill: bool = True,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        jitter_first_poll: bool = True,
        created_at: float | None = None,
        max_poll_interval: float | None = None,
        sibling_look: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            conn_id=conn_id,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            max_poll_failures=max_poll_failures,
            jitter_first_poll=jitter_first_poll,
            cancel_on_kill=cancel_on_kill,
        )
        self.batch_id = batch_id
        self.end_time = float(end_time)
        self.created_at = created_at
        self.sibling_look = sibling_look
        self._followed = False

    def batches_to_cancel(self) -> list[str]:
        return [self.batch_id]

    def _event(
        self,
        status: EventStatus,
        message: str,
        summary: BatchSummary | None = None,
        error: OpenAIBatchAPIError | None = None,
    ) -> TriggerEvent:
        payload = BatchEventPayload(status=status, batch_id=self.batch_id, summary=summary, message=message)
        if self._followed:
            payload["followed"] = True
        if error is not None:
            payload["error"] = api_error_payload(error)
        return BatchTriggerEvent(dict(payload))

    async def _look_again(self, hook: OpenAIBatchHook, summary: BatchSummary, *, now: bool = False) -> None:
        """
        The second look for a duplicate (``batches.SiblingLook``), once, when due (``now``: at once); a lost race
        switches the wait.
        """
        look = SiblingLook.from_json(self.sibling_look)
        created_at = self.created_at
        if look is None or created_at is None or not (now or look.due(created_at, time.time())):
            return
        self.sibling_look = None
        own = SimpleNamespace(
            id=self.batch_id,
            created_at=int(created_at),
            status=summary["status"],
            metadata={IDEMPOTENCY_METADATA_KEY: look.key},
        )
        survivor = await afollow_survivor(hook, own, look, self.log)
        if survivor.id != self.batch_id:
            self.batch_id, self.created_at, self._followed = str(survivor.id), float(survivor.created_at), True

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook
        policy = self.policy
        await asyncio.sleep(policy.first_delay(self.end_time - time.time()))
        failures = PollFailures(policy)
        last_progress: tuple[Any, ...] | None = None
        while True:
            summary: BatchSummary | None = None
            try:
                # A 401 drops the client in the hook itself (``_acall``): nothing to reset here.
                summary = await aread_once(
                    lambda: hook.aget_batch_summary(self.batch_id),
                    failures,
                    f"batch {self.batch_id}",
                    keep_client,
                    self.log,
                )
            except OpenAIBatchAPIError as error:
                yield self._event(EVENT_ERROR, f"Polling batch {self.batch_id} failed: {error}", error=error)
                return
            if summary is not None:
                if progress_key(summary) != last_progress:
                    last_progress = progress_key(summary)
                    self.log.info(format_progress(summary))
                ended = is_terminal(summary["status"])
                if ended and not can_survive_a_race(summary["status"]) and self.sibling_look is not None:
                    # Airflow rebuilds a trigger from the arguments it deferred with: after a triggerer restart
                    # this trigger may be one whose look already cancelled its own batch and followed an older
                    # try's. A dead batch is not taken for the outcome before the look is made.
                    followed = self.batch_id
                    await self._look_again(hook, summary, now=True)
                    if followed != self.batch_id:
                        continue  # poll the survivor at once
                if is_terminal(summary["status"]):
                    yield self._event(EVENT_TERMINAL, f"Batch {self.batch_id} ended: {summary['status']}", summary)
                    return
                if self.sibling_look is not None:
                    followed = self.batch_id
                    await self._look_again(hook, summary)
                    if followed != self.batch_id:
                        continue  # poll the survivor at once
            now = time.time()
            remaining = self.end_time - now
            if remaining <= 0:
                yield self._event(EVENT_TIMEOUT, f"Batch {self.batch_id} did not end before the deadline", summary)
                return
            # Nothing of an answer is kept while sleeping: 1,000 waits holding parsed batches would pile up
            # long-lived objects until Python runs a full garbage collection, a pause every trigger feels.
            del summary
            age = now - self.created_at if self.created_at is not None else 0.0
            await asyncio.sleep(min(policy.delay(age), remaining))
