"""
A retry never pays twice: the identity every batch carries, and how an attempt finds what an earlier one made.

Every batch we create carries ``metadata[airflow_idempotency_key]``: a hash of the task instance (without the try
number, so every try computes the same key) and of what is being run (input file and endpoint, so a changed
input is a new batch). Before creating, an attempt looks for its batch in the Task SDK's ``task_state_store``
(Airflow 3.3+) and then in the account's recent batches, which also covers a crash between the API call and
any local record. Uploads do the same with a content hash in the file name.

Two tries of one task instance can also run at the same time (Celery's pool process dies, Airflow fails the
try and starts the next one while the orphaned task process keeps running): both may look, find nothing and
create. ``surviving_batch`` is the rule every try applies right after creating, so that all of them agree on
the one batch that keeps running and the others cancel their own duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from airflow_provider_openai_batch.batch_status import can_survive_a_race
from airflow_provider_openai_batch.exceptions import BatchInputError, InputIssue, OpenAIBatchAPIError

T = TypeVar("T")
log = logging.getLogger(__name__)

IDEMPOTENCY_METADATA_KEY = "airflow_idempotency_key"
STATE_STORE_KEY = "openai_batch_create"
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512
#: First back-off (seconds) before looking for what a failed send may have made; doubles per attempt.
RETRY_BASE_DELAY = 0.5
#: How far back an attempt scans the account's batches for one it made: a 24 h window plus retries.
DEFAULT_LOOKBACK = timedelta(hours=48)
#: How far OpenAI's ``created_at`` clock and a worker's clock may disagree when deciding which batches were
#: created by tries racing this one (see ``surviving_batch``).
CLOCK_SKEW = timedelta(seconds=60)
#: Seconds a try waits after its create call returned before it lists its siblings. ``created_at`` is in whole
#: seconds, so a racer created in the same second as ours can win the tie (by id) after we listed: listing once
#: the second of our own ``created_at`` has surely passed shows every batch that can still beat ours.
SETTLE_PAUSE = 1.5


def task_identity(context: Mapping[str, Any]) -> tuple[str, str, str, int]:
    """(dag_id, task_id, run_id, map_index) of the running task instance; the try number is left out on purpose."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return ti.dag_id, ti.task_id, ti.run_id, -1 if map_index is None else int(map_index)


def idempotency_key(identity: tuple[str, str, str, int], *parts: str) -> str:
    """
    ``\\x00``-joined so that ``("etl", "load_data")`` and ``("etl_load", "data")`` cannot collide.
    32 hex characters (128 bits) fit comfortably in a metadata value and never collide in practice.
    """
    material = "\x00".join([*map(str, identity), *parts])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def build_metadata(user_metadata: Mapping[str, Any] | None, key: str) -> dict[str, str]:
    """
    The user's metadata plus our key, checked against OpenAI's limits before anything is sent
    (16 keys, 64-character keys, 512-character string values), with an error that names the field.
    """
    metadata = dict(user_metadata or {})
    issues: list[InputIssue] = []
    if IDEMPOTENCY_METADATA_KEY in metadata:
        issues.append(InputIssue(0, IDEMPOTENCY_METADATA_KEY, "is reserved for the provider's retry safety"))
    if len(metadata) > MAX_METADATA_KEYS - 1:
        issues.append(
            InputIssue(0, None, f"{len(metadata)} keys; at most {MAX_METADATA_KEYS - 1} (one is reserved for retries)")
        )
    for name, value in metadata.items():
        if not isinstance(name, str) or len(name) > MAX_METADATA_KEY_LENGTH:
            issues.append(InputIssue(0, str(name)[:80], f"keys must be strings of at most {MAX_METADATA_KEY_LENGTH}"))
        if not isinstance(value, str):
            issues.append(InputIssue(0, str(name), f"values must be strings, got {type(value).__name__}"))
        elif len(value) > MAX_METADATA_VALUE_LENGTH:
            issues.append(InputIssue(0, str(name), f"{len(value)} characters; at most {MAX_METADATA_VALUE_LENGTH}"))
    if issues:
        raise BatchInputError("metadata", issues)
    metadata[IDEMPOTENCY_METADATA_KEY] = key
    return metadata


def content_filename(name: str, sha256: str) -> str:
    """``requests.jsonl`` → ``requests.<16 hex of sha256>.jsonl``: the same bytes always get the same name."""
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, "jsonl"
    return f"{stem}.{sha256[:16]}.{suffix}"


def call_once(
    operation: str,
    send: Callable[[], T],
    find: Callable[[], T | None],
    *,
    attempts: int = 5,
) -> T:
    """
    Send a request that must take effect at most once (a paid batch, a 200 MB upload).

    The SDK would resend a request whose answer was lost (a dropped connection, a 502 from a proxy after the
    API acted) and so create a second batch. Here ``send`` runs with the SDK's retries off, and after each
    retryable failure ``find`` looks for what the lost attempt may have made before sending again.
    """
    for attempt in range(1, attempts + 1):
        try:
            return send()
        except OpenAIBatchAPIError as error:
            if not error.retryable or attempt == attempts:
                raise
            delay = min(RETRY_BASE_DELAY * 2 ** (attempt - 1), 8.0)
            log.warning("%s failed (%s); checking whether it took effect before retrying", operation, error)
            time.sleep(delay)
            found = find()
            if found is not None:
                log.info("%s had taken effect before its answer was lost; using that result", operation)
                return found
    raise AssertionError("unreachable")  # pragma: no cover


class BatchLike(Protocol):
    """What ``surviving_batch`` reads of a batch (``openai.types.Batch`` has these)."""

    @property
    def id(self) -> str: ...
    @property
    def created_at(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, str] | None: ...


B = TypeVar("B", bound=BatchLike)


def surviving_batch(own: B, batches: Iterable[B], key: str, since: float) -> B:
    """
    The one batch that keeps running when tries of one task instance raced and each created a batch.

    ``own`` is the batch this try just created; ``batches`` what a listing after that returned; ``since`` when
    this try started looking for an earlier batch (epoch seconds). Contenders are ``own`` and the batches with
    the same idempotency key that were created after ``since`` (less ``CLOCK_SKEW``) and are not dead or being
    cancelled. The oldest wins (``created_at``, ties broken by id), so every try computes the same winner:
    a race needs each try's lookup to run before the other's create, so each try's listing holds every older
    racer, provided it lists after the second of its own ``created_at`` has passed (``SETTLE_PAUSE``), which also
    shows it every racer created in the same second. Batches of tries that ended before this one started are
    not contenders: whether those are reused is the lookup's decision, made before creating.
    """
    cutoff = since - CLOCK_SKEW.total_seconds()
    contenders = [own]
    for batch in batches:
        if batch.id == own.id or (batch.metadata or {}).get(IDEMPOTENCY_METADATA_KEY) != key:
            continue
        if batch.created_at >= cutoff and can_survive_a_race(batch.status):
            contenders.append(batch)
    return min(contenders, key=lambda batch: (batch.created_at, batch.id))
