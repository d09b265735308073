"""
A retry never pays twice: the identity every batch carries, and the pieces the create path is made of.

Every batch we create carries ``metadata[airflow_idempotency_key]``: a hash of a deployment salt, of the task
instance (without the try number, so every try computes the same key) and of everything that changes what the batch
does (input, endpoint, completion window, metadata, output expiry), so a changed input or argument is a new batch.
It also carries ``metadata[airflow_first_try]``: the first try number of the task's current run of tries, which is
how a later try tells a retry (same number) from a re-run after a clear (a new number). Uploads carry a hash of the
salt and their content in the file name.

``batches.CreatePath`` puts these together (lookup, reuse, create once, settle); ``surviving_batch`` is the rule
every racing try applies so that all of them agree on the one batch that keeps running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from airflow_provider_openai_batch.batch_status import can_survive_a_race
from airflow_provider_openai_batch.exceptions import BatchInputError, InputIssue, OpenAIBatchAPIError
from airflow_provider_openai_batch.polling import backoff_delay

T = TypeVar("T")
log = logging.getLogger(__name__)

IDEMPOTENCY_METADATA_KEY = "airflow_idempotency_key"
#: The first try number of the run of tries that created the batch (see ``first_try``).
FIRST_TRY_METADATA_KEY = "airflow_first_try"
#: The try number that created the batch: of racers created in the same second, the earlier try's wins
#: (``surviving_batch``), so a try that knows no later try has begun looking needs no settle for them.
TRY_METADATA_KEY = "airflow_try"
RESERVED_METADATA_KEYS = (IDEMPOTENCY_METADATA_KEY, FIRST_TRY_METADATA_KEY, TRY_METADATA_KEY)
STATE_STORE_KEY = "openai_batch_create"
MAX_METADATA_KEYS = 16
#: ``[openai_batch] deployment_salt`` (env ``AIRFLOW__OPENAI_BATCH__DEPLOYMENT_SALT``) names this deployment in
#: every idempotency key; see ``deployment_salt``.
SALT_SECTION, SALT_OPTION = "openai_batch", "deployment_salt"
#: Taken off the DAG run's start when scanning for an earlier try's batch: our clock and OpenAI's may disagree.
#: Twice ``RACE_SKEW``, the agreement the duplicate rule already relies on; NTP-synced hosts agree within
#: milliseconds. Each minute more costs a retry the account's batches of that minute (a shared org makes about
#: seven a minute, a hundred to a list page); a batch is missed only if OpenAI's clock lagged ours by more than
#: this plus the time from the run's start to the create.
CLOCK_SKEW = timedelta(minutes=2)
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512
#: First back-off (seconds) before looking for what a failed send may have made; doubles per attempt.
RETRY_BASE_DELAY = 0.5
#: How far back an upload looks for an identical file to reuse; also the create's scan window when the DAG run's
#: start is unknown (a context without ``dag_run``).
DEFAULT_LOOKBACK = timedelta(hours=48)
#: How far OpenAI's ``created_at`` clock and a worker's clock may disagree when deciding which batches were
#: created by tries racing this one (see ``surviving_batch``): short, so a batch an earlier try left is no racer.
RACE_SKEW = timedelta(seconds=60)
#: Seconds a try waits after its create call returned before it lists its siblings. ``created_at`` is in whole
#: seconds, so a racer created in the same second as ours can win the tie (by id) after we listed: listing once
#: the second of our own ``created_at`` has surely passed shows every batch that can still beat ours.
SETTLE_PAUSE = 1.5


def task_identity(context: Mapping[str, Any]) -> tuple[str, str, str, int]:
    """(dag_id, task_id, run_id, map_index) of the running task instance; the try number is left out on purpose."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return ti.dag_id, ti.task_id, ti.run_id, -1 if map_index is None else int(map_index)


