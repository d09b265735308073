"""
OpenAIBatchJobOperator: a whole batch job in one task, scheduled within the model's enqueued-token queue.

Validate and shard → submit pieces while their estimated tokens fit the queue's budget (``scheduler``) → defer on one
trigger for the running batches, woken when one ends → collect what ended, resend its transient failures as a next
generation (``max_rounds``), submit what now fits → join every request to its result, in input order → the result at
``destination``. Built from the blocks: every batch is created by the one create path (``batches.CreatePath``: key,
``airflow_first_try``, reuse verdict, ``call_once``, settle, second look), uploads by ``uploads.upload_once``, what
a status means by ``batch_status``, the wait by the shared trigger base and poll policy, the kill policy by
``polling``. Nothing here talks to the SDK.

Crash safety: every batch carries its piece's idempotency key (found again through ``task_state_store`` or a scan),
and the work folder (``job_state.JobWorkFolder``) records each piece's step atomically, a create's intent included,
so a retry or a resume on another worker continues where the last one stopped and never creates a piece's batch
twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, TypedDict

import msgspec

from airflow_provider_openai_batch import batches as create_path
from airflow_provider_openai_batch import metrics, scheduler
from airflow_provider_openai_batch.batch_file import (
    MAX_BYTES_PER_FILE,
    MAX_REQUESTS_PER_FILE,
    OPENAI_BATCH_ENDPOINTS,
    ShardLimits,
    encode_requests,
    estimate_tokens,
    iter_lines,
    shard_batch_file,
)
from airflow_provider_openai_batch.batch_status import (
    JobPolicy,
    OutcomePolicy,
    RequestCounts,
    cost_verdict,
    ended_clean,
    evaluate_job,
    failed_as_a_whole,
    is_queue_refusal_code,
    is_terminal,
    queue_refusal,
    read_queue_refusal,
    spend_verdict,
    summarize,
)
from airflow_provider_openai_batch.batches import REUSE_MODES, BatchWork, CreatePath, ReuseMode, SiblingLook
from airflow_provider_openai_batch.estimate import Estimate, estimate_file
from airflow_provider_openai_batch.exceptions import (
    BatchFailedError,
    BatchInputError,
    CostBudgetError,
    InputIssue,
    OpenAIBatchAPIError,
    OpenAIBatchError,
    api_error_from_payload,
)
from airflow_provider_openai_batch.idempotency import DEFAULT_LOOKBACK, idempotency_key, task_identity
from airflow_provider_openai_batch.job_state import JobState, JobWorkFolder, Piece
from airflow_provider_openai_batch.links.openai_batch import OpenAIBatchLink
from airflow_provider_openai_batch.operators.base import (
    OpenAIBatchBaseOperator,
    deadline_end_time,
    is_request_data,
)
from airflow_provider_openai_batch.outputs import (
    ROW_STATUSES,
    OutputSchemaConflict,
    apply_output_schema,
    prompt_item,
    prompt_request,
    response_format,
    with_max_tokens,
)
from airflow_provider_openai_batch.outputs import output_schema as make_output_schema
from airflow_provider_openai_batch.parquet import columns as parquet_columns
from airflow_provider_openai_batch.polling import (
    DEFAULT_MAX_POLL_FAILURES,
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    PollFailures,
    PollPolicy,
    defer_timeout,
)
from airflow_provider_openai_batch.results import (
    USAGE_KEYS,
    estimate_cost,
    iter_joined,
    iter_merged,
    normalize_usage,
    sum_usage,
    write_joined,
    write_retry_input,
)
from airflow_provider_openai_batch.storage import Source, atomic_writer, describe, remove_tree, to_storage_path
from airflow_provider_openai_batch.tokens import queue_tokens
from airflow_provider_openai_batch.triggers.job import (
    EVENT_ENDED,
    EVENT_TIMEOUT,
    EVENT_WAKE,
    JobEventPayload,
    OpenAIBatchJobTrigger,
)
from airflow_provider_openai_batch.uploads import upload_once

REQUEST_STATUSES = ("succeeded", "failed", "expired", "cancelled", "missing")
#: Typed statuses a user may choose to send again (``resend_statuses``).
RESENDABLE_STATUSES = ("invalid_output", "truncated", "refused")
#: The file request dicts (and prompts) are written to before the job validates and shards them.
_WRITTEN_REQUESTS = "requests-of-the-task.jsonl"


class JobDeadlineError(OpenAIBatchError):
    """
    A batch of the job passed its deadline and ``cancel_on_timeout`` is off: the task fails so that Airflow retries
    it (not a sensor timeout); the retry collects the batch's output once it has ended.
    """


class JobSupersededError(OpenAIBatchError):
    """
    Another try of this task took the job's work folder over while this one still ran (an orphaned try whose
    worker Airflow gave up on): this try stops before creating anything, so the two never pay twice.
    """


class JobBatch(TypedDict):
    #: 0 for the input's own pieces, 1 for the first resubmission of their transient failures, ...
    round: int
    #: The input shard the piece comes from (``part`` when the shard was cut to fit the queue: ``"00003-01"``).
    shard: int
    part: str
    batch_id: str
    status: str
    request_counts: RequestCounts


class JobResult(TypedDict, total=False):
    """What the job returns (XCom): DESIGN.md's job contract."""

    joined_uri: str
    counts: dict[str, int]
    batches: list[JobBatch]
    rounds: int
    usage_totals: dict[str, int]
    cost_estimate: dict[str, Any] | None
    queue_refusals: int


