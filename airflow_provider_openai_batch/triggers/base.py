"""
What every trigger of this provider shares: the connection, the poll policy, serialization and the kill policy.

After amazon's ``AwsBaseWaiterTrigger``: a concrete trigger states only what it waits for (its own fields and
``run``); the connection, cadence, first-poll jitter, failure tolerance (``polling.PollPolicy``), ``serialize()``
and what happens when the user stops the deferred task (``polling.should_cancel_on_kill``) are decided here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, ClassVar

from airflow.triggers.base import BaseTrigger

from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.polling import (
    DEFAULT_MAX_POLL_FAILURES,
    PollPolicy,
    should_cancel_on_kill,
    task_instance_state,
)


class OpenAIBatchBaseTrigger(BaseTrigger):
    """
    :param conn_id: Airflow connection id.
    :param poll_interval: Seconds between polls while the batch is young.
    :param max_poll_interval: Upper bound of the relaxed cadence (``PollPolicy.delay``); ``None`` keeps it fixed.
    :param max_poll_failures: Transient failures in a row tolerated before an ``error`` event (``polling``).
    :param jitter_first_poll: Start at a random offset within the interval (``PollPolicy``).
    :param cancel_on_kill: Cancel what the trigger waits for when the user stops the deferred task (mark failed).
        Airflow 3.3+ calls ``on_kill`` also on clear and mark success; the kill policy (``polling``) cancels only
        when the task instance's state says the work is to stop. Airflow 3.0 to 3.2 never call ``on_kill``.
    """

    #: The constructor arguments of the concrete trigger, beyond the shared ones: what ``serialize()`` writes.
    fields: ClassVar[tuple[str, ...]] = ()
    _shared_fields: ClassVar[tuple[str, ...]] = (
        "conn_id",
        "poll_interval",
        "max_poll_interval",
        "max_poll_failures",
        "jitter_first_poll",
        "cancel_on_kill",
    )

    def __init__(
        self,
        *,
        conn_id: str,
        poll_interval: float,
        max_poll_interval: float | None = None,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        jitter_first_poll: bool = True,
        cancel_on_kill: bool = True,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = max_poll_interval
        self.max_poll_failures = int(max_poll_failures)
        self.jitter_first_poll = jitter_first_poll
        self.cancel_on_kill = cancel_on_kill

    def serialize(self) -> tuple[str, dict[str, Any]]:
        names = (*self.fields, *self._shared_fields)
        return f"{type(self).__module__}.{type(self).__qualname__}", {name: getattr(self, name) for name in names}

    @property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    @property
    def policy(self) -> PollPolicy:
        """Cadence, first-poll jitter and failure tolerance: the same ``PollPolicy`` as every other wait."""
        return PollPolicy(self.poll_interval, self.max_poll_interval, self.max_poll_failures, self.jitter_first_poll)

    # --- the kill policy --------------------------------------------------------------------------

    def batches_to_cancel(self) -> Iterable[str]:
        """The batches a user's stop would cancel: those still running."""
        return ()

    async def task_state(self) -> str | None:
        """The deferred task instance's state now (``polling.task_instance_state``), read off the event loop."""
        return await asyncio.to_thread(task_instance_state, self.task_instance)

    async def on_kill(self) -> None:
        """
        Airflow 3.3 calls this when the user clears, marks failed or marks successful the deferred task: cancel
        only when the user stopped the work (``polling.should_cancel_on_kill``), never for a clear whose re-run
        will wait for the same batches, nor for mark success.
        """
        if not self.cancel_on_kill:
            return
        batch_ids = list(self.batches_to_cancel())
        if not batch_ids:
            return
        cancel, reason = should_cancel_on_kill(self.cancel_on_kill, await self.task_state())
        if not cancel:
            self.log.info("Not cancelling %s: %s", ", ".join(batch_ids), reason)
            return
        hook = self.hook
        for batch_id in batch_ids:
            try:
                await hook.acancel_batch(batch_id)
                self.log.info("Cancelled batch %s because %s", batch_id, reason)
            except OpenAIBatchAPIError as error:
                self.log.warning("Could not cancel batch %s on kill: %s", batch_id, error)
