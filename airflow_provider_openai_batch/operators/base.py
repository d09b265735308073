"""
What every operator here shares: the connection and hook, and waiting for a batch to end.

Create (``wait_for_completion``), the sensor and cancel all wait the same way, through one trigger and one
status policy, so a batch that ends means the same thing whichever task saw it end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.providers.common.compat.sdk import BaseOperator, conf
from openai.types import Batch

from airflow_provider_openai_batch import metrics
from airflow_provider_openai_batch.batch_status import (
    BatchSummary,
    OutcomePolicy,
    evaluate,
    format_progress,
    is_terminal,
    queue_refusal,
    summarize,
)
from airflow_provider_openai_batch.batches import SiblingLook, follow_survivor
from airflow_provider_openai_batch.exceptions import (
    BatchFailedError,
    BatchQueueFullError,
    BatchTimeoutError,
    OpenAIBatchAPIError,
    api_error_from_payload,
)
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.links.openai_batch import BATCH_ID_XCOM_KEY, OpenAIBatchLink
from airflow_provider_openai_batch.polling import (
    DEFAULT_MAX_POLL_FAILURES,
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    PollFailures,
    PollPolicy,
    defer_timeout,
    should_cancel_on_kill,
    task_instance_state,
)
from airflow_provider_openai_batch.triggers.openai_batch import (
    EVENT_TERMINAL,
    EVENT_TIMEOUT,
    BatchEventPayload,
    OpenAIBatchTrigger,
)

#: Added to the completion window for the default deadline: OpenAI may take a little past it to finalize.
DEADLINE_MARGIN = timedelta(hours=1)


def default_deferrable() -> bool:
    return conf.getboolean("operators", "default_deferrable", fallback=False)


def window_seconds(completion_window: str) -> float:
    """``"24h"`` → 86400; unknown formats (a compatible server's own) fall back to 24 h."""
    text = str(completion_window).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        return 86400.0


def deadline_end_time(created_at: float, completion_window: str, deadline: float | None) -> float:
    """
    When waiting gives up (epoch seconds): ``deadline`` seconds after the batch was created, or by default its
    completion window plus ``DEADLINE_MARGIN``. Counted from creation, so retries and triggerer restarts do not
    extend it. The waiting operators and the one-task job (from its oldest batch) share it.
    """
    span = deadline if deadline is not None else window_seconds(completion_window) + DEADLINE_MARGIN.total_seconds()
    return float(created_at) + span


def _seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class OpenAIBatchBaseOperator(BaseOperator):
    """Holds the connection and builds the hook; the one place an operator gets its SDK access from."""

    def __init__(self, *, conn_id: str = OpenAIBatchHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """
        Request dicts given as ``source`` are data, never templates: Airflow's rendering would recurse into them and
        run every prompt through Jinja (a ``{{ ds }}`` in a prompt replaced, a ``{% if`` failing the task, each
        prompt logged at error level). They are set aside while the other fields render and put back untouched; a
        path, URI, ``ObjectStoragePath`` or XCom reference renders as usual.
        """
        source = getattr(self, "source", None)
        literal = is_request_data(source)
        if literal:
            setattr(self, "source", None)  # noqa: B010 (the operators with a source declare its type)
        try:
            super().render_template_fields(context, jinja_env)
        finally:
            if literal:
                setattr(self, "source", source)  # noqa: B010

    #: What the task read and wrote, as (kind, identifier) pairs: ("storage", uri) or ("file"/"batch", OpenAI id).
    _lineage: tuple[list[tuple[str, str]], list[tuple[str, str]]] | None = None

    def record_lineage(self, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]) -> None:
        self._lineage = (inputs, outputs)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage (when its provider is installed): input files → output files, OpenAI's included."""
        from airflow_provider_openai_batch import lineage

        if self._lineage is None or not lineage.available():
            return None
        base_url = str(self.hook.get_conn().base_url)

        def datasets(items: list[tuple[str, str]]) -> list[Any]:
            return [
                lineage.storage_dataset(ident) if kind == "storage" else lineage.openai_dataset(base_url, kind, ident)
                for kind, ident in items
            ]

        inputs, outputs = self._lineage
        return lineage.operator_lineage(datasets(inputs), datasets(outputs))

    def init_waiting(
        self,
        poll_interval: float,
        max_poll_interval: float | None,
        deadline: timedelta | float | None,
        deferrable: bool | None,
        cancel_on_timeout: bool,
        cancel_on_kill: bool,
        max_poll_failures: int,
    ) -> None:
        """The waiting options, as the waiting operators and the one-task job take them (``BatchWaitingOperator``)."""
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = max_poll_interval
        self.deadline = _seconds(deadline)
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.cancel_on_timeout = cancel_on_timeout
        self.cancel_on_kill = cancel_on_kill
        self.max_poll_failures = max_poll_failures

    def cancel_for_kill(self, batch_ids: list[str], ti: Any) -> None:
        """
        The worker-side kill policy (blocking waits, poke-mode sensors, a blocking job), the same as the triggers':
        cancel only when the task instance's state, read back now, says the user stopped the work.
        """
        if not batch_ids or not getattr(self, "cancel_on_kill", False):
            return
        cancel, reason = should_cancel_on_kill(self.cancel_on_kill, task_instance_state(ti))
        if not cancel:
            self.log.info("Not cancelling %s: %s", ", ".join(batch_ids), reason)
            return
        for batch_id in batch_ids:
            try:
                self.hook.cancel_batch(batch_id)
                self.log.info("Cancelled batch %s because %s", batch_id, reason)
            except OpenAIBatchAPIError as error:
                self.log.warning("Could not cancel batch %s on kill: %s", batch_id, error)

    def report_estimate(self, context: Mapping[str, Any], estimated: Mapping[str, Any], endpoint: str) -> None:
        """An estimate (``estimate.Estimate``) as the task log's table and, when priced, the estimated-cost metric."""
        from airflow_provider_openai_batch.estimate import render_estimate

        self.log.info("Estimate:\n%s", render_estimate(estimated))  # type: ignore[arg-type]
        if estimated["cost"] is not None:
            cost_range = estimated["cost"]
            tags = metrics.tags_from_context(context, model=estimated["model"], endpoint=endpoint)
            metrics.estimated_cost(cost_range["low"], cost_range["high"], cost_range["currency"], tags)

    def push_batch_id(self, context: Mapping[str, Any], batch_id: str) -> None:
        """
        First thing once a batch id is known: the id, and what the extra link needs to name the batch's page
        for this connection (OpenAI's dashboard, or none), so the link works while the task is deferred.
        """
        context["ti"].xcom_push(key=BATCH_ID_XCOM_KEY, value=batch_id)
        try:
            hook = self.hook
            OpenAIBatchLink.persist(
                context,
                self,
                batch_id=batch_id,
                base_url=hook.base_url,
                azure=hook.is_azure,
                batch_link=hook.batch_link,
            )
        except Exception as error:  # a link is a convenience: it never fails the task (as BaseAwsLink.persist)
            self.log.warning("Could not record the extra link for batch %s: %s", batch_id, error)


class BatchWaitingOperator(OpenAIBatchBaseOperator):
    """
    Waits for a batch and applies the outcome policy; deferrable or blocking.

    :param poll_interval: Seconds between status polls while the batch is young.
    :param max_poll_interval: As the batch ages, polls relax to a tenth of its age, up to this (default 600 s);
        ``None`` keeps every poll ``poll_interval`` apart.
    :param deadline: How long to wait, counted from the batch's creation (so retries and triggerer restarts
        do not extend it). Default: the completion window plus one hour.
    :param deferrable: Wait in the triggerer, freeing the worker slot. Default ``[operators] default_deferrable``.
    :param cancel_on_timeout: Cancel the batch when the deadline passes, keeping its partial output.
    :param cancel_on_kill: Cancel the batch when the user stops the waiting task (mark failed), in every way
        of waiting; a clear or mark success leaves it running (the kill policy in ``polling``).
    :param max_poll_failures: Failed polls in a row tolerated before the wait fails, in every way of waiting
        (``polling.PollPolicy``).
    :param max_failed_requests: Fail a completed batch with more failed requests than this.
    :param max_failed_ratio: Fail a completed batch with a higher share of failed requests (0..1).
        With neither set, a completed batch fails the task only when every request failed.
    :param accept_expired: Succeed (with a warning) when the batch expired; its partial results are kept.
    :param accept_cancelled: Succeed (with a warning) when the batch was cancelled.
    """

    operator_extra_links = (OpenAIBatchLink(),)

    def __init__(
        self,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | None = DEFAULT_MAX_POLL_INTERVAL,
        deadline: timedelta | float | None = None,
        deferrable: bool | None = None,
        cancel_on_timeout: bool = True,
        cancel_on_kill: bool = True,
        max_failed_requests: int | None = None,
        max_failed_ratio: float | None = None,
        accept_expired: bool = False,
        accept_cancelled: bool = False,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.init_waiting(
            poll_interval, max_poll_interval, deadline, deferrable, cancel_on_timeout, cancel_on_kill, max_poll_failures
        )
        self.policy = OutcomePolicy(
            max_failed_requests=max_failed_requests,
            max_failed_ratio=max_failed_ratio,
            accept_expired=accept_expired,
            accept_cancelled=accept_cancelled,
        )
        self._waiting_on: str | None = None
        self._waiting_ti: Any = None
        self._poll_failures: PollFailures | None = None

    @property
    def poll_policy(self) -> PollPolicy:
        return PollPolicy(self.poll_interval, self.max_poll_interval, self.max_poll_failures)

    # --- the deadline ---------------------------------------------------------------------------

    def end_time(self, created_at: float, completion_window: str) -> float:
        return deadline_end_time(created_at, completion_window, self.deadline)

    # --- waiting ----------------------------------------------------------------------------------

    def wait_for(self, context: Mapping[str, Any], batch_id: str, look: SiblingLook | None = None) -> BatchSummary:
        """
        Finish now if the batch already ended, else defer (or block) until it does. On the way, the second look for
        a duplicate (``batches.SiblingLook``) when the try that created the batch asks for it.
        """
        batch = self.hook.poll_batch(batch_id, PollFailures(self.poll_policy))
        if look is not None and not look.worth_it(time.time()):
            look = None
        summary = summarize(batch)
        self.log.info(format_progress(summary))
        if is_terminal(batch.status):
            return self.finish(summary)
        end_time = self.end_time(batch.created_at, batch.completion_window)
        if self.deferrable:
            self.defer(
                trigger=OpenAIBatchTrigger(
                    batch_id=batch_id,
                    conn_id=self.conn_id,
                    poll_interval=self.poll_interval,
                    end_time=end_time,
                    cancel_on_kill=self.cancel_on_kill,
                    max_poll_failures=self.max_poll_failures,
                    created_at=float(batch.created_at),
                    max_poll_interval=self.max_poll_interval,
                    sibling_look=look.to_json() if look is not None else None,
                ),
                method_name="execute_complete",
                # Airflow's own backstop in case the triggerer is down at the deadline.
                timeout=defer_timeout(end_time, self.poll_interval),
            )
        self._waiting_on, self._waiting_ti = batch_id, context.get("ti")
        pending = [look] if look is not None else []

        def on_poll(current: Batch) -> Batch:
            """The second look, once, when due; a lost race switches the wait to the survivor."""
            if not pending or is_terminal(current.status) or not pending[0].due(current.created_at, time.time()):
                return current
            survivor = follow_survivor(self.hook, current, pending.pop(), self.log)
            if survivor.id != current.id:
                self._waiting_on = survivor.id
                self.push_batch_id(context, survivor.id)
            return survivor

        try:
            done = self.hook.wait_for_batch(
                batch_id,
                self.poll_interval,
                end_time=end_time,
                max_poll_interval=self.max_poll_interval,
                max_poll_failures=self.max_poll_failures,
                on_poll=on_poll,
            )
        except BatchTimeoutError as timed_out:
            return self.on_deadline(self._waiting_on or batch_id, timed_out.summary or summary)
        finally:
            self._waiting_on = None
        return self.finish(summarize(done))

    def execute_complete(self, context: Mapping[str, Any], event: BatchEventPayload | None = None) -> Any:
        """Where a deferred wait resumes: turn the trigger's one event into the task's outcome."""
        if not event or "status" not in event:
            raise BatchFailedError(f"The trigger returned no usable event: {event!r}")
        summary = event.get("summary")
        if event.get("followed"):  # the trigger's second look found an older duplicate: that batch is the one
            self.push_batch_id(context, event["batch_id"])
        if event["status"] == EVENT_TERMINAL and summary:
            return self.finish(summary)
        if event["status"] == EVENT_TIMEOUT:
            return self.on_deadline(event["batch_id"], summary)
        if event.get("error"):  # polling gave up: the same error a blocking wait raises
            raise api_error_from_payload(event["error"])
        raise BatchFailedError(str(event.get("message") or event), summary)

    def on_deadline(self, batch_id: str, summary: BatchSummary | None) -> BatchSummary:
        """The deadline passed: cancel the batch when ``cancel_on_timeout`` says so, then fail as a sensor timeout."""
        message = f"Batch {batch_id} did not end before its deadline"
        if self.cancel_on_timeout:
            try:
                self.hook.cancel_batch(batch_id)
                message += "; it was cancelled (partial output is kept)"
            except OpenAIBatchAPIError as error:
                message += f"; cancelling it failed: {error}"
        raise BatchTimeoutError(message + ".", summary)

    def finish(self, summary: BatchSummary) -> BatchSummary:
        """Apply the outcome policy: return the summary on success, raise with the reason otherwise."""
        tags = metrics.metric_tags(
            model=summary["model"], endpoint=summary["endpoint"], dag_id=self.dag_id, task_id=self.task_id
        )
        metrics.batch_ended(summary["status"], tags)
        if queue_refusal(summary) is not None:
            metrics.queue_refused(tags)
        requests = summary["request_counts"]
        metrics.requests_ended({"succeeded": requests["completed"], "failed": requests["failed"]}, tags)
        outcome = evaluate(summary, self.policy)
        if not outcome.ok:
            refusal = queue_refusal(summary)
            if refusal is not None:
                raise BatchQueueFullError(
                    outcome.message, summary, model=summary["model"], limit=refusal.limit, unit=refusal.unit
                )
            raise BatchFailedError(outcome.message, summary)
        (self.log.warning if outcome.warning else self.log.info)(outcome.message)
        return summary

    def on_kill(self) -> None:
        """The worker-side counterpart of the trigger's ``on_kill`` (blocking waits and poke-mode sensors)."""
        if self._waiting_on:
            self.cancel_for_kill([self._waiting_on], self._waiting_ti)


def is_request_data(value: Any) -> bool:
    """Request dicts (a list, tuple, generator or any iterable of them), as opposed to a path, URI or storage path."""
    if value is None or isinstance(value, (str, bytes, bytearray, memoryview, os.PathLike, Mapping)):
        return False
    if getattr(value, "resolve", None) is not None:  # an ObjectStoragePath or an XComArg
        return False
    return isinstance(value, Iterable)


def batch_id_of(value: Any) -> str:
    """Accept a batch id or a batch summary (the sensor's XCom), so tasks chain without glue code."""
    if isinstance(value, Mapping):
        value = value.get("batch_id")
    if not isinstance(value, str) or not value or value == "None":
        raise ValueError(
            f"expected a batch id or a batch summary with 'batch_id', got {value!r} "
            "(a template that pulled an XCom the upstream task never pushed renders as 'None')"
        )
    return value
