"""
OpenAIBatchSensor: wait for a batch to end, then apply the outcome policy; returns the batch summary.

Deferrable by ``[operators] default_deferrable`` (the triggerer waits, the worker slot is free); ``poke`` and
``reschedule`` modes poll from the worker. A deferred sensor resumes into ``execute_complete``, never into
``poke``, so a batch is judged once, by ``batch_status``, whichever way it was waited for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.providers.common.compat.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_openai_batch.batch_status import BatchSummary, format_progress, is_terminal, summarize
from airflow_provider_openai_batch.operators.base import BatchWaitingOperator, batch_id_of
from airflow_provider_openai_batch.polling import DEFAULT_POLL_INTERVAL, PollFailures, read_once
from airflow_provider_openai_batch.triggers.openai_batch import BatchEventPayload


class OpenAIBatchSensor(BatchWaitingOperator, BaseSensorOperator):
    """
    Wait for a batch to end.

    :param batch_id: A batch id or a batch summary (e.g. the create task's XCom). Templated.
    :param poke_interval: Seconds between polls, in every mode (default 60).

    Outcome and deadline options are those of ``BatchWaitingOperator``: ``max_failed_requests``,
    ``max_failed_ratio``, ``accept_expired``, ``accept_cancelled``, ``deadline`` (from the batch's creation,
    default completion window + 1 h), ``cancel_on_timeout``, ``cancel_on_kill``, ``max_poll_failures``,
    ``deferrable``. In ``poke`` and ``reschedule`` modes Airflow's own ``timeout`` applies too. Failed polls and
    kills follow ``polling`` in every mode; a ``reschedule``-mode sensor has no process between pokes, so a
    mark failed then cannot cancel anything (only during a poke).
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id")

    def __init__(self, *, batch_id: Any, poke_interval: float = DEFAULT_POLL_INTERVAL, **kwargs: Any) -> None:
        kwargs.setdefault("poll_interval", poke_interval)
        super().__init__(poke_interval=poke_interval, **kwargs)
        self.batch_id = batch_id

    def execute(self, context: Mapping[str, Any]) -> Any:
        batch_id = batch_id_of(self.batch_id)
        self.push_batch_id(context, batch_id)
        if self.deferrable:
            return self.wait_for(context, batch_id)
        return BaseSensorOperator.execute(self, context)  # type: ignore[arg-type]

    def poke(self, context: Mapping[str, Any]) -> PokeReturnValue | bool:
        batch_id = batch_id_of(self.batch_id)
        # on_kill (the kill policy) knows what a poke in progress waits for, as with a blocking wait.
        self._waiting_on, self._waiting_ti = batch_id, context.get("ti")
        if self._poll_failures is None:
            self._poll_failures = PollFailures(self.poll_policy)
        # The same poll step as the trigger's and the blocking wait's (counted within one worker process: a
        # reschedule-mode sensor starts each poke afresh, and its deadline still bounds the wait).
        hook = self.hook
        batch = read_once(
            lambda: hook.get_batch(batch_id), self._poll_failures, f"batch {batch_id}", hook.reset_client, self.log
        )
        if batch is None:
            return False
        summary = summarize(batch)
        self.log.info(format_progress(summary))
        if is_terminal(batch.status):
            return PokeReturnValue(is_done=True, xcom_value=self.finish(summary))
        if time.time() >= self.end_time(batch.created_at, batch.completion_window):
            self.on_deadline(batch_id, summary)
        return False

    def execute_complete(self, context: Mapping[str, Any], event: BatchEventPayload | None = None) -> BatchSummary:
        return super().execute_complete(context, event)
