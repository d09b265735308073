"""
The one place that decides what a Batch status means.

The sensor, the trigger, the create and cancel operators and the download all ask this module, so "is it
done?", "did it work?" and "what do we tell the user?" have one answer. ``completed`` is not the same as
success: a batch whose every request failed is still ``completed`` at OpenAI, and the official provider's
treating it as success is how failed nightly jobs go unnoticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypedDict, get_args

import msgspec
from openai.types import BatchError, BatchUsage

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
#: Ended without output: a new batch is the only way forward, so an idempotent create may make one.
DEAD_STATUSES = frozenset({"failed", "expired", "cancelled"})
#: Still working towards its results: an earlier try's batch in one of these can be waited for again.
#: ``cancelling`` is not here: a dying batch ends ``cancelled`` whatever we do, so waiting for it again only
#: turns the re-run into a failure (a clear that cancelled the batch, then a re-run that waited for it).
WORKING_STATUSES = frozenset({"validating", "in_progress", "finalizing"})


class RequestCounts(TypedDict):
    """A batch's ``request_counts``; a server that omits one reports 0 here."""

    total: int
    completed: int
    failed: int


class BatchSummary(TypedDict):
    """
    What we keep of OpenAI's Batch object: what the trigger yields, the sensor and cancel return, and the download
    starts from (the create operator returns the batch id). JSON-able: it travels through XCom and trigger events.
    """

    batch_id: str
    status: str
    endpoint: str | None
    model: str | None
    input_file_id: str | None
    #: ``None`` (not ``""``) when the batch has no such file.
    output_file_id: str | None
    error_file_id: str | None
    request_counts: RequestCounts
    #: The batch's ``usage`` as the SDK's ``BatchUsage.model_dump()``; ``None`` where the server sends none.
    usage: dict[str, Any] | None
    #: ``errors.data`` (validation errors of a ``failed`` batch), each as ``BatchError.model_dump()``.
    errors: list[dict[str, Any]]


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def ended_clean(summary: BatchSummary) -> bool:
    """Ended with every request answered: ``completed`` and none failed (nothing to resend from it)."""
    return summary["status"] == "completed" and not summary["request_counts"]["failed"]


def is_reusable(status: str) -> bool:
    """
    An earlier batch in this status may stand in for a new one (a retry must not pay twice), subject to
    ``reuse_verdict``: working batches and ``completed`` ones, never ``cancelling`` or an ended-without-output one.
    An unknown status is not reused either: we cannot tell whether it will ever produce results.
    """
    return status in WORKING_STATUSES or status == "completed"


def can_survive_a_race(status: str) -> bool:
    """
    When two tries of one task instance each created a batch, a batch in this status may be the one that keeps
    running: not dead, and not already being cancelled (by its own try settling the race, or by a user).
    """
    return status not in DEAD_STATUSES and status != "cancelling"


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _plain(value: Any) -> Any:
    """A pydantic model (SDK type) or plain value as JSON-able data."""
    if value is None:
        return None
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json", exclude_unset=False)
    return value


def summarize(batch: Any) -> BatchSummary:
    """The JSON-able batch summary that the sensor, cancel and download operators push to XCom."""
    counts = _get(batch, "request_counts")
    errors = _get(batch, "errors")
    error_data = _get(errors, "data") if errors is not None else None
    return {
        "batch_id": _get(batch, "id"),
        "status": _get(batch, "status"),
        "endpoint": _get(batch, "endpoint"),
        "model": _get(batch, "model"),
        "input_file_id": _get(batch, "input_file_id") or None,
        "output_file_id": _get(batch, "output_file_id") or None,
        "error_file_id": _get(batch, "error_file_id") or None,
        "request_counts": {
            "total": int(_get(counts, "total", 0) or 0),
            "completed": int(_get(counts, "completed", 0) or 0),
            "failed": int(_get(counts, "failed", 0) or 0),
        },
        "usage": _plain(_get(batch, "usage")),
        "errors": [_plain(item) for item in (error_data or [])],
    }