def idempotency_key(identity: tuple[str, str, str, int], *parts: str, salt: str | None = None) -> str:
    """
    ``\\x00``-joined so that ``("etl", "load_data")`` and ``("etl_load", "data")`` cannot collide.
    32 hex characters (128 bits) fit comfortably in a metadata value and never collide in practice.
    ``salt`` defaults to this deployment's (``deployment_salt``).
    """
    material = "\x00".join([deployment_salt() if salt is None else salt, *map(str, identity), *parts])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def work_parts(
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Mapping[str, Any] | None,
    output_expires_after_seconds: int | None,
) -> tuple[str, ...]:
    """Everything that changes what a batch does, as key parts: change any of them and it is a new batch."""
    return (
        str(input_file_id),
        str(endpoint),
        str(completion_window),
        json.dumps(dict(metadata or {}), sort_keys=True, default=str),
        "" if output_expires_after_seconds is None else str(int(output_expires_after_seconds)),
    )


#: The Airflow Variable that holds this deployment's random id (the default salt): made once, kept in the
#: deployment's own metadata database, read by every worker through the Task SDK.
DEPLOYMENT_ID_VARIABLE = "openai_batch_deployment_id"
_salt_cache: dict[str, str] = {}


def _in_a_task() -> bool:
    """Whether this process runs a task under Airflow's supervisor (it can reach the deployment's Variables)."""
    try:
        from airflow.sdk.execution_time import task_runner
    except ImportError:  # pragma: no cover - not the Task SDK
        return False
    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


def _deployment_id() -> str | None:
    """
    This deployment's random id, made on first use and kept in the Variable ``DEPLOYMENT_ID_VARIABLE``.

    Two workers making it at the very same moment (the deployment's first batch ever) could each write their own:
    each reads the Variable back after a pause, so both go on with the one written last. ``None`` outside a task
    (a unit test calling ``execute`` by hand): there is no deployment to ask.
    """
    if not _in_a_task():
        return None
    from airflow.sdk import Variable

    value = Variable.get(DEPLOYMENT_ID_VARIABLE, default=None)
    if not value:
        Variable.set(
            DEPLOYMENT_ID_VARIABLE,
            uuid.uuid4().hex,
            description="Names this deployment in the OpenAI Batch provider's idempotency keys and upload names. "
            "Keep it: changing it makes running tasks create new batches.",
        )
        time.sleep(0.5)
        value = Variable.get(DEPLOYMENT_ID_VARIABLE)
    return str(value)


def deployment_salt() -> str:
    """
    What tells this Airflow deployment's batches and uploads from another's on the same OpenAI project.

    Two deployments run the same DAG with the same scheduled ``run_id`` and (uploads being reused by content) the
    same input file id, so without a salt their keys match and one reuses, cancels or deletes the input of the
    other's batch. ``[openai_batch] deployment_salt`` sets it explicitly (any string; the same on every worker of
    one deployment). The default is a random id made once and kept in the deployment's own metadata database (the
    Airflow Variable ``openai_batch_deployment_id``, read through the Task SDK), so it is the same on every worker
    of a deployment and different between two deployments made from one configuration. Configuration alone cannot
    tell them apart: the official docker-compose and the Helm chart give every deployment the same
    ``execution_api_server_url``, and a worker without a fernet key makes its own. Outside a task (no deployment
    to ask), ``[core] execution_api_server_url`` stands in.
    """
    from airflow.providers.common.compat.sdk import conf

    explicit = conf.get(SALT_SECTION, SALT_OPTION, fallback=None)
    if explicit:
        return str(explicit)
    if "id" not in _salt_cache:
        found = _deployment_id()
        if found is None:
            return "api:" + str(conf.get("core", "execution_api_server_url", fallback="") or "").rstrip("/")
        _salt_cache["id"] = found
    return "deployment:" + _salt_cache["id"]


