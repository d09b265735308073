"""
The batch workflow as operators: upload, create, download, cancel. Thin on purpose: the hook talks to the API,
``batch_file`` checks input, ``batch_status`` judges outcomes, ``idempotency`` keeps retries from paying twice.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from openai.types import Batch

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
    is_reusable,
    is_terminal,
    summarize,
)
from airflow_provider_openai_batch.endpoints import expiry_problem
from airflow_provider_openai_batch.exceptions import DownloadMismatchError, OpenAIBatchAPIError
from airflow_provider_openai_batch.idempotency import (
    DEFAULT_LOOKBACK,
    IDEMPOTENCY_METADATA_KEY,
    STATE_STORE_KEY,
    build_metadata,
    call_once,
    idempotency_key,
    task_identity,
)
from airflow_provider_openai_batch.links.openai_batch import OpenAIBatchLink
from airflow_provider_openai_batch.operators.base import (
    BatchWaitingOperator,
    OpenAIBatchBaseOperator,
    batch_id_of,
)
from airflow_provider_openai_batch.results import estimate_cost, normalize_usage, sum_usage
from airflow_provider_openai_batch.storage import Source, source_name, source_size, to_storage_path
from airflow_provider_openai_batch.uploads import upload_once


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

    def execute(self, context: Mapping[str, Any]) -> str | list[str]:
        with tempfile.TemporaryDirectory(prefix="openai-batch-upload-") as folder:
            source: Source = self.source
            name = self.filename or (
                f"{context['ti'].task_id}.jsonl" if isinstance(source, (list, tuple)) else source_name(source)
            )
            if isinstance(source, (list, tuple)):
                path = Path(folder) / "requests.jsonl"
                with path.open("wb") as out:
                    out.writelines(encode_requests(self.source))
                source = path
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

    def _too_big(self, source: Source) -> bool:
        """Whether ``source`` must be split; a cheap size check first, a counting pass only when it may be."""
        size = source_size(source)
        # Fewer bytes than two per allowed request (and three per allowed embedding input, the least a JSON array
        # element takes with its comma) means few enough lines and inputs, whatever they hold.
        small = min(self.limits.max_requests * 2, self.limits.max_embedding_inputs * 3)
        if size is not None and self.limits.max_tokens is None and size < small:
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

    :param input_file_id: The uploaded input file (e.g. the upload task's XCom). Templated.
    :param endpoint: ``/v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``, ... Templated.
    :param completion_window: ``"24h"`` at OpenAI; compatible servers may offer others.
    :param metadata: Up to 15 string pairs (one key is reserved for retry safety). Templated.
    :param output_expires_after: Let OpenAI delete the output and error files after this long.
    :param wait_for_completion: Also wait for the batch to end (deferrable like the sensor, same policy).
    :param lookback: How far back a retry looks for the batch an earlier try created.

    The batch id is pushed to XCom (key ``batch_id``) right after the API call, before any wait, so the
    extra link works while the task is deferred. See ``BatchWaitingOperator`` for the waiting options.
    """

    template_fields: Sequence[str] = ("input_file_id", "endpoint", "completion_window", "metadata", "conn_id")
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
        self.lookback = lookback

    def execute(self, context: Mapping[str, Any]) -> str:
        key = idempotency_key(task_identity(context), self.input_file_id, self.endpoint)
        metadata = build_metadata(self.metadata, key)
        batch = self._existing_batch(context, key) or self._create(metadata, key)
        self.record_lineage([("files", self.input_file_id)], [("batches", batch.id)])
        self.push_batch_id(context, batch.id)
        self._remember(context, key, batch.id)
        if self.wait_for_completion:
            self.wait_for(context, batch.id)
        return batch.id

    def execute_complete(self, context: Mapping[str, Any], event: dict[str, Any] | None = None) -> str:
        summary = super().execute_complete(context, event)
        return str(summary["batch_id"])

    def _existing_batch(self, context: Mapping[str, Any], key: str) -> Batch | None:
        """An earlier try's batch that can stand in for a new one: active or completed, never failed/expired."""
        store = context.get("task_state_store")
        if store is not None:
            record = store.get(STATE_STORE_KEY)
            if isinstance(record, dict) and record.get("key") == key:
                try:
                    batch = self.hook.get_batch(str(record["batch_id"]))
                except OpenAIBatchAPIError as error:
                    if error.http_status != 404:
                        raise
                else:
                    if is_reusable(batch.status):
                        self.log.info("Reusing batch %s (%s) from an earlier try", batch.id, batch.status)
                        return batch
        found = self.hook.find_batch(IDEMPOTENCY_METADATA_KEY, key, created_after=self._cutoff())
        if found is not None and is_reusable(found.status):
            self.log.info("Reusing batch %s (%s) that an earlier try created", found.id, found.status)
            return found
        if found is not None:
            self.log.info("The earlier try's batch %s ended %s; creating a new one", found.id, found.status)
        return None

    def _cutoff(self) -> float:
        return time.time() - self.lookback.total_seconds()

    def _create(self, metadata: dict[str, str], key: str) -> Batch:
        def send() -> Batch:
            batch = self.hook.create_batch(
                self.input_file_id,
                self.endpoint,
                completion_window=self.completion_window,
                metadata=metadata,
                output_expires_after_seconds=_as_seconds(self.output_expires_after),
                max_retries=0,
            )
            self.log.info("Created batch %s for %s", batch.id, self.input_file_id)
            return batch

        def find() -> Batch | None:
            found = self.hook.find_batch(IDEMPOTENCY_METADATA_KEY, key, created_after=self._cutoff())
            return found if found is not None and is_reusable(found.status) else None

        return call_once("batches.create", send, find)

    @staticmethod
    def _remember(context: Mapping[str, Any], key: str, batch_id: str) -> None:
        store = context.get("task_state_store")
        if store is not None:
            store.set(STATE_STORE_KEY, {"key": key, "batch_id": batch_id})


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


