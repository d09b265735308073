"""
The batch workflow as operators: upload, create, download, cancel. Thin on purpose: the hook talks to the API,
``batch_file`` checks input, ``batch_status`` judges outcomes, ``batches`` (the one create path) keeps retries and
racing tries from paying twice.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from typing_extensions import NotRequired

from airflow_provider_openai_batch import metrics
from airflow_provider_openai_batch.batch_file import (
    MAX_BYTES_PER_FILE,
    MAX_REQUESTS_PER_FILE,
    OPENAI_BATCH_ENDPOINTS,
    ShardLimits,
    encode_requests,
    shard_batch_file,
    validate_batch_file,
)
from airflow_provider_openai_batch.batch_status import (
    BatchSummary,
    expected_result_lines,
    is_queue_refusal_code,
    is_terminal,
    read_queue_refusal,
    summarize,
)
from airflow_provider_openai_batch.batches import REUSE_MODES, BatchWork, CreatePath, ReuseMode
from airflow_provider_openai_batch.endpoints import expiry_problem
from airflow_provider_openai_batch.exceptions import (
    BatchNotEndedError,
    BatchQueueFullError,
    DownloadMismatchError,
    OpenAIBatchAPIError,
)
from airflow_provider_openai_batch.idempotency import DEFAULT_LOOKBACK
from airflow_provider_openai_batch.links.openai_batch import OpenAIBatchLink
from airflow_provider_openai_batch.operators.base import (
    BatchWaitingOperator,
    OpenAIBatchBaseOperator,
    batch_id_of,
)
from airflow_provider_openai_batch.polling import backoff_delay
from airflow_provider_openai_batch.results import estimate_cost, normalize_usage, sum_usage
from airflow_provider_openai_batch.storage import Source, remove_file, source_name, source_size, to_storage_path
from airflow_provider_openai_batch.triggers.openai_batch import BatchEventPayload
from airflow_provider_openai_batch.uploads import upload_once

#: First wait (seconds) before a create that waits sends a batch the queue refused again (``polling.backoff_delay``).
QUEUE_RETRY_DELAY = 60.0
#: The download operator pushes each result file's location under its own key, besides the summary.
RESULT_LOCATION_KEYS = ("output_uri", "error_uri")


def _as_seconds(value: timedelta | int | None) -> int | None:
    if value is None:
        return None
    return int(value.total_seconds()) if isinstance(value, timedelta) else int(value)


def _expiry(name: str, value: timedelta | int | None) -> timedelta | int | None:
    """An expiry OpenAI would refuse is refused when the DAG is parsed, naming the argument."""
    problem = expiry_problem(_as_seconds(value))
    if problem:
        raise ValueError(f"{name}: {problem}")
    return value


class OpenAIBatchUploadOperator(OpenAIBatchBaseOperator):
    """
    Validate a batch input, streaming, shard it when it is too big for one batch, and upload each file once.

    Returns the file id, or the list of file ids in input order when the input was sharded (always a list with
    ``sharding="always"``, which is what dynamic task mapping over create/wait/download wants).

    :param source: A local path, a URI or ``ObjectStoragePath`` (any fsspec protocol), or a list of request dicts
        (e.g. an upstream task's XCom). Templated.
    :param endpoint: The batch endpoint every line's ``url`` must equal (e.g. ``/v1/chat/completions``).
    :param allowed_endpoints: Endpoints a line may name; ``None`` accepts any (for compatible servers).
    :param filename: Name to give the file at OpenAI (default: the source's name).
    :param expires_after: Let OpenAI delete the uploaded input after this long (data retention).
    :param reuse_window: How far back to look for an identical upload to reuse instead of sending it again.
    :param sharding: ``"auto"`` (split only when needed), ``"always"`` (always return a list) or ``"never"``
        (an input over the limits is an error).
    :param max_requests_per_file: Requests per file (OpenAI: at most 50,000).
    :param max_bytes_per_file: Bytes per file (OpenAI: at most 200 MB).
    :param max_tokens_per_file: Estimated input tokens per file (bytes / 4), e.g. to stay under an
        enqueued-token quota.
    :param dry_run: Validate, shard and estimate (``estimate.Estimate``: requests, shards as this operator would
        cut them, tokens, cost range), log the estimate and return it as the XCom; nothing is uploaded.
    :param price_table: Batch prices per million tokens per model, ``{model: {"input": $, "cached_input": $,
        "output": $}}``, for ``dry_run``'s cost range.

    A retry of the same content reuses the earlier upload: each file name carries a hash of its content and is
    looked up among recent uploads, so a 200 MB file is not sent twice.
    """

    template_fields: Sequence[str] = ("source", "endpoint", "filename", "conn_id")

    def __init__(
        self,
        *,
        source: Any,
        endpoint: str,
        allowed_endpoints: Collection[str] | None = OPENAI_BATCH_ENDPOINTS,
        filename: str | None = None,
        expires_after: timedelta | int | None = None,
        reuse_window: timedelta = DEFAULT_LOOKBACK,
        sharding: Literal["auto", "always", "never"] = "auto",
        max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
        max_bytes_per_file: int = MAX_BYTES_PER_FILE,
        max_tokens_per_file: int | None = None,
        dry_run: bool = False,
        price_table: dict[str, dict[str, float]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if sharding not in ("auto", "always", "never"):
            raise ValueError(f"sharding must be 'auto', 'always' or 'never', got {sharding!r}")
        self.source = source
        self.endpoint = endpoint
        self.allowed_endpoints = allowed_endpoints
        self.filename = filename
        self.expires_after = _expiry("expires_after", expires_after)
        self.reuse_window = reuse_window
        self.sharding = sharding
        self.limits = ShardLimits(max_requests_per_file, max_bytes_per_file, max_tokens_per_file)
        self.estimate_only = dry_run  # BaseOperator.dry_run is a method of its own
        self.price_table = price_table

    def execute(self, context: Mapping[str, Any]) -> str | list[str] | Mapping[str, Any]:
        if self.estimate_only:
            return self._dry_run(context)
        with tempfile.TemporaryDirectory(prefix="openai-batch-upload-") as folder:
            source, name = self._source_file(context, Path(folder))
            origin = [] if isinstance(self.source, (list, tuple)) else [("storage", str(self.source))]
            if self.sharding == "never" or not self._too_big(source):
                file_id = self._upload(source, name)
                self.record_lineage(origin, [("files", file_id)])
                return [file_id] if self.sharding == "always" else file_id
            shards = shard_batch_file(
                source,
                Path(folder) / "shards",
                endpoint=self.endpoint,
                allowed_endpoints=self.allowed_endpoints,
                limits=self.limits,
            )
            self.log.info("Split %s into %d files of at most %s", name, len(shards), self.limits)
            stem = name.rsplit(".", 1)[0]
            ids = [self._upload(shard.path, f"{stem}.part{i:05d}.jsonl") for i, shard in enumerate(shards)]
            self.record_lineage(origin, [("files", file_id) for file_id in ids])
            return ids if len(ids) > 1 or self.sharding == "always" else ids[0]

    def _source_file(self, context: Mapping[str, Any], folder: Path) -> tuple[Source, str]:
        """The source as a file to read (request dicts written into ``folder``) and the name it has at OpenAI."""
        if not isinstance(self.source, (list, tuple)):
            return self.source, self.filename or source_name(self.source)
        path = folder / "requests.jsonl"
        with path.open("wb") as out:
            out.writelines(encode_requests(self.source))
        return path, self.filename or f"{context['ti'].task_id}.jsonl"

    def _dry_run(self, context: Mapping[str, Any]) -> Mapping[str, Any]:
        """Validate, shard and estimate as ``execute`` would (an ``estimate.Estimate``); nothing is uploaded."""
        from airflow_provider_openai_batch.estimate import estimate_file

        with tempfile.TemporaryDirectory(prefix="openai-batch-dry-run-") as folder:
            source, upload_name = self._source_file(context, Path(folder))
            # A file is named as it is; request dicts as the upload would name their file at OpenAI.
            name = upload_name if isinstance(self.source, (list, tuple)) else None
            limits = self.limits
            if self.sharding == "never":  # one file, held to OpenAI's limits as the upload holds it
                validate_batch_file(
                    source,
                    endpoint=self.endpoint,
                    allowed_endpoints=self.allowed_endpoints,
                    max_requests=limits.max_requests,
                    max_bytes=limits.max_bytes,
                    max_embedding_inputs=limits.max_embedding_inputs,
                )
                limits = ShardLimits(max_requests=limits.max_requests, max_bytes=limits.max_bytes)
            estimated = estimate_file(
                source,
                self.endpoint,
                self.price_table,
                limits=limits,
                allowed_endpoints=self.allowed_endpoints,
                name=name,
            )
        self.report_estimate(context, estimated, self.endpoint)
        self.log.info("Dry run: nothing was sent")
        return estimated

    def _too_big(self, source: Source) -> bool:
        """Whether ``source`` must be split; a cheap size check first, a counting pass only when it may be."""
        size = source_size(source)
        # Fewer bytes than two per allowed request (and three per allowed embedding input, the least a JSON array
        # element takes with its comma) means few enough lines and inputs, whatever they hold; within the byte
        # limit too, it fits in one file.
        small = min(self.limits.max_requests * 2, self.limits.max_embedding_inputs * 3)
        if size is not None and self.limits.max_tokens is None and size < small and size <= self.limits.max_bytes:
            return False
        stats = validate_batch_file(
            source,
            endpoint=self.endpoint,
            allowed_endpoints=self.allowed_endpoints,
            max_requests=sys.maxsize,
            max_bytes=sys.maxsize,
            max_embedding_inputs=sys.maxsize,
        )
        return (
            stats.requests > self.limits.max_requests
            or stats.bytes > self.limits.max_bytes
            or (self.limits.max_tokens is not None and stats.tokens > self.limits.max_tokens)
            or stats.embedding_inputs > self.limits.max_embedding_inputs
        )

    def _upload(self, source: Source, name: str) -> str:
        stats = validate_batch_file(
            source,
            endpoint=self.endpoint,
            allowed_endpoints=self.allowed_endpoints,
            max_requests=self.limits.max_requests,
            max_bytes=self.limits.max_bytes,
            max_embedding_inputs=self.limits.max_embedding_inputs,
        )
        self.log.info(
            "Validated %s: %s requests, %s bytes, model %s",
            name,
            f"{stats.requests:,}",
            f"{stats.bytes:,}",
            stats.model,
        )
        return upload_once(
            self.hook,
            source,
            name,
            sha256=stats.sha256,
            size=stats.bytes,
            reuse_window=self.reuse_window,
            expires_after_seconds=_as_seconds(self.expires_after),
            logger=self.log,
        )


class OpenAIBatchCreateOperator(BatchWaitingOperator):
    """
    Create a batch, at most once per task instance however often it is retried; returns the batch id.

    :param input_file_id: The uploaded input file (e.g. the upload task's XCom). Templated. A list (a sharded
        upload's XCom) is refused with what to do instead: map over it.
    :param endpoint: ``/v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``, ... Templated.
    :param completion_window: ``"24h"`` at OpenAI; compatible servers may offer others. Templated.
    :param metadata: Up to 14 string pairs (two keys are reserved for retry safety). Templated.
    :param output_expires_after: Let OpenAI delete the output and error files after this long.
    :param wait_for_completion: Also wait for the batch to end (deferrable like the sensor, same policy). Without
        it, a try whose new batch a lagging listing does not show yet keeps looking for a duplicate before it
        returns (``batches``), so a sensor downstream needs to know nothing of it.
    :param reuse: What a re-run after a *clear* (of the task or its DAG run) may use instead of a new batch:
        ``"active"`` (default) a batch of the same task instance and work that is still running, so clearing a
        waiting task waits for the same batch again instead of paying twice; a completed one is not reused,
        because a clear means "run it again". ``"active_or_completed"``: also a completed batch that passes this
        task's outcome policy (a cheap re-run of downstream tasks). ``"never"``: always a new batch (the running
        one is left running: cancel it first if you do not want to pay for it). Templated.
        *Retries* are not clears: a retry always reuses its own run of tries' batch while it is working, and a
        completed one when it passes the outcome policy, whatever ``reuse`` says, so a retry never pays twice
        and never fails again on the batch that failed it. A ``cancelling``, failed, expired or cancelled batch
        is never reused.
    :param lookback: The scan for an earlier try's batch goes back to when the DAG run started; this is the
        window used only when the context has no DAG run (default 48 h).

    Everything that changes what the batch does (input, endpoint, completion window, metadata, output expiry)
    is part of the idempotency key, so changing it makes a new batch. The batch id is pushed to XCom (key
    ``batch_id``) right after the API call, before any wait, so the extra link works while the task is deferred.
    See ``BatchWaitingOperator`` for the waiting options.
    """

    template_fields: Sequence[str] = (
        "input_file_id",
        "endpoint",
        "completion_window",
        "metadata",
        "reuse",
        "conn_id",
    )
    template_fields_renderers = {"metadata": "json"}

    def __init__(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        output_expires_after: timedelta | int | None = None,
        wait_for_completion: bool = False,
        reuse: ReuseMode | str = "active",
        lookback: timedelta = DEFAULT_LOOKBACK,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.input_file_id = input_file_id
        self.endpoint = endpoint
        self.completion_window = completion_window
        self.metadata = metadata
        self.output_expires_after = _expiry("output_expires_after", output_expires_after)
        self.wait_for_completion = wait_for_completion
        self.reuse = reuse
        self.lookback = lookback

    def execute(self, context: Mapping[str, Any]) -> str:
        while True:
            try:
                return self._create_and_wait(context)
            except BatchQueueFullError as refused:
                if not self.wait_for_completion:
                    raise
                self._after_queue_refusal(context, refused)

    def _after_queue_refusal(self, context: Mapping[str, Any], refused: BatchQueueFullError) -> None:
        """
        The batch was refused for the queue (not charged): wait a backoff, then create again (a new batch: the
        refused one is dead). Deferred, the wait is a timer in the triggerer; blocking, a sleep.
        """
        delay = backoff_delay(1, QUEUE_RETRY_DELAY, QUEUE_RETRY_DELAY * 30)
        self.log.warning(
            "Batch %s was refused for the queue of %s (limit %s %s); creating it again in %.0f s",
            refused.summary["batch_id"] if refused.summary else None,
            refused.model,
            f"{refused.limit:,}" if refused.limit is not None else "unknown",
            refused.unit,
            delay,
        )
        if self.deferrable:
            from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

            self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=delay)), method_name="execute_again")
        time.sleep(delay)

    def execute_again(self, context: Mapping[str, Any], event: Any = None) -> str:
        """After a queue refusal's backoff (deferred): create again."""
        return self.execute(context)

    def _create_and_wait(self, context: Mapping[str, Any]) -> str:
        self._check_arguments()
        path = CreatePath(
            self.hook,
            context,
            retries=self.retries,
            policy=self.policy,
            reuse=self.reuse,
            lookback=self.lookback,
            logger=self.log,
            # Without a wait here (a sensor downstream, or nothing), the settle step itself keeps looking until a
            # lagging listing shows the new batch: no waiter of ours would make the second look.
            waits=self.wait_for_completion,
        )
        work = BatchWork(
            input_file_id=self.input_file_id,
            endpoint=self.endpoint,
            completion_window=self.completion_window,
            metadata=self.metadata,
            output_expires_after_seconds=_as_seconds(self.output_expires_after),
        )
        try:
            ensured = path.ensure(work)
        except OpenAIBatchAPIError as error:
            if not is_queue_refusal_code(error.code):
                raise
            # Azure's global batch refuses at create (HTTP 400 token_limit_exceeded): the same queue, seen earlier.
            refusal = read_queue_refusal(error.message)
            metrics.queue_refused(metrics.tags_from_context(context, model=None, endpoint=self.endpoint))
            raise BatchQueueFullError(str(error), None, model=None, limit=refusal.limit, unit=refusal.unit) from None
        batch = ensured.batch
        if ensured.created:
            metrics.batch_created(metrics.tags_from_context(context, model=batch.model, endpoint=self.endpoint))
        self.record_lineage([("files", self.input_file_id)], [("batches", batch.id)])
        self.push_batch_id(context, batch.id)
        if self.wait_for_completion:
            # The second look may find an older try's batch: the summary names the one that ran.
            return str(self.wait_for(context, batch.id, look=ensured.look)["batch_id"])
        return batch.id

    def execute_complete(self, context: Mapping[str, Any], event: BatchEventPayload | None = None) -> str:
        try:
            summary = super().execute_complete(context, event)
        except BatchQueueFullError as refused:
            self._after_queue_refusal(context, refused)
            return self.execute(context)
        return str(summary["batch_id"])

    def _check_arguments(self) -> None:
        if isinstance(self.input_file_id, (list, tuple)):
            raise ValueError(
                f"input_file_id is a list of {len(self.input_file_id)} file ids (the upload was sharded); one "
                "batch takes one file. Map over the list: OpenAIBatchCreateOperator.partial(task_id=..., "
                "endpoint=...).expand(input_file_id=upload.output), or upload with sharding='never' to get "
                "one id (and an error if the input is too big for one batch)."
            )
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {', '.join(REUSE_MODES)}; got {self.reuse!r}")


class OpenAIBatchCancelOperator(BatchWaitingOperator):
    """
    Cancel a batch and (by default) wait until it is ``cancelled``; returns the batch summary, whose
    ``output_file_id`` holds the results finished before the cancel.

    :param batch_id: A batch id or a batch summary. Templated.
    :param wait_for_completion: Wait for ``cancelled`` (deferrable like the sensor).
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id")

    def __init__(self, *, batch_id: Any, wait_for_completion: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("accept_cancelled", True)
        kwargs.setdefault("accept_expired", True)
        kwargs.setdefault("cancel_on_timeout", False)
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.wait_for_completion = wait_for_completion

    def execute(self, context: Mapping[str, Any]) -> BatchSummary:
        batch_id = batch_id_of(self.batch_id)
        self.push_batch_id(context, batch_id)
        try:
            batch = self.hook.cancel_batch(batch_id)
        except OpenAIBatchAPIError as error:
            if not error.refused_for_state:
                raise
            batch = self.hook.get_batch(batch_id)
            if not is_terminal(batch.status):
                raise
            self.log.info("Batch %s had already ended (%s); nothing to cancel", batch_id, batch.status)
            return summarize(batch)
        self.log.info("Cancel requested for batch %s (%s)", batch_id, batch.status)
        if not self.wait_for_completion:
            return summarize(batch)
        return self.wait_for(context, batch_id)


class DownloadResult(BatchSummary):
    """What the download returns (its ``return_value``): the batch summary and where its results landed."""

    #: Where the output / error file was written; ``None`` when the batch has no such file (or an empty error file).
    output_uri: str | None
    error_uri: str | None
    output_lines: int
    error_lines: int
    #: Tokens, from the batch's ``usage`` or else summed over the output lines (``usage_source`` says which).
    usage_totals: dict[str, int]
    usage_source: Literal["batch", "output_lines"] | None
    #: Only with a ``price_table``: ``None`` when the table has no entry for the model.
    cost_estimate: NotRequired[dict[str, Any] | None]


class OpenAIBatchDownloadOperator(OpenAIBatchBaseOperator):
    """
    Stream a batch's output and error files to local or object storage; returns the batch summary plus
    ``output_uri``, ``error_uri``, ``output_lines`` and ``error_lines`` (``None`` / 0 when a file is absent).
    ``output_uri`` and ``error_uri`` are also pushed under their own XCom keys, and logged one line per file.

    :param batch_id: A batch id or the sensor's summary. Templated.
    :param destination: Folder (path, URI or ``ObjectStoragePath``). Templated. Default: a per-run folder under
        ``$AIRFLOW_HOME/openai_batch_results/<dag_id>/<run_id>/<task_id>/``. A mapped task instance writes to
        ``<destination>/<map_index>/``, so mapped downloads never overwrite each other.
    :param delete_remote_files: After a verified download, delete the input, output and error files at
        OpenAI (data-retention rules).
    :param check_counts: Fail when the downloaded lines do not add up to the batch's request count.
    :param price_table: ``{model: {"input": $, "cached_input": $, "output": $}}`` per million tokens; when
        given, a cost estimate is logged and pushed as ``cost_estimate``.
    :param asset: An Asset (or its URI) this download updates; added to ``outlets`` so DAGs scheduled on it run
        after each download. Every Asset outlet's event carries the result locations and counts in ``extra``.

    The result also holds ``usage_totals`` (input, cached input, output, reasoning and total tokens), from the
    batch object when it has usage and summed from the output lines when it does not.

    Files are written to a temporary name and moved into place, so a reader never sees half a file, and a
    retry after a dropped stream starts clean.
    """

    template_fields: Sequence[str] = ("batch_id", "destination", "conn_id")
    operator_extra_links = (OpenAIBatchLink(),)

    def __init__(
        self,
        *,
        batch_id: Any,
        destination: Any = None,
        delete_remote_files: bool = False,
        check_counts: bool = True,
        price_table: dict[str, dict[str, float]] | None = None,
        asset: Any = None,
        **kwargs: Any,
    ) -> None:
        if asset is not None:
            from airflow.providers.common.compat.sdk import Asset

            outlet = asset if isinstance(asset, Asset) else Asset(str(asset))
            kwargs["outlets"] = [*(kwargs.get("outlets") or []), outlet]
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.destination = destination
        self.delete_remote_files = delete_remote_files
        self.check_counts = check_counts
        self.price_table = price_table

    def _folder(self, context: Mapping[str, Any]) -> Any:
        """
        Where the files go. A mapped task instance writes to a subfolder named after its map index, whether
        ``destination`` is given or not: mapped downloads share one ``destination`` argument (``partial``), and
        without it every shard would write the same ``output.jsonl`` over the others.
        """
        ti = context["ti"]
        if self.destination:
            folder = to_storage_path(self.destination)
        else:
            home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
            folder = Path(home) / "openai_batch_results" / ti.dag_id / ti.run_id.replace(":", "_") / ti.task_id
        map_index = getattr(ti, "map_index", -1)
        return folder / str(map_index) if map_index not in (None, -1) else folder

    def execute(self, context: Mapping[str, Any]) -> DownloadResult:
        batch_id = batch_id_of(self.batch_id)
        self.push_batch_id(context, batch_id)
        summary = summarize(self.hook.get_batch(batch_id))
        if not is_terminal(summary["status"]):
            # A wait marked successful, or an id straight from create: the files are not final yet.
            raise BatchNotEndedError(batch_id, summary["status"])
        folder = self._folder(context)
        result = DownloadResult(
            **summary,
            output_uri=None,
            error_uri=None,
            output_lines=0,
            error_lines=0,
            usage_totals={},
            usage_source=None,
        )
        if summary["output_file_id"]:
            target = folder / "output.jsonl"
            downloaded = self.hook.download_file(summary["output_file_id"], target, overwrite=True, keep_empty=True)
            result["output_uri"], result["output_lines"] = str(target), downloaded.lines
            self.log.info("Output: %s lines → %s", f"{downloaded.lines:,}", target)
        else:
            self._remove_earlier(folder / "output.jsonl")
        if summary["error_file_id"]:
            target = folder / "errors.jsonl"
            downloaded = self.hook.download_file(summary["error_file_id"], target, overwrite=True, keep_empty=False)
            # A zero-byte error file (compatible servers send one when nothing failed) is not worth a location.
            if downloaded.bytes:
                result["error_uri"], result["error_lines"] = str(target), downloaded.lines
                self.log.info("Error: %s lines → %s", f"{downloaded.lines:,}", target)
            else:
                self.log.info("Error file %s is empty: no request failed", summary["error_file_id"])
        if result["error_uri"] is None:
            self._remove_earlier(folder / "errors.jsonl")
        self._push_locations(context, result)
        if self.check_counts:
            self._check_counts(result)
        self._add_usage(result)
        tags = metrics.tags_from_context(context, model=result["model"], endpoint=result["endpoint"])
        metrics.tokens_used(result["usage_totals"], tags)
        if result.get("cost_estimate"):
            metrics.cost(result["cost_estimate"]["total"], result["cost_estimate"]["currency"], tags)  # type: ignore[index]
        self._describe_asset_events(context, result)
        self.record_lineage(
            [("files", file_id) for file_id in (summary["output_file_id"], summary["error_file_id"]) if file_id],
            [("storage", uri) for uri in (result["output_uri"], result["error_uri"]) if uri],
        )
        if self.delete_remote_files:
            self._delete_remote(summary)
        return result

    def _remove_earlier(self, target: Any) -> None:
        """
        A result file this batch has none of, left at the destination by an earlier batch (the same folder every
        run): a reader of the folder would take it for this batch's.
        """
        with contextlib.suppress(FileNotFoundError):
            if target.exists():
                remove_file(target)
                self.log.info("Removed %s: an earlier batch's file, and this batch has none", target)

    def _push_locations(self, context: Mapping[str, Any], result: DownloadResult) -> None:
        """
        The result files under their own XCom keys, so the XCom tab shows them at a glance. A file that does not
        exist is not pushed (pulling its key gives ``None``): Airflow 3.0 cannot store ``None`` as an XCom value.
        """
        if not self.do_xcom_push:
            return
        for key, uri in zip(RESULT_LOCATION_KEYS, (result["output_uri"], result["error_uri"]), strict=True):
            if uri is not None:
                context["ti"].xcom_push(key=key, value=uri)

    def _describe_asset_events(self, context: Mapping[str, Any], result: DownloadResult) -> None:
        """Downstream DAGs scheduled on our Assets find where the results are in the triggering event."""
        from airflow.providers.common.compat.sdk import Asset

        events = context.get("outlet_events")
        if events is None:
            return
        extra = {
            "batch_id": result["batch_id"],
            "status": result["status"],
            "output_uri": result["output_uri"],
            "error_uri": result["error_uri"],
            "output_lines": result["output_lines"],
            "error_lines": result["error_lines"],
        }
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                events[outlet].extra.update(extra)

    def _add_usage(self, result: DownloadResult) -> None:
        if result["usage"]:
            result["usage_totals"], result["usage_source"] = normalize_usage(result["usage"]), "batch"
        elif result["output_uri"]:
            result["usage_totals"], result["usage_source"] = sum_usage(result["output_uri"]), "output_lines"
        else:
            result["usage_totals"], result["usage_source"] = normalize_usage(None), None
        self.log.info("Usage of batch %s: %s", result["batch_id"], result["usage_totals"])
        if self.price_table:
            cost = result["cost_estimate"] = estimate_cost(result["usage_totals"], result["model"], self.price_table)
            if cost:
                self.log.info("Estimated cost of batch %s: %s", result["batch_id"], cost)
            else:
                self.log.warning("The price table has no entry for model %s", result["model"])

    @staticmethod
    def _check_counts(result: DownloadResult) -> None:
        expected = expected_result_lines(result)
        if expected is None:
            return
        wrong = [
            f"{lines:,} {kind} lines where {expected[kind]} were expected"
            for kind, lines in (("output", result["output_lines"]), ("error", result["error_lines"]))
            if not expected[kind].holds(lines)
        ]
        if wrong:
            counts = result["request_counts"]
            raise DownloadMismatchError(
                f"Batch {result['batch_id']} ({result['status']}): the result files hold {' and '.join(wrong)}; "
                f"the batch reports {counts['completed']:,} completed and {counts['failed']:,} failed of "
                f"{counts['total']:,} requests."
            )

    def _delete_remote(self, summary: BatchSummary) -> None:
        for key, file_id in (
            ("input_file_id", summary["input_file_id"]),
            ("output_file_id", summary["output_file_id"]),
            ("error_file_id", summary["error_file_id"]),
        ):
            if not file_id:
                continue
            try:
                if key == "input_file_id" and self._input_still_in_use(file_id, summary["batch_id"]):
                    continue
                self.hook.delete_file(file_id)
                self.log.info("Deleted %s %s at OpenAI", key.replace("_id", ""), file_id)
            except OpenAIBatchAPIError as error:
                if not error.not_found:
                    raise

    def _input_still_in_use(self, file_id: str, batch_id: str) -> bool:
        """An input file is shared when uploads are reused by content: keep it while another batch reads it."""
        others = self.hook.batches_reading(file_id, exclude=batch_id)
        if others:
            self.log.info(
                "Kept input file %s at OpenAI: %d other batch(es) still read it (%s)",
                file_id,
                len(others),
                ", ".join(b.id for b in others[:5]),
            )
        return bool(others)
