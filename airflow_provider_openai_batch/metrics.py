"""
The provider's metrics, sent through Airflow's own ``Stats`` (StatsD, Datadog or OpenTelemetry, as ``[metrics]`` is
configured), so spend, queue pressure and failures show up beside Airflow's task metrics with no setup of their own.

``Stats`` comes from ``airflow.providers.common.compat.sdk`` (``airflow.sdk.observability.stats`` on Airflow 3.2+,
``airflow.stats`` before): the one import valid on Airflow 3.0 to 3.3. Airflow sets it up in the task's process, so
call these from a worker (``execute`` / ``execute_complete``), not from a trigger: on 3.3 the triggerer sets up the
core ``Stats``, not the Task SDK's. A metric that cannot be sent never fails the task.

Names carry what a metric means (a status, a kind of token); tags carry where it comes from: ``model``,
``endpoint``, ``dag_id``, ``task_id`` (and ``currency`` on cost). Plain StatsD drops tags unless
``[metrics] statsd_influxdb_enabled`` appends them to the name (``name,model=gpt-4o,...``); Datadog and
OpenTelemetry keep them as tags. Every name below gets ``[metrics] statsd_prefix`` (``airflow.``) in front.

============================================  =======  ===============================================================
name                                          type     value
============================================  =======  ===============================================================
``openai_batch.batches.created``              counter  1 per batch this provider created (a reused batch is not one)
``openai_batch.batches.ended.<status>``       counter  1 per batch seen ending: ``completed``, ``failed``, ``expired``,
                                                       ``cancelled``
``openai_batch.batches.duration``             timing   a batch's ``created_at`` to its end (``completed_at``,
                                                       ``failed_at``, ``expired_at`` or ``cancelled_at``), ms
``openai_batch.requests.<status>``            counter  requests of ended batches: ``succeeded``, ``failed``,
                                                       ``expired``, ``cancelled``, ``missing``; with typed results
                                                       also ``invalid_output``, ``refused``, ``truncated``
``openai_batch.tokens.<kind>``                counter  usage tokens: ``input``, ``cached_input``, ``output``,
                                                       ``reasoning`` (reasoning is part of output, not added to it)
``openai_batch.cost.usage``                   counter  cost of the usage from the price table, in millionths of its
                                                       currency (1 USD = 1,000,000)
``openai_batch.cost.estimate_low``            counter  an estimate's low bound before submitting, same unit
``openai_batch.cost.estimate_high``           counter  an estimate's high bound (not sent when it has none)
``openai_batch.queue.refusals``               counter  1 per batch OpenAI refused for its enqueued-token limit
                                                       (``token_limit_exceeded``)
============================================  =======  ===============================================================
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from airflow_provider_openai_batch.outputs import ROW_STATUSES

log = logging.getLogger(__name__)

PREFIX = "openai_batch"

CostBasis = Literal["usage", "estimate_low", "estimate_high"]

#: The ``<status>`` of ``openai_batch.requests.<status>``: every status a joined row can have (``outputs``).
REQUEST_STATUSES: tuple[str, ...] = ROW_STATUSES
#: ``results.normalize_usage`` keys → the ``<kind>`` of ``openai_batch.tokens.<kind>``.
TOKEN_KINDS: dict[str, str] = {
    "input_tokens": "input",
    "cached_input_tokens": "cached_input",
    "output_tokens": "output",
    "reasoning_tokens": "reasoning",
}
#: The Batch object's timestamp for each way of ending.
_END_TIMESTAMPS: dict[str, str] = {
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
}
#: Airflow rejects a whole metric whose name (with InfluxDB-style tags appended) has other characters.
_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")
_MAX_TAG_LENGTH = 64


class MetricTags(TypedDict, total=False):
    model: str
    endpoint: str
    dag_id: str
    task_id: str
    currency: str


def _tag_value(value: Any) -> str:
    return _UNSAFE.sub("_", str(value))[:_MAX_TAG_LENGTH]


def metric_tags(
    *,
    model: str | None = None,
    endpoint: str | None = None,
    dag_id: str | None = None,
    task_id: str | None = None,
) -> MetricTags:
    """Tags for these metrics, the unknown ones left out; characters StatsD names cannot hold become ``_``."""
    given = {"model": model, "endpoint": endpoint, "dag_id": dag_id, "task_id": task_id}
    return MetricTags(**{key: _tag_value(value) for key, value in given.items() if value})  # type: ignore[typeddict-item]


def tags_from_context(context: Mapping[str, Any], *, model: str | None, endpoint: str | None) -> MetricTags:
    """``metric_tags`` with the DAG and task of a task's Airflow context (``context["ti"]``)."""
    ti = context.get("ti") or context.get("task_instance")
    return metric_tags(
        model=model,
        endpoint=endpoint,
        dag_id=getattr(ti, "dag_id", None),
        task_id=getattr(ti, "task_id", None),
    )