class OpenAIBatchJobOperator(OpenAIBatchBaseOperator):
    """
    Run a whole batch job in one task: shard, submit within the model's queue, wait (deferred, one trigger for all
    running batches), collect, resend transient failures, join in input order, and write the result.

    :param source: A local path, a URI or ``ObjectStoragePath`` of a JSONL batch input, or request dicts (a list or
        any iterable, e.g. a generator, streamed to disk as it is read). Request dicts are data, never templates.
    :param endpoint: The batch endpoint (``/v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``, ...).
    :param destination: Where the joined result goes: JSONL, or Parquet when it ends in ``.parquet`` (needs the
        ``parquet`` extra, checked before anything is sent). One row per input request, in input order. A mapped
        task instance writes to ``<folder>/<map_index>/<name>``, so mapped jobs never overwrite each other.
    :param work_dir: Where the job keeps its pieces and downloads until it ends (default: a hidden folder beside
        ``destination``, one per run of tries). Put it on storage every worker reaches (as an object store is) so a
        resume on another worker continues from it.
    :param keep_work_dir: Keep the work folder after success (for inspection); by default it is removed.
    :param max_enqueued_tokens: The model's enqueued-token queue for your organization (OpenAI's batch queue limit,
        e.g. 2,000,000 for gpt-4o-mini at tier 1): the job keeps its running batches' estimated tokens within it and
        cuts shards to fit. Without it the job learns the limit from OpenAI's first ``token_limit_exceeded`` refusal.
    :param max_enqueued_requests: The same for a request-counted queue (embeddings).
    :param max_rounds: Submissions of a request in all, the first included: ``2`` sends the requests that failed for
        a transient reason (429, 5xx, ``request_timeout``, expired, cancelled, never answered) once more. A queue
        refusal is not a round: a refused piece waits for capacity and is sent again.
    :param max_failed_requests: Fail the task when more requests than this ran and failed (the joined result is
        written first, so nothing is lost). ``max_failed_ratio``: the same as a share of all requests (0..1). With
        neither set, failed requests fail the task only when no request succeeded.
    :param max_unrun_requests: Requests that never ran (expired, cancelled, missing) allowed after the last round;
        default 0: a job is never green with work that was not done. ``max_unrun_ratio``: as a share.
    :param reuse: What a re-run after a *clear* may use instead of a new batch, as for ``OpenAIBatchCreateOperator``
        (``"active"``: batches still running; ``"active_or_completed"``; ``"never"``). A clear calls the source
        again (the function of ``@task.openai_batch``); a retry continues the run of tries' work.
    :param price_table: ``{model: {"input": $, "cached_input": $, "output": $}}`` per million tokens (batch
        prices), for ``cost_estimate``, ``dry_run``'s cost range and ``max_cost``.
    :param output_schema: A Pydantic model class or a JSON Schema dict (OpenAI's strict structured outputs, checked
        when the DAG is parsed): put into every request as the endpoint expects (chat ``response_format``, responses
        ``text.format``; a request that sets another is refused naming its line), and each succeeded row is parsed
        and validated into ``output`` with the finer statuses ``invalid_output``, ``refused`` and ``truncated``
        (docs/typed-results.md). A ``.parquet`` destination gets one typed column per field.
    :param resend_statuses: Typed statuses whose requests are sent again like transient failures, while
        ``max_rounds`` allows: any of ``"invalid_output"``, ``"truncated"``, ``"refused"``. Default none: they would
        likely come back the same way (raise the output cap before resending ``truncated``).
    :param extract: Without a schema, still give each row ``output``: the text of chat / responses / completions,
        the vector of embeddings, flagged and categories of moderations.
    :param model: With prompts as the source (strings, message lists, ``(key, prompt)`` pairs, as lists too after
        XCom, or ``{"key": ..., "prompt": ...}`` rows): the model of every request; ``system_prompt`` is sent before
        each prompt on chat completions; ``max_tokens`` caps each answer under the endpoint's own field
        (``max_completion_tokens``, ``max_output_tokens`` or ``max_tokens``); ``request_params`` (e.g.
        ``{"temperature": 0}``) go into every request body. Custom ids come from the key, or the prompt's position
        (``prompt-000042``), so joins and resubmission still work.
    :param dry_run: Validate, shard and estimate (``estimate.Estimate``: requests, shards, tokens counted with the
        model's tokenizer, output caps, queue fills under the budget, a cost range) and return it without sending
        anything.
    :param max_cost: Refuse to send a job whose estimated upper cost is above this (before any upload); while it
        runs, stop submitting once the spend so far and what runs would pass it (what never ran then fails the job
        as unrun). Needs ``price_table``. ``cancel_on_budget``: also cancel what runs when the budget is passed.

    Upload options as ``OpenAIBatchUploadOperator`` (``allowed_endpoints``, ``expires_after``, ``reuse_window``,
    ``max_requests_per_file``, ``max_bytes_per_file``, ``max_tokens_per_file``), create options as
    ``OpenAIBatchCreateOperator`` (``completion_window``, ``metadata``, ``output_expires_after``, ``lookback``,
    ``reuse``) and waiting options as the sensor (``poll_interval``, ``max_poll_interval``, ``deadline`` per batch
    from its creation, ``deferrable``, ``cancel_on_timeout``, ``cancel_on_kill``, ``max_poll_failures``). What
    retry, clear, mark success, mark failed and a deadline do: docs/lifecycle.md.

    Returns ``{joined_uri, counts: {succeeded, failed, expired, cancelled, missing}, batches, rounds, usage_totals,
    queue_refusals[, cost_estimate]}``.
    """

    template_fields: Sequence[str] = ("source", "endpoint", "destination", "work_dir", "metadata", "conn_id")
    template_fields_renderers = {"metadata": "json"}
    operator_extra_links = (OpenAIBatchLink(),)

    def __init__(
        self,
        *,
        source: Any = None,
        endpoint: str,
        destination: Any,
        work_dir: Any = None,
        keep_work_dir: bool = False,
        allowed_endpoints: Collection[str] | None = OPENAI_BATCH_ENDPOINTS,
        expires_after: timedelta | int | None = None,
        reuse_window: timedelta = DEFAULT_LOOKBACK,
        max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
        max_bytes_per_file: int = MAX_BYTES_PER_FILE,
        max_tokens_per_file: int | None = None,
        max_enqueued_tokens: int | None = None,
        max_enqueued_requests: int | None = None,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        output_expires_after: timedelta | int | None = None,
        lookback: timedelta = DEFAULT_LOOKBACK,
        reuse: ReuseMode | str = "active",
        max_rounds: int = 2,
        max_failed_requests: int | None = None,
        max_failed_ratio: float | None = None,
        max_unrun_requests: int | None = 0,
        max_unrun_ratio: float | None = None,
        price_table: dict[str, dict[str, float]] | None = None,
        output_schema: Any = None,
        resend_statuses: Collection[str] = (),
        extract: bool = False,
        model: str | None = None,
        system_prompt: str | None = None,
        request_params: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        dry_run: bool = False,
        max_cost: float | None = None,
        cancel_on_budget: bool = False,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | None = DEFAULT_MAX_POLL_INTERVAL,
        deadline: timedelta | float | None = None,
        deferrable: bool | None = None,
        cancel_on_timeout: bool = True,
        cancel_on_kill: bool = True,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from airflow_provider_openai_batch.operators.openai_batch import _as_seconds, _expiry

        if max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
        if reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {', '.join(REUSE_MODES)}; got {reuse!r}")
        if max_enqueued_tokens is not None and max_enqueued_requests is not None:
            raise ValueError("give max_enqueued_tokens or max_enqueued_requests, not both")
        for name, value in (
            ("max_enqueued_tokens", max_enqueued_tokens),
            ("max_enqueued_requests", max_enqueued_requests),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.source = source
        self.endpoint = endpoint
        self.destination = destination
        self.work_dir = work_dir
        self.keep_work_dir = keep_work_dir
        self.allowed_endpoints = allowed_endpoints
        self.expires_after_seconds = _as_seconds(_expiry("expires_after", expires_after))
        self.reuse_window = reuse_window
        self.max_tokens_per_file = max_tokens_per_file
        self.max_enqueued_tokens = max_enqueued_tokens
        self.max_enqueued_requests = max_enqueued_requests
        # A declared budget cuts the shards at sharding: a shard larger than the whole queue could never run.
        token_caps = [t for t in (max_tokens_per_file, max_enqueued_tokens) if t is not None]
        self.limits = ShardLimits(
            min(max_requests_per_file, max_enqueued_requests or max_requests_per_file),
            max_bytes_per_file,
            min(token_caps) if token_caps else None,
        )
        self.completion_window = completion_window
        self.metadata = metadata
        self.output_expires_after_seconds = _as_seconds(_expiry("output_expires_after", output_expires_after))
        self.lookback = lookback
        self.reuse = reuse
        self.max_rounds = int(max_rounds)
        self.policy = JobPolicy(
            max_failed_requests=max_failed_requests,
            max_failed_ratio=max_failed_ratio,
            max_unrun_requests=max_unrun_requests,
            max_unrun_ratio=max_unrun_ratio,
        )
        if max_cost is not None and not price_table:
            raise ValueError("max_cost needs a price_table: {model: {'input': $, 'output': $}} per million tokens")
        if output_schema is not None:
            response_format(output_schema, endpoint)  # a schema strict mode refuses, or a wrong endpoint: now
            if str(destination).endswith(".parquet"):
                parquet_columns(make_output_schema(output_schema))  # field names the typed columns reserve
        self.output_schema = output_schema
        unknown = set(resend_statuses) - set(RESENDABLE_STATUSES)
        if unknown:
            raise ValueError(
                f"resend_statuses may hold {', '.join(RESENDABLE_STATUSES)}; got {', '.join(sorted(unknown))}"
            )
        if resend_statuses and output_schema is None and not extract:
            raise ValueError("resend_statuses needs output_schema= or extract=True: without them no row has those")
        self.resend_statuses = tuple(resend_statuses)
        self.extract = extract
        self.model = model
        self.system_prompt = system_prompt
        self.request_params = dict(request_params or {})
        self.max_tokens = max_tokens
        self.price_table = price_table
        self.estimate_only = dry_run  # BaseOperator.dry_run is a method of its own
        self.max_cost = max_cost
        self.cancel_on_budget = cancel_on_budget
        self.init_waiting(
            poll_interval, max_poll_interval, deadline, deferrable, cancel_on_timeout, cancel_on_kill, max_poll_failures
        )
        self._running: list[str] = []
        self._running_ti: Any = None
        self._owner = ""

    # --- entry points -------------------------------------------------------------------------------

    def execute(self, context: Mapping[str, Any]) -> Any:
        self._check_destination()
        if self.estimate_only:
            return self._dry_run(context)
        folder = self._work(context)
        self._owner = _owner_name(context)
        state = folder.load()
        if state is None:
            state = self._start(context, folder)
        else:
            self.log.info("Continuing the job from its work folder %s", folder.root)
        return self._advance(context, folder, self._own(context, folder, state))

    def execute_complete(self, context: Mapping[str, Any], event: JobEventPayload | None = None) -> JobResult:
        """Where the deferred wait resumes: the batches are read again, so the event only says why it woke."""
        folder = self._work(context)
        self._owner = _owner_name(context)
        state = folder.load()
        if state is None:
            raise BatchFailedError(f"The job's work folder {folder.root} is gone; clear the task to run it again")
        state = self._own(context, folder, state)
        status = event.get("status") if event else None
        if status == EVENT_TIMEOUT:
            self._on_deadline(folder, state, [str(b) for b in (event.get("batch_ids") if event else None) or []])
        elif status not in (EVENT_ENDED, EVENT_WAKE):
            if event and event.get("error"):  # polling gave up: the same error a blocking wait raises
                raise api_error_from_payload(event["error"])
            message = event.get("message") if event else None
            raise BatchFailedError(str(message or f"The job's trigger returned {event!r}"))
        return self._advance(context, folder, state)

    def _own(self, context: Mapping[str, Any], folder: JobWorkFolder, state: JobState) -> JobState:
        """This process now writes the folder: its name goes in, so an orphaned try that wrote before sees it, and its
        try marks the folder for good (``JobWorkFolder.mark_try``: what an earlier try's skipped settle relies on)."""
        folder.mark_try(_try_of(self._owner))
        state.owner = self._owner
        folder.save(state)
        return state

    def _save(self, folder: JobWorkFolder, state: JobState) -> None:
        """
        Write the state, unless a later try took the folder over since this one claimed it (``_own``): an orphaned
        try (its worker lost, Airflow already retrying) then stops here, before it creates or overwrites anything.
        An earlier try's name is written over: this try is the one Airflow runs now.
        """
        owner = folder.owner()
        if owner is None:
            raise JobSupersededError(
                f"{self.task_id}: the job's work folder {folder.root} is gone while this try ({self._owner}) still "
                "ran (another try finished the job and removed it, or it was deleted): this try stops here"
            )
        if owner != self._owner and _try_of(owner) >= _try_of(self._owner):
            raise JobSupersededError(
                f"{self.task_id}: another try of this task ({owner}) took over the job's work folder {folder.root} "
                f"while this one ({self._owner}) still ran: this try stops without creating anything"
            )
        state.owner = self._owner
        folder.save(state)

    def resolve_source(self, context: Mapping[str, Any]) -> Any:
        """The job's input; ``@task.openai_batch`` overrides this to call the decorated function."""
        if self.source is None:
            raise ValueError("source is required: a path, URI, ObjectStoragePath or a list of request dicts")
        return self.source

    def source_label(self) -> str:
        """How errors about the input name where it came from."""
        return f"{self.task_id}: source"

    def on_kill(self) -> None:
        """A blocking job stopped by the user: the same kill policy as the trigger's (``polling``)."""
        self.cancel_for_kill(list(self._running), self._running_ti)

    # --- where things go -------------------------------------------------------------------------------

    def _check_destination(self) -> None:
        """A Parquet destination needs pyarrow: said before anything is sent, not after every batch is paid."""
        if str(self.destination).endswith(".parquet"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError(
                    f"{self.task_id}: destination {self.destination} is Parquet, which needs pyarrow: "
                    "pip install 'airflow-provider-openai-batch[parquet]' (or write JSONL)"
                ) from None

    def _destination(self, context: Mapping[str, Any]) -> Any:
        """``destination``, or ``<folder>/<map_index>/<name>`` for a mapped task instance (as the download does)."""
        target = to_storage_path(self.destination)
        map_index = getattr(context["ti"], "map_index", -1)
        if map_index in (None, -1):
            return target
        return target.parent / str(map_index) / target.name

    def _work(self, context: Mapping[str, Any]) -> JobWorkFolder:
        """One folder per run of tries: a retry continues it, a re-run after a clear starts a new one."""
        from airflow_provider_openai_batch.idempotency import first_try

        first = first_try(context, self.retries)
        suffix = f".t{first}" if first is not None else ""
        # The task instance's identity (dag, task, run, map index): mapped instances and other runs never share one.
        tag = idempotency_key(task_identity(context), "job-work")[:12]
        if self.work_dir is not None:
            return JobWorkFolder(to_storage_path(self.work_dir) / f"{self.task_id}.{tag}{suffix}")
        target = self._destination(context)
        return JobWorkFolder(target.parent / f".{target.name}.{tag}{suffix}.work")

    # --- start: validate and shard once ------------------------------------------------------------

    def _start(self, context: Mapping[str, Any], folder: JobWorkFolder) -> JobState:
        state = JobState(started=time.time(), owner=self._owner)
        state.needs_lookup = getattr(context.get("ti"), "try_number", None) != 1
        if self.max_enqueued_tokens is not None:
            state.budget, state.budget_unit = self.max_enqueued_tokens, "tokens"
        elif self.max_enqueued_requests is not None:
            state.budget, state.budget_unit = self.max_enqueued_requests, "requests"
        with tempfile.TemporaryDirectory(prefix="openai-batch-job-") as scratch:
            source = self._materialized(context, Path(scratch))
            if self.max_cost is not None:
                self._check_budget(context, self._estimate(context, source))
            made = shard_batch_file(
                source,
                Path(scratch) / "shards",
                endpoint=self.endpoint,
                allowed_endpoints=self.allowed_endpoints,
                limits=self.limits,
                line_tokens=self._line_tokens(state),
            )
            for i, shard in enumerate(made):
                piece = Piece(0, f"{i:05d}", shard.requests, shard.bytes, shard.sha256, shard.tokens)
                self._copy(shard.path, folder.input(piece))
                state.pieces.append(piece)
        folder.save(state)  # the folder's first state: this try claims it
        total = sum(p.requests for p in state.pieces)
        self.log.info("Job: %s requests in %d shard(s)", f"{total:,}", len(state.pieces))
        return state

    def _materialized(self, context: Mapping[str, Any], scratch: Path) -> Source:
        """The source as something to read: request dicts (any iterable, a generator streamed) written to a file."""
        source: Any = self.resolve_source(context)
        if self.output_schema is not None and not is_request_data(source):
            source = _decoded_lines(source)  # each request of a file asks for the schema too
        if is_request_data(source):
            path = scratch / _WRITTEN_REQUESTS
            with path.open("wb") as out:
                out.writelines(encode_requests(self._requests(source)))  # type: ignore[arg-type]
            return path
        if not isinstance(source, (str, os.PathLike)) and getattr(source, "open", None) is None:
            raise TypeError(
                f"{self.source_label()} is a {type(source).__name__}; it may be request dicts (a list or any "
                "iterable of them), or a path, URI or ObjectStoragePath of a JSONL batch file"
            )
        return source

    def _estimate(self, context: Mapping[str, Any], source: Source) -> Estimate:
        # Request dicts written to scratch by _materialized are named after the task, not the temporary file.
        written = isinstance(source, Path) and source.name == _WRITTEN_REQUESTS
        estimated = estimate_file(
            source,
            self.endpoint,
            self.price_table,
            self.max_enqueued_tokens,
            limits=self.limits,
            allowed_endpoints=self.allowed_endpoints,
            completion_window=self.completion_window,
            name=self.source_label() if written else None,
        )
        self.report_estimate(context, estimated, self.endpoint)
        return estimated

    def _dry_run(self, context: Mapping[str, Any]) -> Estimate:
        """Validate, shard and estimate; nothing is uploaded or created."""
        with tempfile.TemporaryDirectory(prefix="openai-batch-dry-run-") as scratch:
            estimated = self._estimate(context, self._materialized(context, Path(scratch)))
        if self.max_cost is not None:
            verdict = cost_verdict(dict(estimated["cost"]) if estimated["cost"] else None, self.max_cost)
            self.log.info("Budget: %s", verdict.message)
        self.log.info("Dry run: nothing was sent")
        return estimated

    def _check_budget(self, context: Mapping[str, Any], estimated: Estimate) -> None:
        assert self.max_cost is not None
        verdict = cost_verdict(dict(estimated["cost"]) if estimated["cost"] else None, self.max_cost)
        if not verdict.ok:
            raise CostBudgetError(f"{self.task_id}: not sent: {verdict.message}")
        self.log.info("Budget: %s", verdict.message)

    def _spent(self, folder: JobWorkFolder, state: JobState) -> tuple[float, float, str]:
        """Cost of what ended (from its usage) and, at the same price per request, of what runs and goes next."""
        assert self.price_table is not None
        usage = dict.fromkeys(USAGE_KEYS, 0)
        done = 0
        for piece in [*state.by_state("ended"), *state.by_state("done")]:
            if (piece.summary or {}).get("status") == "not_sent":
                continue
            for key, value in _piece_usage(folder, piece).items():
                usage[key] += value
            done += piece.requests
        priced = estimate_cost(usage, state.model, self.price_table) if state.model else None
        if not priced or not done:
            return 0.0, 0.0, "USD"
        per_request = float(priced["total"]) / done
        running = sum(p.requests for p in state.in_flight())
        upcoming = scheduler.to_submit(state)
        coming = running + (upcoming[0].requests if upcoming else 0)
        return float(priced["total"]), per_request * coming, str(priced["currency"])

    def _spent_text(self, folder: JobWorkFolder, state: JobState) -> str | None:
        """The cost so far for the progress line, when the job is priced."""
        if not self.price_table or not state.by_state("done"):
            return None
        spent, _, currency = self._spent(folder, state)
        return f"{spent:,.2f} {currency}"

    def _within_budget(self, folder: JobWorkFolder, state: JobState) -> bool:
        """Mid-job: whether to keep submitting under ``max_cost`` (when passed, what waits never runs)."""
        if self.max_cost is None:
            return True
        spent, projected, currency = self._spent(folder, state)
        verdict = spend_verdict(spent, projected, self.max_cost, currency)
        if verdict.ok:
            return True
        waiting = state.by_state("waiting")
        if waiting:
            self.log.warning("Budget: %s; %d piece(s) will not be sent", verdict.message, len(waiting))
            for piece in waiting:
                piece.state, piece.summary = "done", {"status": "not_sent", "batch_id": None}
        if self.cancel_on_budget:
            for piece in state.by_state("submitted"):
                with contextlib.suppress(OpenAIBatchAPIError):
                    self.hook.cancel_batch(str(piece.batch_id))
        return False

    def _line_tokens(self, state: JobState) -> Callable[[bytes], int]:
        """
        How a request line's queue tokens are counted: with the model's tokenizer (input plus output cap, as
        ``tokens.queue_tokens``) once a token budget is known, since the queue is planned on it; before that a
        byte estimate, so a job that never meets its queue pays nothing for counting.
        """
        if state.budget is None or state.budget_unit != "tokens":
            return estimate_tokens
        endpoint = self.endpoint
        return lambda raw: queue_tokens(raw, endpoint)

    def _recount(self, folder: JobWorkFolder, state: JobState) -> None:
        """
        A token budget was just learned: every piece not yet ended is counted again with the model's tokenizer
        (``_line_tokens``), those in the queue too, since the room left is the budget less what they hold.
        """
        count = self._line_tokens(state)
        for piece in [*state.by_state("waiting"), *state.in_flight()]:
            with folder.input(piece).open("rb") as lines:
                piece.tokens = sum(count(line.rstrip(b"\r\n")) for line in lines if line.strip())

    def _requests(self, source: Iterable[Any]) -> Iterable[dict[str, Any]]:
        """Request dicts as given, or made from prompts; with ``output_schema``, each asks for it."""
        for i, item in enumerate(source):
            try:
                prompt = prompt_item(i, item)
            except ValueError as wrong:
                raise BatchInputError(self.source_label(), [InputIssue(i + 1, "prompt", str(wrong))]) from None
            if prompt is not None:
                yield self._prompt_request(*prompt)
                continue
            if not isinstance(item, Mapping):
                raise TypeError(
                    f"{self.source_label()}: item {i} is a {type(item).__name__}, not a request dict "
                    '({"custom_id": ..., "method": "POST", "url": ..., "body": {...}}), a prompt string, a list of '
                    "messages or a (key, prompt) pair"
                )
            request = dict(item)
            if self.output_schema is not None and isinstance(request.get("body"), Mapping):
                try:
                    request["body"] = apply_output_schema(request["body"], self.endpoint, self.output_schema)
                except OutputSchemaConflict as conflict:
                    raise BatchInputError(
                        self.source_label(), [InputIssue(i + 1, conflict.field, str(conflict))]
                    ) from None
            yield request

    def _prompt_request(self, key: str, prompt: Any) -> dict[str, Any]:
        if not self.model:
            raise ValueError(f"{self.source_label()} gives prompts: model= is needed to make requests of them")
        if self.system_prompt and self.endpoint.endswith("/chat/completions"):
            user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            prompt = [{"role": "system", "content": self.system_prompt}, *user]
        elif self.system_prompt:
            self.request_params.setdefault("instructions", self.system_prompt)
        return prompt_request(
            key,
            prompt,
            endpoint=self.endpoint,
            model=self.model,
            output_schema=self.output_schema,
            **with_max_tokens(self.request_params, self.endpoint, self.max_tokens),
        )

    @staticmethod
    def _copy(path: Path, target: Any) -> None:
        with atomic_writer(target, overwrite=True) as out, path.open("rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)

    # --- the scheduler's loop -----------------------------------------------------------------------------

    def _advance(self, context: Mapping[str, Any], folder: JobWorkFolder, state: JobState) -> JobResult:
        path = CreatePath(
            self.hook,
            context,
            retries=self.retries,
            policy=OutcomePolicy(),
            reuse=self.reuse,
            lookback=self.lookback,
            logger=self.log,
        )
        while True:
            self._collect(context, folder, state)
            self._second_looks(path, folder, state)
            # What now fits is sent before the results of what ended are downloaded: the queue's capacity is not
            # left idle while a large output file comes down.
            if self._within_budget(folder, state):
                self._cut_oversized(folder, state)
                self._submit(context, path, folder, state)
            resend = self._take_in_ended(folder, state)
            self._save(folder, state)
            if all(p.state == "done" for p in state.pieces):
                return self._finish(context, folder, state)
            if resend:
                continue  # requests to send again: sent now when they fit, not after the next batch ends
            self.log.info(scheduler.progress_line(state, time.time(), self._spent_text(folder, state)))
            if not state.in_flight():
                # Nothing runs and nothing may be sent yet (a backoff): sleep until it may.
                wake = scheduler.next_wake(state, time.time())
                if wake is None:
                    self._stuck(state)
                self._wait_until(context, wake)
                continue
            self._wait(context, folder, state)

    def _stuck(self, state: JobState) -> NoReturn:
        """Nothing runs, nothing waits for a backoff, yet work waits: it can never be admitted. Say which and why."""
        for piece in state.by_state("waiting"):
            reason = scheduler.too_big(state, piece)
            if reason:
                raise BatchFailedError(f"{self.task_id}: {reason}")
        waiting = ", ".join(p.name for p in state.by_state("waiting"))
        raise BatchFailedError(
            f"{self.task_id}: {waiting} cannot be sent within the queue's budget of {state.budget} {state.budget_unit}"
        )

    def _typed(self) -> dict[str, Any]:
        """The join's typed-results arguments (``results.iter_joined``)."""
        return {"output_schema": self.output_schema, "extract": self.extract}

    def _work_of(self, piece: Piece) -> BatchWork:
        return BatchWork(
            input_file_id=None,
            endpoint=self.endpoint,
            completion_window=self.completion_window,
            metadata=self.metadata,
            output_expires_after_seconds=self.output_expires_after_seconds,
            input_identity=piece.identity,
        )

    def _collect(self, context: Mapping[str, Any], folder: JobWorkFolder, state: JobState) -> None:
        """Read every submitted batch: one that ended is ``ended`` (its results are taken in after the next
        creates, ``_take_in_ended``); a queue refusal sends its piece back to wait."""
        for piece in state.by_state("submitted"):
            assert piece.batch_id is not None
            batch = self.hook.get_batch(piece.batch_id)
            summary = summarize(batch)
            if not is_terminal(summary["status"]):
                continue
            tags = metrics.tags_from_context(context, model=summary["model"], endpoint=self.endpoint)
            metrics.batch_ended_from_object(batch, tags)
            refusal = queue_refusal(summary)
            if refusal is not None:
                metrics.queue_refused(tags)
                self._refused(folder, state, piece, refusal.message, summary["model"])
                self._save(folder, state)
                continue
            if failed_as_a_whole(summary):
                self._save(folder, state)
                errors = "; ".join(f"[{e.get('code')}] {e.get('message')}" for e in summary["errors"][:5])
                raise BatchFailedError(
                    f"Batch {summary['batch_id']} ({piece.name}) failed as a whole: {errors or 'no error details'}",
                    summary,
                )
            piece.state, piece.summary = "ended", dict(summary)
            state.model = state.model or summary.get("model")
            self._save(folder, state)

    def _take_in_ended(self, folder: JobWorkFolder, state: JobState) -> bool:
        """Take in every ended piece (``_take_in``); whether that left requests to send again."""
        waiting = len(state.by_state("waiting"))
        for piece in state.by_state("ended"):
            assert piece.summary is not None
            self._take_in(folder, state, piece, piece.summary)
            self._save(folder, state)
        return len(state.by_state("waiting")) > waiting

    def _refused(self, folder: JobWorkFolder, state: JobState, piece: Piece, message: str, model: str | None) -> None:
        refusal = read_queue_refusal(message, model)
        by_bytes = state.budget is None or state.budget_unit != "tokens"  # pieces counted by estimate_tokens
        learned = scheduler.learn(state, refusal, piece.planned)
        if learned and by_bytes and state.budget_unit == "tokens":
            self._recount(folder, state)
        scheduler.requeue(piece, time.time(), backoff=piece.planned and not learned)
        state.queue_refusals += 1
        budget = f"{state.budget:,} {state.budget_unit}" if state.budget is not None else "unknown"
        self.log.warning(
            "%s was refused for the queue (%s); it waits for capacity (budget %s%s)",
            piece.name,
            message,
            budget,
            ", learned from this refusal" if learned else "",
        )

    def _take_in(self, folder: JobWorkFolder, state: JobState, piece: Piece, summary: dict[str, Any]) -> None:
        """Download a piece's results; resend its transient failures as the next generation, while rounds remain."""
        if summary["output_file_id"]:
            self.hook.download_file(summary["output_file_id"], folder.output(piece), overwrite=True)
        if summary["error_file_id"]:
            self.hook.download_file(summary["error_file_id"], folder.error(piece), overwrite=True, keep_empty=False)
        piece.state, piece.summary = "done", summary
        counts = summary["request_counts"]
        # Nothing to resend when every request ran and none of them has a status the user asked to resend (which
        # only the joined rows tell).
        whole = (
            ended_clean(summary)  # type: ignore[arg-type]
            and counts["completed"] >= piece.requests
            and not self.resend_statuses
        )
        if piece.gen > 0 or (not whole and piece.gen + 1 < self.max_rounds):
            results = [p for p in (folder.output(piece), folder.error(piece)) if p.exists()]
            write_joined(iter_joined([folder.input(piece)], results, **self._typed()), folder.joined(piece))
        if whole or piece.gen + 1 >= self.max_rounds:
            return
        retry = Piece(piece.gen + 1, piece.part, 0, 0, "", 0)
        sent = write_retry_input(folder.joined(piece), folder.input(retry), also=self.resend_statuses)
        if not sent:
            return
        stats = _file_stats(folder.input(retry))
        retry.requests, retry.bytes, retry.sha256 = sent, stats[0], stats[1]
        count = self._line_tokens(state)
        with folder.input(retry).open("rb") as lines:
            retry.tokens = sum(count(line.rstrip(b"\r\n")) for line in lines if line.strip())
        state.pieces.append(retry)
        self.log.info("%s: %s request(s) to send again as %s", piece.name, f"{sent:,}", retry.name)

    def _second_looks(self, path: CreatePath, folder: JobWorkFolder, state: JobState) -> None:
        """The second look for a duplicate (``batches.SiblingLook``) for pieces old enough, in one listing."""
        now = time.time()
        due = [
            p
            for p in state.by_state("submitted")
            if not p.second_look_done
            and p.created_at is not None
            and p.looked_at is not None
            and now - p.created_at >= create_path.SIBLING_LOOK_AFTER
        ]
        if not due:
            return
        since = min(p.looked_at for p in due if p.looked_at is not None)
        try:
            listing = create_path.recent_batches(self.hook, since - create_path.RACE_SKEW.total_seconds())
        except OpenAIBatchAPIError as error:
            self.log.warning("Could not list batches to look again for duplicates (%s)", error)
            return
        for piece in due:
            piece.second_look_done = True
            if piece.looked_at is None or now - piece.looked_at > create_path.SIBLING_LOOK_WITHIN:
                continue
            look = SiblingLook(path.key(self._work_of(piece)), path.first, piece.looked_at)
            own = SimpleNamespace(id=piece.batch_id, created_at=int(piece.created_at or 0), status="in_progress")
            survivor = look.survivor(own, listing)
            if survivor.id != piece.batch_id:
                create_path.cancel_duplicate(self.hook, str(piece.batch_id), survivor.id, self.log)
                piece.batch_id, piece.created_at = survivor.id, float(survivor.created_at)
                path.remember(look.key, survivor.id)
        self._save(folder, state)

    def _cut_oversized(self, folder: JobWorkFolder, state: JobState) -> None:
        """A waiting piece larger than the whole budget is cut into parts that fit (it could never be admitted)."""
        for piece in scheduler.oversized(state):
            assert state.budget is not None
            if state.budget_unit == "tokens":
                limits = ShardLimits(max_tokens=state.budget)
            else:
                limits = ShardLimits(max_requests=min(state.budget, MAX_REQUESTS_PER_FILE))
            with tempfile.TemporaryDirectory(prefix="openai-batch-cut-") as scratch:
                made = shard_batch_file(
                    folder.input(piece),
                    Path(scratch),
                    endpoint=self.endpoint,
                    allowed_endpoints=self.allowed_endpoints,
                    limits=limits,
                    line_tokens=self._line_tokens(state),
                )
                new = []
                for k, shard in enumerate(made):
                    part = Piece(
                        piece.gen, f"{piece.part}-{k:02d}", shard.requests, shard.bytes, shard.sha256, shard.tokens
                    )
                    part.queue_attempt = piece.queue_attempt
                    self._copy(shard.path, folder.input(part))
                    new.append(part)
            state.pieces.remove(piece)
            state.pieces.extend(new)
            self.log.info(
                "%s holds ~%s %s, more than the queue's budget of %s: cut into %d parts",
                piece.name,
                f"{scheduler.piece_load(piece, state.budget_unit):,}",
                state.budget_unit,
                f"{state.budget:,}",
                len(new),
            )
            self._save(folder, state)

    def _submit(self, context: Mapping[str, Any], path: CreatePath, folder: JobWorkFolder, state: JobState) -> None:
        """Create the batches of what fits now; a piece an earlier try was creating is looked for first."""
        # The settle window starts here, when this try starts looking (not after the uploads, which take a while):
        # a racer that created a piece's batch since then is seen by the settle and one of the two is cancelled.
        looked = time.time()
        creating = state.by_state("creating")
        if creating:
            keys = {path.key(self._work_of(p)): p for p in creating}
            found = path.earlier(list(keys))
            for key, piece in keys.items():
                batch = found.get(key)
                if batch is not None:
                    self.log.info("%s: batch %s an earlier try created is used again", piece.name, batch.id)
                    self._record(path, piece, key, batch)
                else:
                    piece.state = "waiting"
            self._save(folder, state)
        chosen = scheduler.to_submit(state, time.time())
        if state.needs_lookup and chosen:
            # This run of tries' work folder was started by a retry (the first try's was lost, or it died before
            # saving it): an earlier try may have created any piece's batch. One scan for all of them.
            keys = {path.key(self._work_of(p)): p for p in chosen}
            for key, batch in path.earlier(list(keys)).items():
                self.log.info("%s: batch %s an earlier try created is used again", keys[key].name, batch.id)
                self._record(path, keys[key], key, batch)
            self._save(folder, state)
            chosen = [p for p in chosen if p.state == "waiting"]
        if not chosen:
            return
        # Upload the wave (logging is fine here), then create it and settle it together: one settle pause and one
        # listing for the wave, and nothing logged between the first create and the settle.
        wave: list[tuple[Piece, BatchWork, str, str]] = []
        for piece in chosen:
            work = self._work_of(piece)
            key = path.key(work)
            path.metadata(work, key)  # metadata OpenAI would refuse is refused before anything is sent
            wave.append((piece, work, key, self._upload(folder, piece)))
        for piece, _, key, _ in wave:
            piece.state, piece.looked_at, piece.planned = "creating", looked, state.budget is not None
            path.looked[key] = looked
        self._save(folder, state)
        created, failure = self._create(path, folder, [(work, key, file_id) for _, work, key, file_id in wave])
        for (piece, _, key, _), batch in zip(wave, created, strict=False):
            self._record(path, piece, key, batch)
            model = state.model or getattr(batch, "model", None)
            metrics.batch_created(metrics.tags_from_context(context, model=model, endpoint=self.endpoint))
        tags = metrics.tags_from_context(context, model=state.model, endpoint=self.endpoint)
        for piece, _, _, _ in wave[len(created) :]:
            piece.state = "waiting"  # not sent: the wave stopped before it
        self._save(folder, state)
        if created:
            self.push_batch_id(context, created[0].id)
        if failure is not None:
            if not is_queue_refusal_code(failure.code):
                raise failure
            metrics.queue_refused(tags)
            self._refused(folder, state, wave[len(created)][0], failure.message, None)
            self._save(folder, state)

    def _upload(self, folder: JobWorkFolder, piece: Piece) -> str:
        return upload_once(
            self.hook,
            folder.input(piece),
            f"{self.task_id}.gen{piece.gen}.part{piece.part}.jsonl",
            sha256=piece.sha256,
            size=piece.bytes,
            reuse_window=self.reuse_window,
            expires_after_seconds=self.expires_after_seconds,
            logger=self.log,
        )

    def _create(
        self, path: CreatePath, folder: JobWorkFolder, wave: list[tuple[BatchWork, str, str | None]]
    ) -> tuple[list[Any], OpenAIBatchAPIError | None]:
        """
        The one create path (``batches.CreatePath.create_many``): each batch once, the wave settled together. No
        later try's mark on the work folder right after the creates says that no later try has begun looking (each
        marks it before it looks or creates): the first try of a run then skips the settle (no try can hold a batch
        that beats ours).
        """
        this_try = _try_of(self._owner)
        return path.create_many(wave, no_later_try=lambda: not folder.later_try_began(this_try))

    @staticmethod
    def _record(path: CreatePath, piece: Piece, key: str, batch: Any) -> None:
        piece.state, piece.batch_id, piece.created_at = "submitted", batch.id, float(batch.created_at)
        # The second look is owed only when the settle step never saw the new batch listed (``batches``).
        piece.second_look_done = key not in path.unseen
        path.remember(key, batch.id)

    # --- waiting ---------------------------------------------------------------------------------------------

    def _end_times(self, state: JobState) -> dict[str, float]:
        """Each running batch's deadline; one whose deadline was already acted on has none (it is not acted on
        again: a cancelled one is waited for until it has ended, one left running for a retry to collect)."""
        return {
            str(p.batch_id): deadline_end_time(p.created_at or time.time(), self.completion_window, self.deadline)
            for p in state.by_state("submitted")
            if not p.deadline_passed
        }

    def _wake_at(self, state: JobState) -> float | None:
        """When the task must act even if no batch ends: a backoff passing, or a second look falling due."""
        now = time.time()
        moments = [t for t in (scheduler.next_wake(state, now),) if t is not None]
        moments += [
            (p.created_at or now) + create_path.SIBLING_LOOK_AFTER
            for p in state.by_state("submitted")
            if not p.second_look_done and p.looked_at is not None
        ]
        return min(moments) if moments else None

    def _wait(self, context: Mapping[str, Any], folder: JobWorkFolder, state: JobState) -> None:
        """Until a batch ends (or a wake-up or deadline): deferred on one trigger, or blocking on the worker."""
        running = [str(p.batch_id) for p in state.by_state("submitted")]
        end_times = self._end_times(state)
        wake_at = self._wake_at(state)
        oldest = min((p.created_at or time.time()) for p in state.by_state("submitted"))
        openai_ends = deadline_end_time(
            max((p.created_at or time.time()) for p in state.by_state("submitted")), self.completion_window, None
        )
        if self.deferrable:
            # No deadline left to act on (each was acted on once): OpenAI ends the batch within its window.
            until = min([*end_times.values(), *([wake_at] if wake_at else [])], default=openai_ends)
            self.defer(
                trigger=OpenAIBatchJobTrigger(
                    batch_ids=running,
                    conn_id=self.conn_id,
                    poll_interval=self.poll_interval,
                    end_times=end_times,
                    created_at=oldest,
                    max_poll_interval=self.max_poll_interval,
                    max_poll_failures=self.max_poll_failures,
                    cancel_on_kill=self.cancel_on_kill,
                    label=self.task_id,
                    # The capacity a batch frees is only worth a wake-up when work waits for it.
                    wake_on_any_end=bool(state.by_state("waiting")),
                    wake_on_unclean_end=self.max_rounds > 1,
                    wake_at=wake_at,
                    progress=scheduler.progress_snapshot(state, self._spent_text(folder, state)),
                ),
                method_name="execute_complete",
                timeout=defer_timeout(until, self.poll_interval),
            )
        self._running, self._running_ti = running, context.get("ti")
        policy = PollPolicy(self.poll_interval, self.max_poll_interval, self.max_poll_failures, jitter_first_poll=False)
        failures = {batch_id: PollFailures(policy) for batch_id in running}
        try:
            while True:
                now = time.time()
                late = [b for b, t in end_times.items() if t <= now]
                if late:
                    self._on_deadline(folder, state, late)
                    return
                if wake_at is not None and now >= wake_at:
                    return
                moments = [*end_times.values(), *([wake_at] if wake_at else [])]
                time.sleep(max(0.0, min(policy.delay(now - oldest), min(moments, default=openai_ends) - now)))
                for batch_id in running:
                    batch = self.hook.poll_batch(batch_id, failures[batch_id])
                    if is_terminal(batch.status):
                        return
        finally:
            self._running = []

    def _wait_until(self, context: Mapping[str, Any], moment: float) -> None:
        """Nothing runs; a refused piece's backoff has not passed: defer (or sleep) until it has."""
        if self.deferrable:
            self.defer(
                trigger=OpenAIBatchJobTrigger(
                    batch_ids=[],
                    conn_id=self.conn_id,
                    poll_interval=self.poll_interval,
                    end_times={},
                    wake_at=moment,
                    label=self.task_id,
                    jitter_first_poll=False,
                ),
                method_name="execute_complete",
                timeout=defer_timeout(moment, 0.0),  # nothing is polled meanwhile
            )
        time.sleep(max(0.0, moment - time.time()))

    def _on_deadline(self, folder: JobWorkFolder, state: JobState, batch_ids: list[str]) -> None:
        """A batch's deadline passed: cancel it (its finished requests are kept, the rest resent while rounds
        remain), or, with ``cancel_on_timeout=False``, fail the try so that Airflow retries it; the retry waits for
        the batch to end (its deadline is acted on once) and collects its results."""
        for piece in state.by_state("submitted"):
            if piece.batch_id in batch_ids:
                piece.deadline_passed = True
        self._save(folder, state)
        if not self.cancel_on_timeout:
            raise JobDeadlineError(
                f"{len(batch_ids)} batch(es) of the job did not end before their deadline ({', '.join(batch_ids)}); "
                "they keep running (cancel_on_timeout=False): a retry collects their results once they have ended."
            )
        for batch_id in batch_ids:
            try:
                self.hook.cancel_batch(batch_id)
                self.log.warning("Batch %s did not end before its deadline: cancelled (its output is kept)", batch_id)
            except OpenAIBatchAPIError as error:
                if not error.refused_for_state:
                    self.log.warning("Could not cancel batch %s: %s", batch_id, error)

    # --- the end -------------------------------------------------------------------------------------------

    def _finish(self, context: Mapping[str, Any], folder: JobWorkFolder, state: JobState) -> JobResult:
        destination = self._destination(context)
        ordered = state.ordered()
        first = [p for p in ordered if p.gen == 0]
        later = [p for p in ordered if p.gen > 0 and (p.summary or {}).get("status") != "not_sent"]
        inputs = [folder.input(p) for p in first]
        results = [r for p in first for r in (folder.output(p), folder.error(p)) if r.exists()]
        if later:
            write_joined(iter_joined(inputs, results, **self._typed()), folder.first_generation_joined)
            rows = iter_merged(
                [folder.first_generation_joined, *(folder.joined(p) for p in later)], [0, *(p.gen for p in later)]
            )
        else:
            rows = iter_joined(inputs, results, **self._typed())
        typed = self.output_schema is not None or self.extract
        counts = dict.fromkeys(ROW_STATUSES if typed else REQUEST_STATUSES, 0)
        counts.update(write_joined(rows, destination, **self._typed()))
        usage = dict.fromkeys(USAGE_KEYS, 0)
        batches: list[JobBatch] = []
        reasons: list[str] = []
        not_sent = [p for p in ordered if (p.summary or {}).get("status") == "not_sent"]
        if not_sent:
            reasons.append(f"max_cost={self.max_cost} would have been passed: {len(not_sent)} piece(s) not sent")
        for piece in ordered:
            summary = piece.summary or {}
            if summary.get("status") == "not_sent":
                continue
            for key, value in _piece_usage(folder, piece).items():
                usage[key] += value
            if summary.get("status") in ("expired", "cancelled"):
                reasons.append(f"batch {summary.get('batch_id')} {summary.get('status')}")
            batches.append(
                {
                    "round": piece.gen,
                    "shard": int(piece.part.split("-")[0]),
                    "part": piece.part,
                    "batch_id": str(summary.get("batch_id") or piece.batch_id),
                    "status": str(summary.get("status")),
                    "request_counts": summary.get("request_counts") or RequestCounts(total=0, completed=0, failed=0),
                }
            )
        result: JobResult = {
            "joined_uri": str(destination),
            "counts": counts,
            "batches": batches,
            "rounds": 1 + max((p.gen for p in ordered), default=0),
            "usage_totals": usage,
            "queue_refusals": state.queue_refusals,
        }
        tags = metrics.tags_from_context(context, model=state.model, endpoint=self.endpoint)
        metrics.requests_ended(counts, tags)
        metrics.tokens_used(usage, tags)
        if self.price_table:
            result["cost_estimate"] = estimate_cost(usage, state.model, self.price_table)
            if result["cost_estimate"]:
                metrics.cost(result["cost_estimate"]["total"], result["cost_estimate"]["currency"], tags)
        self.log.info(
            "Job done in %s: %s → %s",
            _elapsed(time.time() - state.started),
            _counts_text(counts),
            destination,
        )
        if not self.keep_work_dir:
            remove_tree(folder.root)
        outcome = evaluate_job(counts, self.policy, reasons)
        if not outcome.ok:
            raise BatchFailedError(outcome.message)
        (self.log.warning if outcome.warning else self.log.info)(outcome.message)
        return result


def _piece_usage(folder: JobWorkFolder, piece: Piece) -> dict[str, int]:
    """A done piece's token usage: its batch's, or, from a compatible server that reports none, its output's."""
    summary = piece.summary or {}
    if summary.get("usage"):
        return normalize_usage(summary["usage"])
    output = folder.output(piece)
    return sum_usage(output) if output.exists() else dict.fromkeys(USAGE_KEYS, 0)


def _try_of(owner: str) -> int:
    """The try number in an owner's name (``try 3, 1a2b...``); 0 when it has none."""
    number = owner.removeprefix("try ").split(",", 1)[0]
    return int(number) if number.isdigit() else 0


def _owner_name(context: Mapping[str, Any]) -> str:
    """This process's name in the work folder: the try, and a random part (a resume after a deferral is new)."""
    import uuid

    return f"try {getattr(context.get('ti'), 'try_number', None)}, {uuid.uuid4().hex[:12]}"


def _decoded_lines(source: Source) -> Iterator[dict[str, Any]]:
    """A JSONL source's requests as dicts, streamed; a line that is not a JSON object is an input error."""
    for number, raw in enumerate(iter_lines(source), start=1):
        try:
            value = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            value = None
        if not isinstance(value, dict):
            raise BatchInputError(describe(source), [InputIssue(number, None, "is not a JSON object")])
        yield value


def _file_stats(path: Any) -> tuple[int, str]:
    import hashlib

    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{value:,} {key}" for key, value in counts.items() if value) or "no requests"
