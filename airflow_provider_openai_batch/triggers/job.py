"""
OpenAIBatchJobTrigger: one trigger for the running batches of a one-task job; it wakes the task when there is work.

A job of 1,000,000 requests is 20 batches; a trigger per batch would be 20 rows in the trigger table, 20 poll loops
and 20 resumes. This one polls all of them on the shared async client and wakes the task once there is something to
do: a batch ended (its results to collect, its queue capacity to fill, its transient failures to resend) when
``wake_on_any_end``, else all of them ended; a moment the task asked to be woken at (a queue backoff passing, a
second look for a duplicate falling due); or a batch's deadline. Connection, cadence, failures, serialization and the
kill policy are the shared base's (``triggers.base``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Literal, TypedDict

from airflow.triggers.base import TriggerEvent
from typing_extensions import NotRequired

from airflow_provider_openai_batch.batch_status import BatchSummary, ended_clean, format_job_progress, is_terminal
from airflow_provider_openai_batch.exceptions import APIErrorPayload, OpenAIBatchAPIError, api_error_payload
from airflow_provider_openai_batch.polling import DEFAULT_MAX_POLL_FAILURES, PollFailures, aread_once, keep_client
from airflow_provider_openai_batch.scheduler import ProgressSnapshot, render_progress
from airflow_provider_openai_batch.triggers.base import OpenAIBatchBaseTrigger

#: Polls in flight at once: a job of 200 shards does not open 200 connections at the same moment.
MAX_CONCURRENT_POLLS = 8

JobEventStatus = Literal["ended", "wake", "timeout", "error"]
#: Batches ended (``batch_ids``): one or more when ``wake_on_any_end``, else all of them.
EVENT_ENDED: JobEventStatus = "ended"
#: ``wake_at`` passed with nothing ended: the task has waiting work to send or a second look to make.
EVENT_WAKE: JobEventStatus = "wake"
#: ``batch_ids`` passed their deadline without ending.
EVENT_TIMEOUT: JobEventStatus = "timeout"
#: Polling failed for good (``PollFailures`` gave up).
EVENT_ERROR: JobEventStatus = "error"


class JobEventPayload(TypedDict):
    """The payload of the job trigger's one event, which the job's ``execute_complete`` receives."""

    status: JobEventStatus
    batch_ids: list[str]
    message: str
    #: With ``EVENT_ERROR``: the poll's last failure, raised again as the same ``OpenAIBatchAPIError``.
    error: NotRequired[APIErrorPayload]


class OpenAIBatchJobTrigger(OpenAIBatchBaseTrigger):
    """
    Poll ``batch_ids`` until the task has something to do.

    :param batch_ids: The job's running batches.
    :param end_times: Each batch's deadline (epoch seconds); a ``timeout`` event names those past it.
    :param created_at: When the oldest batch was created; with ``max_poll_interval`` the cadence relaxes with age.
    :param wake_on_any_end: Wake when any batch ends (work waits for the capacity it frees); else when all have
        ended, or (``wake_on_unclean_end``) when one ends with requests to resend.
    :param wake_on_unclean_end: Wake when a batch ends with failed or unrun requests (resubmission rounds remain).
    :param wake_at: Also wake at this moment (epoch seconds), if nothing ended before.
    :param label: What the progress lines start with (e.g. the task id).
    :param progress: The job's progress when it deferred (``scheduler.ProgressSnapshot``): the trigger's lines then
        say what the task's say (pieces waiting for the queue, the budget, elapsed, an estimate), with the running
        batches' counts read live.

    Events (exactly one): a ``JobEventPayload``; the task reads the batches again when it resumes.
    """

    fields = (
        "batch_ids",
        "end_times",
        "created_at",
        "wake_on_any_end",
        "wake_on_unclean_end",
        "wake_at",
        "label",
        "progress",
    )

    def __init__(
        self,
        batch_ids: list[str],
        conn_id: str,
        poll_interval: float,
        end_times: dict[str, float],
        created_at: float | None = None,
        max_poll_interval: float | None = None,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        cancel_on_kill: bool = True,
        label: str = "",
        jitter_first_poll: bool = True,
        wake_on_any_end: bool = True,
        wake_at: float | None = None,
        wake_on_unclean_end: bool = False,
        progress: ProgressSnapshot | None = None,
    ) -> None:
        super().__init__(
            conn_id=conn_id,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            max_poll_failures=max_poll_failures,
            jitter_first_poll=jitter_first_poll,
            cancel_on_kill=cancel_on_kill,
        )
        self.batch_ids = list(batch_ids)
        self.end_times = {str(k): float(v) for k, v in end_times.items()}
        self.created_at = created_at
        self.wake_on_any_end = wake_on_any_end
        self.wake_on_unclean_end = wake_on_unclean_end
        self.wake_at = wake_at
        self.label = label
        self.progress = progress
        self._ended: set[str] = set()

    def batches_to_cancel(self) -> list[str]:
        return [b for b in self.batch_ids if b not in self._ended]

    def _event(
        self, status: JobEventStatus, batch_ids: list[str], message: str, error: OpenAIBatchAPIError | None = None
    ) -> TriggerEvent:
        payload = JobEventPayload(status=status, batch_ids=batch_ids, message=message)
        if error is not None:
            payload["error"] = api_error_payload(error)
        return TriggerEvent(dict(payload))

    def _progress_line(self, summaries: list[BatchSummary]) -> str:
        if self.progress is None:
            return format_job_progress(summaries, self.label)
        running_done = sum(s["request_counts"]["completed"] for s in summaries)
        line = render_progress(self.progress, time.time(), running_done)
        return f"{self.label}: {line}" if self.label else f"Job: {line}"

    def _until(self, now: float) -> float:
        """Seconds until the next deadline or wake-up."""
        moments = [t for b, t in self.end_times.items() if b not in self._ended]
        if self.wake_at is not None:
            moments.append(self.wake_at)
        return min(moments) - now if moments else float("inf")

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook
        limit = asyncio.Semaphore(MAX_CONCURRENT_POLLS)
        policy = self.policy
        await asyncio.sleep(policy.first_delay(self._until(time.time())))
        latest: dict[str, BatchSummary] = {}
        # Each batch's failed polls in a row, read as every other wait reads them (``polling.PollFailures``).
        failures = {batch_id: PollFailures(policy) for batch_id in self.batch_ids}
        last_seen: tuple[int, ...] = ()

        async def poll(batch_id: str) -> None:
            async with limit:
                # The poll step of every wait (``polling.aread_once``); a 401 drops the client in the hook itself.
                summary = await aread_once(
                    lambda: hook.aget_batch_summary(batch_id),
                    failures[batch_id],
                    f"batch {batch_id}",
                    keep_client,
                    self.log,
                )
            if summary is not None:
                latest[batch_id] = summary
                if is_terminal(summary["status"]):
                    self._ended.add(batch_id)

        while True:
            try:
                await asyncio.gather(*(poll(b) for b in self.batch_ids if b not in self._ended))
            except OpenAIBatchAPIError as error:
                yield self._event(EVENT_ERROR, [], f"Polling the job's batches failed: {error}", error)
                return
            if len(latest) == len(self.batch_ids):
                summaries = [latest[b] for b in self.batch_ids]
                seen = (len(self._ended), *(s["request_counts"]["completed"] for s in summaries))
                if seen != last_seen:  # a line at each change, not at each poll
                    last_seen = seen
                    self.log.info(self._progress_line(summaries))
            ended = [b for b in self.batch_ids if b in self._ended]
            unclean = self.wake_on_unclean_end and any(not ended_clean(latest[b]) for b in ended)
            if ended and (self.wake_on_any_end or unclean or len(ended) == len(self.batch_ids)):
                yield self._event(EVENT_ENDED, ended, f"{len(ended)} of {len(self.batch_ids)} batches ended")
                return
            now = time.time()
            late = [b for b, t in self.end_times.items() if b not in self._ended and t <= now]
            if late:
                yield self._event(EVENT_TIMEOUT, late, f"{len(late)} batch(es) did not end before their deadline")
                return
            if self.wake_at is not None and now >= self.wake_at:
                yield self._event(EVENT_WAKE, [], "Work is waiting to be sent")
                return
            age = now - self.created_at if self.created_at is not None else 0.0
            await asyncio.sleep(max(0.0, min(policy.delay(age), self._until(now))))