def first_try(context: Mapping[str, Any], retries: int | None) -> int | None:
    """
    The first try number of the task instance's current run of tries: the same for every retry, new after a
    clear. Airflow sets ``max_tries = try_number + retries`` when a task is cleared, and computes the first try
    of the current run the same way (``RuntimeTaskInstance.get_first_reschedule_date``:
    ``max_tries - retries + 1``). ``None`` when the task instance does not say (then every try counts as a retry).
    """
    max_tries = getattr(context.get("ti"), "max_tries", None)
    if not isinstance(max_tries, int) or max_tries < 0:
        return None
    return max_tries - int(retries or 0) + 1


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def scan_start(context: Mapping[str, Any], fallback: timedelta = DEFAULT_LOOKBACK) -> float:
    """
    Epoch seconds from which to scan the account's batches for one an earlier try made: when the DAG run
    started (less ``CLOCK_SKEW``). No try of this run can have made a batch before that, so the scan costs
    the batches created since, a page or two, not a fixed window of the account's history. A run cleared
    after it finished starts again (Airflow resets its ``start_date``): batches of its earlier life are then
    found through ``task_state_store`` (3.3+) only. Without a DAG run in the context: ``fallback`` back from now.
    """
    dag_run = context.get("dag_run")
    started = _epoch(getattr(dag_run, "start_date", None)) if dag_run is not None else None
    if started is None:
        return time.time() - fallback.total_seconds()
    return started - CLOCK_SKEW.total_seconds()