# --- the same summary, read straight from a Batch answer's JSON (what the trigger does on every poll) -------------


class _Counts(msgspec.Struct, gc=False):
    total: int | None = None
    completed: int | None = None
    failed: int | None = None


class _Errors(msgspec.Struct):
    data: list[dict[str, Any]] | None = None


class _BatchAnswer(msgspec.Struct):
    """The fields of OpenAI's Batch object a summary needs; msgspec skips the rest of the answer without building it."""

    id: str
    status: str
    endpoint: str | None = None
    model: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: _Counts | None = None
    usage: dict[str, Any] | None = None
    errors: _Errors | None = None


_answer_decoder = msgspec.json.Decoder(_BatchAnswer)


def _dump_fields(model: Any) -> dict[str, Any]:
    """A pydantic model's declared fields, each with its own nested fields when it holds another model."""
    tree: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        nested = [t for t in (info.annotation, *get_args(info.annotation)) if hasattr(t, "model_fields")]
        tree[name] = _dump_fields(nested[0]) if nested else None
    return tree


#: Read from the SDK's own types, so the summary keeps matching ``model_dump`` when an SDK release adds a field.
_USAGE_FIELDS = _dump_fields(BatchUsage)
_ERROR_FIELDS = _dump_fields(BatchError)


def _as_dumped(value: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """A JSON object as the SDK's ``model_dump`` returns it: declared fields (``None`` when absent), then extras."""
    out: dict[str, Any] = {}
    for name, nested in fields.items():
        item = value.get(name)
        out[name] = _as_dumped(item, nested) if nested is not None and isinstance(item, dict) else item
    for name, item in value.items():
        if name not in fields:
            out[name] = item
    return out


def summarize_json(content: bytes) -> BatchSummary | None:
    """
    ``summarize(batch)`` from the raw JSON of a Batch answer, without building the SDK's model.

    A waiting trigger needs status, counts and file ids on every poll; building and dumping the SDK's full
    pydantic ``Batch`` for that cost as much CPU as the HTTP request itself. ``None`` when the answer does not
    have the documented shape (a field of another type, not JSON at all): the caller then lets the SDK's model
    read it, so odd answers from compatible servers are summarized exactly as before.
    """
    try:
        answer = _answer_decoder.decode(content)
    except msgspec.DecodeError:  # also msgspec.ValidationError
        return None
    counts = answer.request_counts or _NO_COUNTS
    return {
        "batch_id": answer.id,
        "status": answer.status,
        "endpoint": answer.endpoint,
        "model": answer.model,
        "input_file_id": answer.input_file_id or None,
        "output_file_id": answer.output_file_id or None,
        "error_file_id": answer.error_file_id or None,
        "request_counts": {
            "total": counts.total or 0,
            "completed": counts.completed or 0,
            "failed": counts.failed or 0,
        },
        "usage": None if answer.usage is None else _as_dumped(answer.usage, _USAGE_FIELDS),
        "errors": [_as_dumped(item, _ERROR_FIELDS) for item in (answer.errors.data or [])] if answer.errors else [],
    }


_NO_COUNTS = _Counts()


class LineRange(NamedTuple):
    """How many lines a result file of an ended batch holds: at least ``least``, at most ``most``."""

    least: int
    most: int

    def holds(self, lines: int) -> bool:
        return self.least <= lines <= self.most

    def __str__(self) -> str:
        return f"{self.least:,}" if self.least == self.most else f"{self.least:,} to {self.most:,}"


def expected_result_lines(summary: BatchSummary) -> dict[str, LineRange] | None:
    """
    How many lines the ``output`` and ``error`` files of an ended batch hold; ``None`` when the batch reports no
    counts (some compatible servers) or has no result files (``failed``).

    The output file holds one line per request counted ``completed`` (whatever the status). The error file holds one
    per request counted ``failed`` and, for ``expired`` / ``cancelled`` batches, one per request that never ran
    (``batch_expired`` / ``batch_cancelled``), which OpenAI does *not* count as failed: a real expired batch reports
    total 10, completed 1, failed 0 with one output line and nine error lines. A server that counts unrun requests
    as failed, or leaves them out of the error file, lands inside the same ranges.
    """
    counts = summary["request_counts"]
    total, completed, failed = counts["total"], counts["completed"], counts["failed"]
    status = summary["status"]
    if status not in ("completed", "expired", "cancelled") or not (total or completed or failed):
        return None
    unrun = max(0, total - completed - failed) if status != "completed" else 0
    return {"output": LineRange(completed, completed), "error": LineRange(failed, failed + unrun)}


def format_progress(summary: BatchSummary) -> str:
    """``12,345/50,000 done (24.7 %), 12 failed`` — what the trigger logs when counts change."""
    counts = summary["request_counts"]
    total, completed, failed = counts["total"], counts["completed"], counts["failed"]
    done = completed + failed
    percent = f" ({100.0 * done / total:.1f} %)" if total else ""
    return f"batch {summary['batch_id']} {summary['status']}: {done:,}/{total:,} done{percent}, {failed:,} failed"


def format_job_progress(summaries: list[BatchSummary], label: str = "") -> str:
    """``round 1: 2/3 batches ended, 70,000/120,000 requests done (58.3 %), 12 failed`` for the task log."""
    ended = sum(1 for s in summaries if is_terminal(s["status"]))
    total = sum(s["request_counts"]["total"] for s in summaries)
    failed = sum(s["request_counts"]["failed"] for s in summaries)
    done = sum(s["request_counts"]["completed"] for s in summaries) + failed
    percent = f" ({100.0 * done / total:.1f} %)" if total else ""
    prefix = f"{label}: " if label else ""
    return (
        f"{prefix}{ended}/{len(summaries)} batches ended, {done:,}/{total:,} requests done{percent}, {failed:,} failed"
    )


def progress_key(summary: BatchSummary) -> tuple[Any, ...]:
    """What must change for progress to be worth a log line."""
    counts = summary["request_counts"]
    return (summary["status"], counts["total"], counts["completed"], counts["failed"])


@dataclass(frozen=True)
class OutcomePolicy:
    """
    Which ended batches count as a task success.

    ``max_failed_requests`` / ``max_failed_ratio``: a completed batch with failed requests fails the task only
    past these (either one exceeded is enough). With neither set, the task fails only when every request
    failed, and otherwise succeeds with a warning, because the error file is downloaded and joinable.
    ``accept_expired`` / ``accept_cancelled``: keep the partial results of an expired or cancelled batch
    as a success (with a warning) instead of failing.
    """

    max_failed_requests: int | None = None
    max_failed_ratio: float | None = None
    accept_expired: bool = False
    accept_cancelled: bool = False

    def __post_init__(self) -> None:
        if self.max_failed_ratio is not None and not 0.0 <= self.max_failed_ratio <= 1.0:
            raise ValueError(f"max_failed_ratio must be between 0 and 1, got {self.max_failed_ratio}")
        if self.max_failed_requests is not None and self.max_failed_requests < 0:
            raise ValueError(f"max_failed_requests must be >= 0, got {self.max_failed_requests}")


@dataclass(frozen=True)
class Outcome:
    """The verdict on an ended batch: ``ok`` decides the task, ``warning`` is logged either way."""

    ok: bool
    message: str
    warning: bool = False


@dataclass(frozen=True)
class ReuseVerdict:
    """Whether an earlier try's batch may stand in for a new one, and why (logged either way)."""

    reuse: bool
    reason: str


def reuse_verdict(summary: BatchSummary, policy: OutcomePolicy, *, allow_completed: bool) -> ReuseVerdict:
    """
    May the batch an earlier try made be used instead of creating one?

    A working batch: yes (creating another would pay twice for the same work). ``cancelling`` and the ended-
    without-output statuses: no. ``completed``: only when ``allow_completed`` and the task's outcome policy
    accepts it, so a retry of a task that failed on its batch's failed requests makes a new batch instead of
    failing again on the same one forever.
    """
    status, batch_id = summary["status"], summary["batch_id"]
    if status in WORKING_STATUSES:
        return ReuseVerdict(True, f"batch {batch_id} is still {status}")
    if status != "completed":
        return ReuseVerdict(False, f"batch {batch_id} is {status} and will not produce (more) results")
    if not allow_completed:
        return ReuseVerdict(False, f"batch {batch_id} already completed and this task was cleared to run again")
    outcome = evaluate(summary, policy)
    if not outcome.ok:
        return ReuseVerdict(False, f"batch {batch_id} completed but fails this task's outcome policy")
    return ReuseVerdict(True, f"batch {batch_id} completed and passes this task's outcome policy")


def _format_errors(errors: list[dict[str, Any]], limit: int = 10) -> str:
    lines = []
    for error in errors[:limit]:
        where = f"line {error.get('line')}" if error.get("line") is not None else "file"
        param = f", field '{error.get('param')}'" if error.get("param") else ""
        lines.append(f"  {where}{param}: [{error.get('code')}] {error.get('message')}")
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def _over_limits(
    failed: int, ratio: float, max_requests: int | None, max_ratio: float | None, kind: str = "failed"
) -> list[str]:
    """Which limits ``failed`` requests (a ``ratio`` of all) exceed: one rule for batches and jobs."""
    over = []
    if max_requests is not None and failed > max_requests:
        over.append(f"more than max_{kind}_requests={max_requests}")
    if max_ratio is not None and ratio > max_ratio:
        over.append(f"more than max_{kind}_ratio={max_ratio}")
    return over


def evaluate(summary: BatchSummary, policy: OutcomePolicy) -> Outcome:
    """Decide whether an ended batch is a task success under ``policy``."""
    status = summary["status"]
    batch_id = summary["batch_id"]
    counts = summary["request_counts"]
    total, failed = counts["total"], counts["failed"]
    if status == "completed":
        if not failed:
            return Outcome(True, f"Batch {batch_id} completed: {counts['completed']:,}/{total:,} requests succeeded.")
        ratio = failed / total if total else 1.0
        text = f"Batch {batch_id} completed with {failed:,} of {total:,} requests failed ({100.0 * ratio:.1f} %)"
        over = _over_limits(failed, ratio, policy.max_failed_requests, policy.max_failed_ratio)
        if policy.max_failed_requests is None and policy.max_failed_ratio is None and failed >= total:
            over.append("every request failed")
        if over:
            return Outcome(False, f"{text}: {' and '.join(over)}. Failed requests are in the error file.")
        return Outcome(True, f"{text}; within the allowed failures. Failed requests are in the error file.", True)
    if status == "failed":
        errors = summary.get("errors") or []
        detail = _format_errors(errors) if errors else "  (no error details returned)"
        return Outcome(False, f"Batch {batch_id} failed:\n{detail}")
    if status in ("expired", "cancelled"):
        accepted = policy.accept_expired if status == "expired" else policy.accept_cancelled
        flag = "accept_expired" if status == "expired" else "accept_cancelled"
        text = (
            f"Batch {batch_id} {status} with {counts['completed']:,} of {total:,} requests completed; "
            "partial results are kept in its output file, requests that never ran in its error file"
        )
        if accepted:
            return Outcome(True, f"{text} ({flag}=True).", True)
        return Outcome(False, f"{text}. Set {flag}=True to accept partial results.")
    return Outcome(False, f"Batch {batch_id} is not finished (status {status!r}).")


# --- the account's enqueued-token queue ----------------------------------------------------------------

#: The error code OpenAI gives a batch refused because the model's queue is full (at the end of validation), and
#: Azure's global batch gives ``batches.create`` (HTTP 400) for the same reason.
QUEUE_ERROR_CODE = "token_limit_exceeded"
_LIMIT = re.compile(r"Limit:\s*([\d,._]+)\s*(?:enqueued\s+)?(tokens?|requests?)?", re.IGNORECASE)
_AZURE_LIMIT = re.compile(r"limit of\s*([\d,.]+)\s*([KMB]?)", re.IGNORECASE)
_SCALE = {"": 1, "K": 1_000, "M": 1_000_000, "B": 1_000_000_000}


@dataclass(frozen=True)
class QueueRefusal:
    """
    A batch refused because the model's enqueued-token (or request) queue was full: not a failed request, and not
    charged. ``limit`` is what OpenAI's message says the queue holds (``Limit: 2,000,000 enqueued tokens``), when it
    says; ``unit`` is ``"tokens"`` or ``"requests"`` (embeddings queues count requests).
    """

    message: str
    limit: int | None
    unit: Literal["tokens", "requests"]
    model: str | None = None


def read_queue_refusal(message: str, model: str | None = None) -> QueueRefusal:
    """What a queue refusal's message says about the limit (OpenAI's ``Limit: N ...`` or Azure's ``limit of 30K``)."""
    found = _LIMIT.search(message or "")
    if found:
        digits = re.sub(r"[^\d]", "", found.group(1))
        unit: Literal["tokens", "requests"] = (
            "requests" if (found.group(2) or "").lower().startswith("request") else "tokens"
        )
        return QueueRefusal(message, int(digits) if digits else None, unit, model)
    found = _AZURE_LIMIT.search(message or "")
    if found:
        number = float(found.group(1).replace(",", ""))
        return QueueRefusal(message, int(number * _SCALE[found.group(2).upper()]), "tokens", model)
    return QueueRefusal(message, None, "tokens", model)


def failed_as_a_whole(summary: BatchSummary) -> bool:
    """
    The batch ran nothing because OpenAI refused all of it (its input, at validation): no request result to
    collect, and sending it again as it is would fail the same way. A queue refusal is this too; ask
    ``queue_refusal`` first, it is the one that waits and goes again.
    """
    return summary["status"] == "failed"


def queue_refusal(summary: BatchSummary) -> QueueRefusal | None:
    """The refusal when ``summary`` is a batch that failed for the queue (``token_limit_exceeded``), else ``None``."""
    if summary["status"] != "failed":
        return None
    for error in summary.get("errors") or []:
        if error.get("code") == QUEUE_ERROR_CODE:
            return read_queue_refusal(str(error.get("message") or ""), summary.get("model"))
    return None


def is_queue_refusal_code(code: str | None) -> bool:
    """Whether an API error's code means the queue is full (Azure refuses ``batches.create`` with it)."""
    return code == QUEUE_ERROR_CODE


@dataclass(frozen=True)
class JobPolicy:
    """
    Which ended jobs (every attempt made, the result written) count as a task success.

    Requests that never ran (``missing``, ``expired``, ``cancelled``) after the last attempt fail the task unless
    allowed: at most ``max_unrun_requests`` of them, or a ``max_unrun_ratio`` share (default: none). Requests that
    ran and failed follow ``max_failed_requests`` / ``max_failed_ratio``; with neither set, they fail the task
    only when no request succeeded.
    """

    max_failed_requests: int | None = None
    max_failed_ratio: float | None = None
    max_unrun_requests: int | None = 0
    max_unrun_ratio: float | None = None

    def __post_init__(self) -> None:
        OutcomePolicy(max_failed_requests=self.max_failed_requests, max_failed_ratio=self.max_failed_ratio)
        OutcomePolicy(max_failed_requests=self.max_unrun_requests, max_failed_ratio=self.max_unrun_ratio)


#: Request statuses of requests that never ran.
UNRUN_STATUSES = ("missing", "expired", "cancelled")


def evaluate_job(counts: dict[str, int], policy: JobPolicy, reasons: list[str] | None = None) -> Outcome:
    """
    Decide whether a job whose requests ended with ``counts`` (by request status) is a task success. ``reasons``
    say why work did not run (a batch expired or was cancelled, a budget stopped submissions), quoted in the message.
    """
    total = sum(counts.values())
    succeeded = counts.get("succeeded", 0)
    unfinished = total - succeeded
    why = ("; why: " + " | ".join(dict.fromkeys(reasons))) if reasons else ""
    if not unfinished:
        return Outcome(True, f"All {total:,} requests succeeded.")
    ratio = unfinished / total if total else 1.0
    detail = ", ".join(f"{counts[k]:,} {k}" for k in counts if k != "succeeded" and counts[k])
    text = f"{unfinished:,} of {total:,} requests did not succeed ({100.0 * ratio:.1f} %: {detail})"
    unrun = sum(counts.get(k, 0) for k in UNRUN_STATUSES)
    failed = unfinished - unrun
    over = _over_limits(failed, failed / total if total else 1.0, policy.max_failed_requests, policy.max_failed_ratio)
    if policy.max_failed_requests is None and policy.max_failed_ratio is None and not succeeded and failed:
        over.append("no request succeeded")
    if unrun:
        unrun_over = _over_limits(
            unrun, unrun / total if total else 1.0, policy.max_unrun_requests, policy.max_unrun_ratio, "unrun"
        )
        if unrun_over:
            over.append(
                f"{unrun:,} request(s) never ran ({', '.join(unrun_over)}; "
                "set max_unrun_requests or max_unrun_ratio to allow them)"
            )
    if over:
        return Outcome(False, f"{text}: {' and '.join(over)}{why}. The joined result holds every row.")
    return Outcome(True, f"{text}; within the allowed failures{why}. The joined result holds every row.", True)


# --- the cost budget ----------------------------------------------------------------------------------------------


def cost_verdict(estimated: dict[str, Any] | None, max_cost: float) -> Outcome:
    """
    May a job whose estimate is ``estimated`` (``estimate.Estimate["cost"]``: ``{currency, low, high}``) be sent
    under ``max_cost``? Only when its upper bound is known and within it: an unknown bound (no price for the model, or
    requests without an output cap) is refused too, since nothing then says the bill stays within the budget.
    """
    if estimated is None:
        return Outcome(False, f"max_cost={max_cost} needs a price for the model: the price table has none")
    high, currency = estimated.get("high"), estimated.get("currency", "USD")
    if high is None:
        return Outcome(
            False,
            f"max_cost={max_cost} {currency}: the cost has no upper bound (some requests set no output cap: "
            "max_completion_tokens / max_tokens / max_output_tokens); the estimate starts at "
            f"{estimated.get('low', 0):.4f} {currency}",
        )
    if high > max_cost:
        return Outcome(
            False,
            f"the estimate is {estimated.get('low', 0):.4f} to {high:.4f} {currency}, above max_cost={max_cost}",
        )
    return Outcome(True, f"the estimate is {estimated.get('low', 0):.4f} to {high:.4f} {currency}, within {max_cost}")


def spend_verdict(spent: float, projected: float, max_cost: float, currency: str = "USD") -> Outcome:
    """Mid-job: may more be submitted, having spent ``spent`` and with ``projected`` more to come from what runs?"""
    if spent + projected > max_cost:
        return Outcome(
            False,
            f"{spent:.4f} {currency} spent and about {projected:.4f} more running would pass max_cost={max_cost}",
        )
    return Outcome(True, f"{spent:.4f} {currency} spent of max_cost={max_cost}")
