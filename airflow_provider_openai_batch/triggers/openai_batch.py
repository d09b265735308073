"""
OpenAIBatchTrigger: waits for a batch in the triggerer, on the shared async client, and yields one event.

A triggerer runs every deferred task of a deployment in one event loop, so nothing here blocks: no sync SDK
call, no thread per poll. The deadline is wall-clock epoch seconds because the trigger is serialized and may
resume in another triggerer process, where a monotonic clock means nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_openai_batch.batch_status import format_progress, is_terminal, poll_delay, progress_key
from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

#: Consecutive failed polls (after the SDK's own retries) before the wait gives up with an error event.
DEFAULT_MAX_POLL_FAILURES = 10


class OpenAIBatchTrigger(BaseTrigger):
    """
    Poll a batch until it ends or ``end_time`` passes.

    :param batch_id: The batch to wait for.
    :param conn_id: Airflow connection id.
    :param poll_interval: Seconds between polls.
    :param end_time: Absolute deadline (``time.time()`` epoch seconds); a ``timeout`` event after it.
    :param cancel_on_kill: Cancel the batch when a user kills the deferred task (Airflow 3.3+ calls
        ``on_kill``; older versions never do).
    :param max_poll_failures: Transient failures in a row (429, 5xx, connection, timeouts) tolerated before an
        ``error`` event; 401/403/404 end the wait at once.
    :param jitter_first_poll: Start at a random offset within the interval, so a triggerer restart that
        loads 1,000 waits at once does not make them poll in lockstep.
    :param created_at: When the batch was created (epoch seconds); with ``max_poll_interval`` it lets the
        cadence relax as the batch ages (see ``poll_delay``).
    :param max_poll_interval: Upper bound of the relaxed cadence; ``None`` polls every ``poll_interval``.

    Events (exactly one): ``{"status": "terminal" | "timeout" | "error", "batch_id", "summary", "message"}``.
    """

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
    ) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time)
        self.cancel_on_kill = cancel_on_kill
        self.max_poll_failures = int(max_poll_failures)
        self.jitter_first_poll = jitter_first_poll
        self.created_at = created_at
        self.max_poll_interval = max_poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_id": self.batch_id,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
                "cancel_on_kill": self.cancel_on_kill,
                "max_poll_failures": self.max_poll_failures,
                "jitter_first_poll": self.jitter_first_poll,
                "created_at": self.created_at,
                "max_poll_interval": self.max_poll_interval,
            },
        )

    @property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    def _event(self, status: str, message: str, summary: dict[str, Any] | None = None) -> TriggerEvent:
        return TriggerEvent({"status": status, "batch_id": self.batch_id, "summary": summary, "message": message})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook
        if self.jitter_first_poll:
            await asyncio.sleep(random.uniform(0, min(self.poll_interval, max(0.0, self.end_time - time.time()))))
        failures = 0
        last_progress: tuple[Any, ...] | None = None
        while True:
            summary: dict[str, Any] | None = None
            try:
                summary = await hook.aget_batch_summary(self.batch_id)
            except OpenAIBatchAPIError as error:
                failures += 1
                if not error.retryable or failures > self.max_poll_failures:
                    yield self._event("error", f"Polling batch {self.batch_id} failed: {error}")
                    return
                self.log.warning("Polling batch %s failed (%s); attempt %d", self.batch_id, error, failures)
            else:
                failures = 0
                if progress_key(summary) != last_progress:
                    last_progress = progress_key(summary)
                    self.log.info(format_progress(summary))
                if is_terminal(summary["status"]):
                    yield self._event("terminal", f"Batch {self.batch_id} ended: {summary['status']}", summary)
                    return
            now = time.time()
            remaining = self.end_time - now
            if remaining <= 0:
                yield self._event("timeout", f"Batch {self.batch_id} did not end before the deadline", summary)
                return
            # Nothing of an answer is kept while sleeping: 1,000 waits holding parsed batches would pile up
            # long-lived objects until Python runs a full garbage collection, a pause every trigger feels.
            del summary
            age = now - self.created_at if self.created_at is not None else 0.0
            await asyncio.sleep(min(poll_delay(self.poll_interval, self.max_poll_interval, age), remaining))

    async def on_kill(self) -> None:
        """A user killed the waiting task: stop paying for a batch nobody will collect (if configured)."""
        if not self.cancel_on_kill:
            return
        try:
            await self.hook.acancel_batch(self.batch_id)
            self.log.info("Cancelled batch %s because its task was killed", self.batch_id)
        except OpenAIBatchAPIError as error:
            self.log.warning("Could not cancel batch %s on kill: %s", self.batch_id, error)