class OpenAIBatchDownloadOperator(OpenAIBatchBaseOperator):
    """
    Stream a batch's output and error files to local or object storage; returns the batch summary plus
    ``output_uri``, ``error_uri``, ``output_lines`` and ``error_lines`` (``None`` / 0 when a file is absent).

    :param batch_id: A batch id or the sensor's summary. Templated.
    :param destination: Folder (path, URI or ``ObjectStoragePath``). Templated. Default: a per-run folder under
        ``$AIRFLOW_HOME/openai_batch_results/<dag_id>/<run_id>/<task_id>/``.
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
        if self.destination:
            return to_storage_path(self.destination)
        ti = context["ti"]
        home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
        folder = Path(home) / "openai_batch_results" / ti.dag_id / ti.run_id.replace(":", "_") / ti.task_id
        map_index = getattr(ti, "map_index", -1)
        return folder / str(map_index) if map_index not in (None, -1) else folder

    def execute(self, context: Mapping[str, Any]) -> dict[str, Any]:
        batch_id = batch_id_of(self.batch_id)
        self.push_batch_id(context, batch_id)
        summary = summarize(self.hook.get_batch(batch_id))
        folder = self._folder(context)
        result: dict[str, Any] = dict(summary)
        for kind, file_id in (("output", summary["output_file_id"]), ("error", summary["error_file_id"])):
            result[f"{kind}_uri"], result[f"{kind}_lines"] = None, 0
            if not file_id:
                continue
            target = folder / ("output.jsonl" if kind == "output" else "errors.jsonl")
            # A zero-byte error file (compatible servers send one when nothing failed) is not worth a location.
            downloaded = self.hook.download_file(file_id, target, overwrite=True, keep_empty=kind == "output")
            if not downloaded.bytes and kind == "error":
                self.log.info("Error file %s is empty: no request failed", file_id)
                continue
            result[f"{kind}_uri"] = str(target)
            result[f"{kind}_lines"] = downloaded.lines
            self.log.info("Downloaded %s file %s to %s (%s lines)", kind, file_id, target, f"{downloaded.lines:,}")
        if self.check_counts:
            self._check_counts(result)
        self._add_usage(result)
        self._describe_asset_events(context, result)
        self.record_lineage(
            [("files", summary[k]) for k in ("output_file_id", "error_file_id") if summary[k]],
            [("storage", result[k]) for k in ("output_uri", "error_uri") if result[k]],
        )
        if self.delete_remote_files:
            self._delete_remote(summary)
        return result

    def _describe_asset_events(self, context: Mapping[str, Any], result: dict[str, Any]) -> None:
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

    def _add_usage(self, result: dict[str, Any]) -> None:
        if result["usage"]:
            result["usage_totals"], result["usage_source"] = normalize_usage(result["usage"]), "batch"
        elif result["output_uri"]:
            result["usage_totals"], result["usage_source"] = sum_usage(result["output_uri"]), "output_lines"
        else:
            result["usage_totals"], result["usage_source"] = normalize_usage(None), None
        self.log.info("Usage of batch %s: %s", result["batch_id"], result["usage_totals"])
        if self.price_table:
            result["cost_estimate"] = estimate_cost(result["usage_totals"], result["model"], self.price_table)
            if result["cost_estimate"]:
                self.log.info("Estimated cost of batch %s: %s", result["batch_id"], result["cost_estimate"])
            else:
                self.log.warning("The price table has no entry for model %s", result["model"])

    @staticmethod
    def _check_counts(result: dict[str, Any]) -> None:
        expected = expected_result_lines(result)
        if expected is None:
            return
        wrong = [
            f"{result[f'{kind}_lines']:,} {kind} lines where {expected[kind]} were expected"
            for kind in ("output", "error")
            if not expected[kind].holds(result[f"{kind}_lines"])
        ]
        if wrong:
            counts = result["request_counts"]
            raise DownloadMismatchError(
                f"Batch {result['batch_id']} ({result['status']}): the result files hold {' and '.join(wrong)}; "
                f"the batch reports {counts['completed']:,} completed and {counts['failed']:,} failed of "
                f"{counts['total']:,} requests."
            )

    def _delete_remote(self, summary: BatchSummary) -> None:
        for key in ("input_file_id", "output_file_id", "error_file_id"):
            file_id = summary.get(key)
            if not file_id:
                continue
            try:
                self.hook.delete_file(file_id)
                self.log.info("Deleted %s %s at OpenAI", key.replace("_id", ""), file_id)
            except OpenAIBatchAPIError as error:
                if not error.not_found:
                    raise