def build_metadata(
    user_metadata: Mapping[str, Any] | None, key: str, first: int | None = None, try_number: int | None = None
) -> dict[str, str]:
    """
    The user's metadata plus our key (and the first try and this try's number, when known), checked against
    OpenAI's limits before anything is sent (16 keys, 64-character keys, 512-character string values), with an
    error that names the field.
    """
    metadata = dict(user_metadata or {})
    issues: list[InputIssue] = []
    reserved = len(RESERVED_METADATA_KEYS)
    for name in RESERVED_METADATA_KEYS:
        if name in metadata:
            issues.append(InputIssue(0, name, "is reserved for the provider's retry safety"))
    if len(metadata) > MAX_METADATA_KEYS - reserved:
        issues.append(
            InputIssue(
                0,
                None,
                f"{len(metadata)} keys; at most {MAX_METADATA_KEYS - reserved} ({reserved} are reserved for retries)",
            )
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
    if first is not None:
        metadata[FIRST_TRY_METADATA_KEY] = str(first)
    if try_number is not None:
        metadata[TRY_METADATA_KEY] = str(try_number)
    return metadata


def content_filename(name: str, sha256: str, salt: str | None = None) -> str:
    """
    ``requests.jsonl`` → ``requests.<16 hex>.jsonl``, a hash of the deployment salt and the content's sha256: the
    same bytes always get the same name within a deployment (so a retry reuses the upload), and another
    deployment on the same project never reuses, or deletes, this one's file.
    """
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, "jsonl"
    material = f"{deployment_salt() if salt is None else salt}\x00{sha256}"
    return f"{stem}.{hashlib.sha256(material.encode()).hexdigest()[:16]}.{suffix}"


def call_once(
    operation: str,
    send: Callable[[], T],
    find: Callable[[], T | None],
    *,
    attempts: int = 5,
    logger: Any = None,
) -> T:
    """
    Send a request that must take effect at most once (a paid batch, a 200 MB upload).

    The SDK would resend a request whose answer was lost (a dropped connection, a 502 from a proxy after the
    API acted) and so create a second batch. Here ``send`` runs with the SDK's retries off, and after each
    retryable failure ``find`` looks for what the lost attempt may have made before sending again. What it has
    to say goes to ``logger`` (this module's by default; the create path gives a ``HeldLog`` speaker).
    """
    say = log if logger is None else logger
    for attempt in range(1, attempts + 1):
        try:
            return send()
        except OpenAIBatchAPIError as error:
            if not error.retryable or attempt == attempts:
                raise
            delay = backoff_delay(attempt, RETRY_BASE_DELAY, 8.0)
            say.warning("%s failed (%s); checking whether it took effect before retrying", operation, error)
            time.sleep(delay)
            found = find()
            if found is not None:
                say.info("%s had taken effect before its answer was lost; using that result", operation)
                return found
    raise AssertionError("unreachable")  # pragma: no cover


#: The loggers the SDK speaks through during a request: the client ("Retrying request in …" at INFO) and its
#: transport (one line per request at INFO, held at WARNING by the hook unless debug logging is on).
SDK_LOGGERS = ("openai._base_client", "openai", "httpx2", "httpx")


class HeldLog:
    """
    What a try says between its create and its settle, said once the settle has run.

    Airflow 3.3 kills a task process at its first log line once the supervisor that reads its log is gone (an
    orphaned try), so an orphan must have settled, cancelling its duplicate, before it says anything. Inside
    ``with held:`` this thread's records of ``SDK_LOGGERS`` are held back, and ``speaker(logger)`` is a logger
    whose lines are held too; ``release()`` says all of them, in order, through the loggers they were meant for.
    """

    def __init__(self) -> None:
        self._said: list[tuple[Any, int, str, tuple[Any, ...]] | logging.LogRecord] = []
        self._thread = threading.get_ident()
        self._loggers = [logging.getLogger(name) for name in SDK_LOGGERS]

    def _hold(self, record: logging.LogRecord) -> bool:
        if record.thread != self._thread:
            return True  # another thread's request: not ours to hold
        self._said.append(record)
        return False

    def __enter__(self) -> HeldLog:
        for logger in self._loggers:
            logger.addFilter(self._hold)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger in self._loggers:
            logger.removeFilter(self._hold)

    def speaker(self, logger: Any) -> _HeldSpeaker:
        return _HeldSpeaker(self, logger)

    def hold(self, logger: Any, level: int, message: str, args: tuple[Any, ...]) -> None:
        self._said.append((logger, level, message, args))

    def release(self) -> None:
        said, self._said = self._said, []
        for item in said:
            if isinstance(item, logging.LogRecord):
                logging.getLogger(item.name).handle(item)
            else:
                logger, level, message, args = item
                # By the level's own method: a task's logger (structlog in the Task SDK) has those for sure.
                getattr(logger, "warning" if level >= logging.WARNING else "info")(message, *args)


class _HeldSpeaker:
    """A logger whose lines ``HeldLog`` holds until its ``release``."""

    def __init__(self, held: HeldLog, logger: Any) -> None:
        self._held, self._logger = held, logger

    def info(self, message: str, *args: Any) -> None:
        self._held.hold(self._logger, logging.INFO, message, args)

    def warning(self, message: str, *args: Any) -> None:
        self._held.hold(self._logger, logging.WARNING, message, args)


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


def surviving_batch(own: B, batches: Iterable[B], key: str, since: float, first: int | None = None) -> B:
    """
    The one batch that keeps running when tries of one task instance raced and each created a batch.

    ``own`` is the batch this try just created; ``batches`` what a listing after that returned; ``since`` when
    this try started looking for an earlier batch (epoch seconds). Contenders are ``own`` and the batches with
    the same idempotency key (and, when known, the same first try: a re-run after a clear races nobody) that were
    created after ``since`` (less ``RACE_SKEW``) and are not dead or being
    cancelled. The oldest wins (``created_at``; in the same second the earlier try's, by ``airflow_try``; then the
    id), so every try computes the same winner:
    a race needs each try's lookup to run before the other's create, so each try's listing holds every older
    racer, provided it lists after the second of its own ``created_at`` has passed (``SETTLE_PAUSE``), which also
    shows it every racer created in the same second. Batches of tries that ended before this one started are
    not contenders: whether those are reused is the lookup's decision, made before creating.
    """
    cutoff = since - RACE_SKEW.total_seconds()
    contenders = [own]
    for batch in batches:
        metadata = batch.metadata or {}
        if batch.id == own.id or metadata.get(IDEMPOTENCY_METADATA_KEY) != key:
            continue
        if first is not None and metadata.get(FIRST_TRY_METADATA_KEY) not in (None, str(first)):
            continue
        if batch.created_at >= cutoff and can_survive_a_race(batch.status):
            contenders.append(batch)
    return min(contenders, key=lambda batch: (batch.created_at, _try_of(batch), batch.id))


def _try_of(batch: Any) -> int:
    """The try that created ``batch`` (``airflow_try``); a batch that does not say sorts after those that do."""
    value = (getattr(batch, "metadata", None) or {}).get(TRY_METADATA_KEY)
    try:
        return int(value) if value is not None else sys.maxsize
    except (TypeError, ValueError):
        return sys.maxsize
