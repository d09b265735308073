"""Exceptions a DAG author can catch, each carrying what is needed to act on it, never the API key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from airflow.providers.common.compat.sdk import AirflowException, AirflowSensorTimeout

if TYPE_CHECKING:
    from airflow_provider_openai_batch.batch_status import BatchSummary


class OpenAIBatchError(AirflowException):
    """Base class of every error this provider raises on purpose."""


#: 4xx statuses that may pass when sent again: request timeout, conflict, rate limit.
TRANSIENT_CLIENT_STATUSES = frozenset({408, 409, 429})


def is_transient_status(status: int) -> bool:
    """
    The one definition of a transient HTTP status, for an API call (``OpenAIBatchAPIError.retryable``) and for a
    request inside a batch (``results.is_retryable``): 408, 409, 429 and every 5xx.
    """
    return status in TRANSIENT_CLIENT_STATUSES or status >= 500


class OpenAIBatchAPIError(OpenAIBatchError):
    """
    An API call failed for good (after the SDK's own retries).

    The SDK's exceptions hold the request, whose headers carry the bearer key; this one keeps only what
    an operator needs to read in a log or report upstream: status code, request id and the server's message.
    """

    def __init__(
        self,
        operation: str,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        code: str | None = None,
    ) -> None:
        self.operation = operation
        #: Not ``status_code``: AirflowException already uses that name for its REST API meaning.
        self.http_status = status_code
        self.request_id = request_id
        self.code = code
        self.message = message
        parts = [f"OpenAI {operation} failed"]
        if status_code is not None:
            parts.append(f"with HTTP {status_code}")
        if code:
            parts.append(f"({code})")
        text = " ".join(parts) + f": {message}"
        if request_id:
            text += f" [request id {request_id}]"
        super().__init__(text)

    @property
    def retryable(self) -> bool:
        """Rate limits, server errors and transport errors may pass; auth, permission and 4xx do not."""
        return self.http_status is None or is_transient_status(self.http_status)

    @property
    def not_found(self) -> bool:
        """The object does not exist (any more): deleted, expired, or never made."""
        return self.http_status == 404

    @property
    def refused_for_state(self) -> bool:
        """
        The request was refused because of the object's state, e.g. cancelling a batch that already ended.
        OpenAI does not document which status that is; 409 and 400 are both read this way.
        """
        return self.http_status in (400, 409)

    @property
    def unauthorized(self) -> bool:
        """401: the key was refused (revoked, rotated, mistyped); a fresh read of the connection may help."""
        return self.http_status == 401

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_api_error,
            (self.operation, self.message, self.http_status, self.request_id, self.code),
        )


def _rebuild_api_error(
    operation: str, message: str, status_code: int | None, request_id: str | None, code: str | None
) -> OpenAIBatchAPIError:
    return OpenAIBatchAPIError(operation, message, status_code=status_code, request_id=request_id, code=code)


@dataclass(frozen=True)
class InputIssue:
    """One problem found in one line of a batch input file."""

    line: int
    field: str | None
    message: str
    #: OpenAI's error code for the same problem (``invalid_json_line``, ``duplicate_custom_id``, ...).
    code: str = "invalid_request"

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class BatchInputError(OpenAIBatchError, ValueError):
    """A batch input file breaks the Batch API's rules; raised before anything is uploaded or paid for."""

    def __init__(self, source: str, issues: list[InputIssue], *, more: int = 0) -> None:
        self.source = source
        self.issues = issues
        self.more = more
        lines = [f"{source}: {len(issues) + more} problem(s) in the batch input file:"]
        lines += [f"  {source}:{issue}" for issue in issues]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.issues), {"more": self.more})

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        self.more = (state or {}).get("more", 0)


class BatchFailedError(OpenAIBatchError):
    """The batch ended in a state the task's outcome policy does not accept."""

    def __init__(self, message: str, summary: BatchSummary | None = None) -> None:
        self.summary = summary
        super().__init__(message)


class BatchQueueFullError(BatchFailedError):
    """
    OpenAI refused the batch because the model's enqueued-token (or request) queue for the organization was full
    (``token_limit_exceeded``). Nothing ran and nothing was charged. ``model``, ``limit`` and ``unit`` are what
    OpenAI's message names.
    """

    def __init__(
        self, message: str, summary: BatchSummary | None = None, *, model: str | None, limit: int | None, unit: str
    ) -> None:
        self.model, self.limit, self.unit = model, limit, unit
        queue = f"{limit:,} enqueued {unit}" if limit is not None else "its enqueued-token limit"
        text = (
            f"{message}\nThe queue of {model or 'the model'} is full ({queue}); the batch was refused "
            "(token_limit_exceeded) and not charged. Send it again once running batches end: create with "
            "wait_for_completion=True (it creates again when there is room), keep mapped creates within the queue "
            "with an Airflow pool, or use OpenAIBatchJobOperator / @task.openai_batch, which schedules within it."
        )
        super().__init__(text, summary)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_queue_error, (str(self), self.summary, self.model, self.limit, self.unit))


def _rebuild_queue_error(text: str, summary: Any, model: str | None, limit: int | None, unit: str) -> Any:
    error = BatchQueueFullError.__new__(BatchQueueFullError)
    Exception.__init__(error, text)
    error.summary, error.model, error.limit, error.unit = summary, model, limit, unit
    return error


class CostBudgetError(OpenAIBatchError):
    """The job's cost estimate (or its spend so far) is over ``max_cost``: nothing more was sent."""


class BatchTimeoutError(BatchFailedError, AirflowSensorTimeout):
    """The batch did not end before the task's absolute deadline (a sensor timeout, so ``soft_fail`` applies)."""


class DownloadMismatchError(OpenAIBatchError):
    """The downloaded result files do not hold as many lines as the batch says it processed."""


class BatchNotEndedError(OpenAIBatchError):
    """
    A download was asked for a batch that has not ended: its files are not final (or do not exist yet).

    Usually a wait upstream was marked successful, or a batch id was passed straight from create. The batch is
    left alone; retry the download once the batch has ended (or wait for it with ``OpenAIBatchSensor``).
    """

    def __init__(self, batch_id: str, status: str) -> None:
        self.batch_id, self.status = batch_id, status
        super().__init__(
            f"Batch {batch_id} is {status!r}, not ended: its result files are not final, so nothing was "
            "downloaded. Wait for it (OpenAIBatchSensor) before downloading, or retry this task once it has ended."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.batch_id, self.status))


class APIErrorPayload(TypedDict):
    """An ``OpenAIBatchAPIError`` as JSON (a trigger event carries it; the task raises it again when it resumes)."""

    operation: str
    message: str
    status_code: int | None
    request_id: str | None
    code: str | None


def api_error_payload(error: OpenAIBatchAPIError) -> APIErrorPayload:
    return APIErrorPayload(
        operation=error.operation,
        message=error.message,
        status_code=error.http_status,
        request_id=error.request_id,
        code=error.code,
    )


def api_error_from_payload(payload: APIErrorPayload) -> OpenAIBatchAPIError:
    """The same error the trigger gave up on: a deferred wait fails as a blocking one does."""
    return _rebuild_api_error(
        payload["operation"], payload["message"], payload["status_code"], payload["request_id"], payload["code"]
    )