def _stats() -> Any:
    from airflow.providers.common.compat.sdk import Stats

    return Stats


def _incr(name: str, count: int, tags: MetricTags) -> None:
    try:
        _stats().incr(f"{PREFIX}.{name}", count, tags=dict(tags))
    except Exception:  # a metric must never fail the task that sends it
        log.debug("metric %s not sent", name, exc_info=True)


def _timing(name: str, seconds: float, tags: MetricTags) -> None:
    try:
        _stats().timing(f"{PREFIX}.{name}", datetime.timedelta(seconds=seconds), tags=dict(tags))
    except Exception:
        log.debug("metric %s not sent", name, exc_info=True)


def batch_created(tags: MetricTags) -> None:
    """A batch was created (not reused from an earlier try)."""
    _incr("batches.created", 1, tags)


def batch_ended(status: str, tags: MetricTags, created_at: float | None = None, ended_at: float | None = None) -> None:
    """
    A batch was seen ending with ``status``; with its ``created_at`` and end timestamp (Unix seconds, from the Batch
    object) also its create-to-end time. Statuses that are not an end are ignored.
    """
    if status not in _END_TIMESTAMPS:
        return
    _incr(f"batches.ended.{status}", 1, tags)
    if created_at is not None and ended_at is not None and ended_at >= created_at:
        _timing("batches.duration", ended_at - created_at, tags)


def batch_ended_from_object(batch: Any, tags: MetricTags) -> None:
    """
    ``batch_ended`` from a Batch object's fields (``status``, ``created_at``, ``completed_at``, ...): the SDK's
    ``Batch`` as the hook returns it, or its JSON as a mapping.
    """

    def field(name: str) -> Any:
        return batch.get(name) if isinstance(batch, Mapping) else getattr(batch, name, None)

    status = str(field("status"))
    end_key = _END_TIMESTAMPS.get(status)
    batch_ended(status, tags, created_at=field("created_at"), ended_at=field(end_key) if end_key else None)


def requests_ended(counts: Mapping[str, int], tags: MetricTags) -> None:
    """
    Requests of ended batches by status: the job's ``counts`` (``succeeded``, ``failed``, ``expired``, ...; with
    typed results ``invalid_output``, ``refused``, ``truncated`` too), or a batch's succeeded / failed.
    """
    for status in REQUEST_STATUSES:
        count = int(counts.get(status, 0) or 0)
        if count > 0:
            _incr(f"requests.{status}", count, tags)


def tokens_used(usage: Mapping[str, int], tags: MetricTags) -> None:
    """Usage tokens by kind, from ``results.normalize_usage`` / ``usage_totals`` keys."""
    for key, kind in TOKEN_KINDS.items():
        count = int(usage.get(key, 0) or 0)
        if count > 0:
            _incr(f"tokens.{kind}", count, tags)


def cost(amount: float, currency: str, tags: MetricTags, *, basis: CostBasis = "usage") -> None:
    """A cost in ``currency``, sent as an integer count of millionths (``results.estimate_cost`` rounds to those)."""
    micros = round(amount * 1_000_000)
    if micros > 0:
        _incr(f"cost.{basis}", micros, MetricTags(**tags, currency=_tag_value(currency)))


def estimated_cost(low: float, high: float | None, currency: str, tags: MetricTags) -> None:
    """An estimate's cost range before submitting (``Estimate["cost"]``); without a high bound, no ``estimate_high``."""
    cost(low, currency, tags, basis="estimate_low")
    if high is not None:
        cost(high, currency, tags, basis="estimate_high")


def queue_refused(tags: MetricTags) -> None:
    """OpenAI refused a batch for the model's enqueued-token limit; the work waits, no request failed."""
    _incr("queue.refusals", 1, tags)
