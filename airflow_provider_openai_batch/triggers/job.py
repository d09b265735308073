"""
OpenAIBatchJobTrigger: one trigger for every batch of a one-task job, yielding one event when all have ended.

A job over 1,000,000 requests is 20 batches; one trigger per batch would be 20 rows in the trigger table, 20 poll
loops and 20 resumes of the task. This trigger polls all of a round's batches on the shared async client and wakes
the task once, when the last one ends: the join needs every shard of the round, and which requests to send again
is only known once the whole round has ended, so an earlier resume would only download and defer again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, TypedDict

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_openai_batch.batch_status import (
    BatchSummary,
    format_job_progress,
    is_terminal,
)
from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.polling import PollFailures, PollPolicy
from airflow_provider_openai_batch.triggers.openai_batch import DEFAULT_MAX_POLL_FAILURES

#: Polls in flight at once: a job of 200 shards does not open 200 connections at the same moment.
MAX_CONCURRENT_POLLS = 8

JobEventStatus = Literal["ended", "timeout", "error"]
#: Every batch of the round ended (success or not: the job reads them again and judges).
EVENT_ENDED: JobEventStatus = "ended"
#: The deadline passed with some batches still running.
EVENT_TIMEOUT: JobEventStatus = "timeout"
#: Polling failed for good (``PollFailures`` gave up).
EVENT_ERROR: JobEventStatus = "error"


class JobEventPayload(TypedDict):
    """The payload of the job trigger's one event, which the job's ``execute_complete`` receives."""

    status: JobEventStatus
    batch_ids: list[str]
    message: str


class OpenAIBatchJobTrigger(BaseTrigger):
    """
    Poll every batch in ``batch_ids`` until all have ended or ``end_time`` passes.

    :param batch_ids: The batches to wait for (one job round).
    :param conn_id: Airflow connection id.
    :param poll_interval: Seconds between polls while the batches are young.
    :param end_time: Absolute deadline (epoch seconds); a ``timeout`` event after it.
    :param created_at: When the oldest batch was created; with ``max_poll_interval`` the cadence relaxes with age.
    :param max_poll_interval: Upper bound of the relaxed cadence; ``None`` polls every ``poll_interval``.
    :param max_poll_failures: Failed polls in a row tolerated (per batch) before an ``error`` event.
    :param cancel_on_kill: Cancel the batches that have not ended when a user kills the deferred task.
    :param label: What the progress lines start with (e.g. ``job nightly round 1``).

    Events (exactly one): a ``JobEventPayload`` (``EVENT_ENDED``, ``EVENT_TIMEOUT`` or ``EVENT_ERROR``); the task
    reads the batches again when it resumes, so the event carries no summaries.
    """

    def __init__(
        self,
        batch_ids: list[str],
        conn_id: str,
        poll_interval: float,
        end_time: float,
        created_at: float | None = None,
        max_poll_interval: float | None = None,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        cancel_on_kill: bool = True,
        label: str = "",
        jitter_first_poll: bool = True,
    ) -> None:
        super().__init__()
        self.batch_ids = list(batch_ids)
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time)
        self.created_at = created_at
        self.max_poll_interval = max_poll_interval
        self.max_poll_failures = int(max_poll_failures)
        self.cancel_on_kill = cancel_on_kill
        self.label = label
        self.jitter_first_poll = jitter_first_poll
        self._ended: set[str] = set()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_ids": self.batch_ids,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
                "created_at": self.created_at,
                "max_poll_interval": self.max_poll_interval,
                "max_poll_failures": self.max_poll_failures,
                "cancel_on_kill": self.cancel_on_kill,
                "label": self.label,
                "jitter_first_poll": self.jitter_first_poll,
            },
        )

    @property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    @property
    def policy(self) -> PollPolicy:
        """Cadence, first-poll jitter and failure tolerance: the same ``PollPolicy`` as every other wait."""
        return PollPolicy(self.poll_interval, self.max_poll_interval, self.max_poll_failures, self.jitter_first_poll)

    def _event(self, status: JobEventStatus, message: str) -> TriggerEvent:
        return TriggerEvent(dict(JobEventPayload(status=status, batch_ids=self.batch_ids, message=message)))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook
        limit = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        policy = self.policy
        await asyncio.sleep(policy.first_delay(self.end_time - time.time()))
        latest: dict[str, BatchSummary] = {}
        # Each batch's failed polls in a row, read as every other wait reads them (``polling.PollFailures``).
        failures = {batch_id: PollFailures(policy) for batch_id in self.batch_ids}
        last_line = ""

        async def poll(batch_id: str) -> None:
            async with limit:
                while True:
                    try:
                        latest[batch_id] = await hook.aget_batch_summary(batch_id)
                    except OpenAIBatchAPIError as error:
                        step = failures[batch_id].failed(error)
                        if step == "give_up":
                            raise
                        if step == "retry_now":
                            # The hook dropped the client that holds the refused key: this poll reads it again.
                            self.log.warning(
                                "Polling batch %s was refused (%s); re-reading the connection", batch_id, error
                            )
                            continue
                        self.log.warning(
                            "Polling batch %s failed (%s); attempt %d", batch_id, error, failures[batch_id].count
                        )
                        return
                    failures[batch_id].succeeded()
                    if is_terminal(latest[batch_id]["status"]):
                        self._ended.add(batch_id)
                    return

        while True:
            try:
                await asyncio.gather(*(poll(b) for b in self.batch_ids if b not in self._ended))
            except OpenAIBatchAPIError as error:
                yield self._event(EVENT_ERROR, f"Polling the job's batches failed: {error}")
                return
            if len(latest) == len(self.batch_ids):
                line = format_job_progress([latest[b] for b in self.batch_ids], self.label)
                if line != last_line:
                    last_line = line
                    self.log.info(line)
            if len(self._ended) == len(self.batch_ids):
                yield self._event(EVENT_ENDED, f"All {len(self.batch_ids)} batches ended")
                return
            now = time.time()
            remaining = self.end_time - now
            if remaining <= 0:
                left = len(self.batch_ids) - len(self._ended)
                yield self._event(EVENT_TIMEOUT, f"{left} batches did not end before the deadline")
                return
            age = now - self.created_at if self.created_at is not None else 0.0
            await asyncio.sleep(min(policy.delay(age), remaining))

    async def on_kill(self) -> None:
        """A user killed the deferred job: stop paying for batches nobody will collect (if configured)."""
        if not self.cancel_on_kill:
            return
        for batch_id in self.batch_ids:
            if batch_id in self._ended:
                continue
            try:
                await self.hook.acancel_batch(batch_id)
                self.log.info("Cancelled batch %s because its task was killed", batch_id)
            except OpenAIBatchAPIError as error:
                self.log.warning("Could not cancel batch %s on kill: %s", batch_id, error)
