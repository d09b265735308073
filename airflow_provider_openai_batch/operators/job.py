"""
OpenAIBatchJobOperator: a whole batch job in one task, deferring while OpenAI works.

Validate and shard → upload each shard → one batch per shard → defer on one trigger for all of them → download →
join to the inputs in input order → resubmit what failed for a transient reason, as bounded rounds → the joined
result at ``destination``. Built from the same hook, status policy, uploads, idempotency and results modules as
the building blocks; nothing here talks to the SDK or decides what a status means.

Crash safety comes from two records that outlive a worker. Every batch carries an idempotency key of (task
instance, endpoint, round, shard, the shard's content hash), found again through ``task_state_store`` or a scan of
recent batches, so a retry never creates a second batch for a shard in a round. Every step's files are written
atomically to a work folder beside ``destination`` (shards, downloads, each round's join), so a retry or a resume
on another worker skips what is on storage and redoes only what is not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypedDict

from openai.types import Batch

from airflow_provider_openai_batch.batch_file import (
    MAX_BYTES_PER_FILE,
    MAX_REQUESTS_PER_FILE,
    OPENAI_BATCH_ENDPOINTS,
    ShardLimits,
    encode_requests,
    shard_batch_file,
)
from airflow_provider_openai_batch.batch_status import (
    BatchSummary,
    JobPolicy,
    RequestCounts,
    evaluate_job,
    format_job_progress,
    is_terminal,
    summarize,
)
from airflow_provider_openai_batch.exceptions import BatchFailedError, BatchTimeoutError, OpenAIBatchAPIError
from airflow_provider_openai_batch.idempotency import (
    DEFAULT_LOOKBACK,
    IDEMPOTENCY_METADATA_KEY,
    build_metadata,
    call_once,
    idempotency_key,
    scan_start,
    task_identity,
)
from airflow_provider_openai_batch.links.openai_batch import OpenAIBatchLink
from airflow_provider_openai_batch.operators.base import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    OpenAIBatchBaseOperator,
    deadline_end_time,
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
from airflow_provider_openai_batch.storage import Source, atomic_writer, to_storage_path
from airflow_provider_openai_batch.triggers.job import (
    EVENT_ENDED,
    EVENT_TIMEOUT,
    JobEventPayload,
    OpenAIBatchJobTrigger,
)
from airflow_provider_openai_batch.triggers.openai_batch import DEFAULT_MAX_POLL_FAILURES
from airflow_provider_openai_batch.uploads import upload_once

#: ``task_state_store`` key of the job's record: ``{"batches": {idempotency key: batch id}}``.
JOB_STATE_KEY = "openai_batch_job"
REQUEST_STATUSES = ("succeeded", "failed", "expired", "cancelled", "missing")


class JobBatch(TypedDict):
    round: int
    shard: int
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


def _seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class OpenAIBatchJobOperator(OpenAIBatchBaseOperator):
    """
    Run a whole batch job in one task: shard, upload, one batch per shard, wait (deferred, one trigger for all),
    download, join in input order, resubmit transient failures, and write the joined result.

    :param source: A local path, a URI or ``ObjectStoragePath`` of a JSONL batch input, or a list of request dicts.
    :param endpoint: The batch endpoint (``/v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``, ...).
    :param destination: Where the joined result goes: JSONL, or Parquet when it ends in ``.parquet``. Written
        atomically once every round has ended. One row per input request, in input order.
    :param work_dir: Where the job keeps its shards, downloads and per-round joins until it ends (default: a hidden
        folder beside ``destination``). Put it on storage every worker reaches (as an object store is) so a resume
        on another worker reuses them; anything missing is made again.
    :param keep_work_dir: Keep the work folder after success (for inspection); by default it is removed.
    :param max_rounds: Rounds in all, the first included: ``2`` sends the requests that failed for a transient
        reason (429, 5xx, ``request_timeout``, expired, cancelled, never answered) once more.
    :param max_failed_requests: Fail the task when more requests than this did not succeed in the end (the joined
        result is written first, so nothing is lost).
    :param max_failed_ratio: The same as a share of all requests (0..1). With neither set, the task fails only
        when no request succeeded.
    :param price_table: ``{model: {"input": $, "cached_input": $, "output": $}}`` per million tokens, for
        ``cost_estimate``.

    Upload options as ``OpenAIBatchUploadOperator`` (``allowed_endpoints``, ``expires_after``, ``reuse_window``,
    ``max_requests_per_file``, ``max_bytes_per_file``, ``max_tokens_per_file``), create options as
    ``OpenAIBatchCreateOperator`` (``completion_window``, ``metadata``, ``output_expires_after``, ``lookback``) and
    waiting options as the sensor (``poll_interval``, ``max_poll_interval``, ``deadline``, ``deferrable``,
    ``cancel_on_timeout``, ``cancel_on_kill``, ``max_poll_failures``).

    Returns ``{joined_uri, counts: {succeeded, failed, expired, cancelled, missing}, batches, rounds,
    usage_totals[, cost_estimate]}``.
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
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        output_expires_after: timedelta | int | None = None,
        lookback: timedelta = DEFAULT_LOOKBACK,
        max_rounds: int = 2,
        max_failed_requests: int | None = None,
        max_failed_ratio: float | None = None,
        price_table: dict[str, dict[str, float]] | None = None,
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
        self.source = source
        self.endpoint = endpoint
        self.destination = destination
        self.work_dir = work_dir
        self.keep_work_dir = keep_work_dir
        self.allowed_endpoints = allowed_endpoints
        self.expires_after_seconds = _as_seconds(_expiry("expires_after", expires_after))
        self.reuse_window = reuse_window
        self.limits = ShardLimits(max_requests_per_file, max_bytes_per_file, max_tokens_per_file)
        self.completion_window = completion_window
        self.metadata = metadata
        self.output_expires_after_seconds = _as_seconds(_expiry("output_expires_after", output_expires_after))
        self.lookback = lookback
        self.max_rounds = int(max_rounds)
        self.policy = JobPolicy(max_failed_requests=max_failed_requests, max_failed_ratio=max_failed_ratio)
        self.price_table = price_table
        self.init_waiting(
            poll_interval, max_poll_interval, deadline, deferrable, cancel_on_timeout, cancel_on_kill, max_poll_failures
        )

    # --- entry points -------------------------------------------------------------------------------

    def execute(self, context: Mapping[str, Any]) -> JobResult:
        return self._advance(context)

    def execute_complete(self, context: Mapping[str, Any], event: JobEventPayload | None = None) -> JobResult:
        """Where the deferred wait resumes: the batches are read again, so the event only says why it woke."""
        status = event.get("status") if event else None
        if event and status == EVENT_TIMEOUT:
            self._on_deadline([str(b) for b in event.get("batch_ids") or []])
        elif status != EVENT_ENDED:
            message = event.get("message") if event else None
            raise BatchFailedError(str(message or f"The job's trigger returned {event!r}"))
        return self._advance(context)

    def resolve_source(self, context: Mapping[str, Any]) -> Any:
        """The job's input; ``@task.openai_batch`` overrides this to call the decorated function."""
        if self.source is None:
            raise ValueError("source is required: a path, URI, ObjectStoragePath or a list of request dicts")
        return self.source

    # --- the job, step by step (each skips what an earlier try or resume already did) ---------------

    def _advance(self, context: Mapping[str, Any]) -> JobResult:
        work = self._work(context)
        joined: list[Any] = []
        batches: list[JobBatch] = []
        summaries: list[BatchSummary] = []
        round_number = 0
        while True:
            shards = self._shards(context, work, round_number)
            if not shards:
                break
            ids = self._batches(context, work, round_number, shards)
            ended = self._wait(context, round_number, ids)
            self._download(work, round_number, ended)
            joined.append(self._join(work, round_number, len(shards)))
            batches += [
                {
                    "round": round_number,
                    "shard": i,
                    "batch_id": s["batch_id"],
                    "status": s["status"],
                    "request_counts": s["request_counts"],
                }
                for i, s in enumerate(ended)
            ]
            summaries += ended
            if round_number + 1 >= self.max_rounds or not self._retry_count(work, round_number):
                break
            round_number += 1
        return self._finish(work, joined, batches, summaries)

    def _work(self, context: Mapping[str, Any]) -> Any:
        if self.work_dir is not None:
            return to_storage_path(self.work_dir)
        target = to_storage_path(self.destination)
        tag = idempotency_key(task_identity(context), "job-work")[:12]
        return target.parent / f".{target.name}.{tag}.work"

    def _shards(self, context: Mapping[str, Any], work: Any, round_number: int) -> list[dict[str, Any]]:
        """The round's input files in the work folder, made once: ``[{requests, bytes, sha256}]`` in input order."""
        folder = work / f"round-{round_number}"
        manifest = folder / "shards.json"
        if manifest.exists():
            return list(json.loads(manifest.read_bytes()))
        with tempfile.TemporaryDirectory(prefix="openai-batch-job-") as scratch:
            if round_number == 0:
                source: Source = self.resolve_source(context)
                if isinstance(source, (list, tuple)):
                    path = Path(scratch) / "requests.jsonl"
                    with path.open("wb") as out:
                        out.writelines(encode_requests(source))
                    source = path
            else:
                source = folder / "retry.jsonl"
            made = shard_batch_file(
                source,
                Path(scratch) / "shards",
                endpoint=self.endpoint,
                allowed_endpoints=self.allowed_endpoints,
                limits=self.limits,
            )
            for i, shard in enumerate(made):
                with atomic_writer(folder / f"input-{i:05d}.jsonl", overwrite=True) as out, shard.path.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        shards: list[dict[str, Any]] = [{"requests": s.requests, "bytes": s.bytes, "sha256": s.sha256} for s in made]
        self._write_json(manifest, shards)
        total = sum(s["requests"] for s in shards)
        self.log.info("Round %d: %s requests in %d shard(s)", round_number + 1, f"{total:,}", len(shards))
        return shards

    def _key(self, context: Mapping[str, Any], round_number: int, shard: int, sha256: str) -> str:
        return idempotency_key(
            task_identity(context),
            "job",
            self.endpoint,
            self.completion_window,
            f"round={round_number}",
            f"shard={shard}",
            sha256,
        )

    def _batches(
        self, context: Mapping[str, Any], work: Any, round_number: int, shards: list[dict[str, Any]]
    ) -> list[str]:
        """One batch per shard in this round, created at most once whatever happened to earlier tries."""
        keys = [self._key(context, round_number, i, s["sha256"]) for i, s in enumerate(shards)]
        store = context.get("task_state_store")
        record = store.get(JOB_STATE_KEY) if store is not None else None
        known: dict[str, str] = dict(record.get("batches") or {}) if isinstance(record, dict) else {}
        missing = [k for k in keys if k not in known]
        if missing:
            found = self._scan(context, set(missing))
            if found:
                # An earlier try created these and was lost before it could record them (or answer lost).
                self.log.info(
                    "Round %d: %d batch(es) an earlier try created are used again: %s",
                    round_number + 1,
                    len(found),
                    ", ".join(batch.id for batch in found.values()),
                )
            known.update({key: batch.id for key, batch in found.items()})
        ids: list[str] = []
        for i, (key, shard) in enumerate(zip(keys, shards, strict=True)):
            if key in known:
                ids.append(known[key])
                continue
            path = work / f"round-{round_number}" / f"input-{i:05d}.jsonl"
            file_id = self._upload(path, round_number, i, shard)
            batch = self._create(context, file_id, key)
            known[key] = batch.id
            self._remember(context, known)
            ids.append(batch.id)
        if store is not None and (record or {}).get("batches") != known:
            self._remember(context, known)
        self.push_batch_id(context, ids[0])
        return ids

    def _scan(self, context: Mapping[str, Any], keys: set[str]) -> dict[str, Batch]:
        """
        Batches carrying any of ``keys``, in one pass over the recent ones (newest first), back to when the DAG
        run started (``idempotency.scan_start``, as the create operator): no try of this run made one before.
        """
        cutoff = scan_start(context, self.lookback)
        found: dict[str, Batch] = {}
        for batch in self.hook.list_batches():
            if batch.created_at < cutoff:
                break
            key = (batch.metadata or {}).get(IDEMPOTENCY_METADATA_KEY)
            if key in keys and key not in found:
                found[key] = batch
                if len(found) == len(keys):
                    break
        return found

    def _upload(self, path: Any, round_number: int, shard: int, stats: dict[str, Any]) -> str:
        return upload_once(
            self.hook,
            path,
            f"{self.task_id}.round{round_number}.part{shard:05d}.jsonl",
            sha256=stats["sha256"],
            size=stats["bytes"],
            reuse_window=self.reuse_window,
            expires_after_seconds=self.expires_after_seconds,
            logger=self.log,
        )

    def _create(self, context: Mapping[str, Any], file_id: str, key: str) -> Batch:
        metadata = build_metadata(self.metadata, key)

        def send() -> Batch:
            batch = self.hook.create_batch(
                file_id,
                self.endpoint,
                completion_window=self.completion_window,
                metadata=metadata,
                output_expires_after_seconds=self.output_expires_after_seconds,
                max_retries=0,
            )
            self.log.info("Created batch %s for %s", batch.id, file_id)
            return batch

        return call_once("batches.create", send, lambda: self._scan(context, {key}).get(key))

    @staticmethod
    def _remember(context: Mapping[str, Any], known: dict[str, str]) -> None:
        store = context.get("task_state_store")
        if store is not None:
            store.set(JOB_STATE_KEY, {"batches": dict(known)})

    def _wait(self, context: Mapping[str, Any], round_number: int, ids: list[str]) -> list[BatchSummary]:
        """The round's batches once all have ended: now, or after one deferral (or a blocking wait)."""
        batches = [self.hook.get_batch(b) for b in ids]
        summaries = [summarize(b) for b in batches]
        label = f"round {round_number + 1}/{self.max_rounds}"
        self.log.info(format_job_progress(summaries, label))
        if all(is_terminal(s["status"]) for s in summaries):
            return summaries
        oldest = min(float(b.created_at) for b in batches)
        end_time = deadline_end_time(oldest, self.completion_window, self.deadline)
        running = [b.id for b in batches if not is_terminal(b.status)]
        if self.deferrable:
            self.defer(
                trigger=OpenAIBatchJobTrigger(
                    batch_ids=running,
                    conn_id=self.conn_id,
                    poll_interval=self.poll_interval,
                    end_time=end_time,
                    created_at=oldest,
                    max_poll_interval=self.max_poll_interval,
                    max_poll_failures=self.max_poll_failures,
                    cancel_on_kill=self.cancel_on_kill,
                    label=f"{self.task_id} {label}",
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=max(0.0, end_time - time.time()) + 2 * self.poll_interval + 900),
            )
        for batch_id in running:
            try:
                self.hook.wait_for_batch(
                    batch_id,
                    self.poll_interval,
                    end_time=end_time,
                    max_poll_interval=self.max_poll_interval,
                    max_poll_failures=self.max_poll_failures,
                )
            except BatchTimeoutError:
                self._on_deadline(running)
        summaries = [summarize(self.hook.get_batch(b)) for b in ids]
        self.log.info(format_job_progress(summaries, label))
        return summaries

    def _on_deadline(self, batch_ids: list[str]) -> None:
        message = f"{len(batch_ids)} batch(es) of the job did not end before the deadline"
        if self.cancel_on_timeout:
            for batch_id in batch_ids:
                try:
                    self.hook.cancel_batch(batch_id)
                except OpenAIBatchAPIError as error:
                    self.log.warning("Could not cancel batch %s: %s", batch_id, error)
            message += "; they were cancelled (a retry collects their partial output and resubmits the rest)"
        raise BatchTimeoutError(message + ".")

    def _download(self, work: Any, round_number: int, summaries: list[BatchSummary]) -> None:
        """Each batch's output and error files, once; ``batch-N.json`` (written last) marks a shard done."""
        folder = work / f"round-{round_number}"
        fetched = 0
        for i, summary in enumerate(summaries):
            marker = folder / f"batch-{i:05d}.json"
            if marker.exists():
                continue
            fetched += 1
            if summary["status"] == "failed":
                # The batch was refused as a whole (its input, a quota): its requests join as missing and are
                # sent again in the next round, if there is one.
                self.log.warning("Batch %s failed: %s", summary["batch_id"], summary.get("errors"))
            if summary["output_file_id"]:
                self.hook.download_file(summary["output_file_id"], folder / f"output-{i:05d}.jsonl", overwrite=True)
            if summary["error_file_id"]:
                self.hook.download_file(
                    summary["error_file_id"], folder / f"error-{i:05d}.jsonl", overwrite=True, keep_empty=False
                )
            self._write_json(marker, summary)
        if fetched:
            earlier = len(summaries) - fetched
            self.log.info(
                "Round %d: downloaded the results of %d batch(es)%s",
                round_number + 1,
                fetched,
                f" ({earlier} downloaded before)" if earlier else "",
            )

    def _join(self, work: Any, round_number: int, shards: int) -> Any:
        """This round's inputs joined to its results (in input order) and the next round's input."""
        folder = work / f"round-{round_number}"
        joined, done = folder / "joined.jsonl", folder / "joined.json"
        if done.exists():
            return joined
        inputs = [folder / f"input-{i:05d}.jsonl" for i in range(shards)]
        results = [
            path
            for i in range(shards)
            for path in (folder / f"output-{i:05d}.jsonl", folder / f"error-{i:05d}.jsonl")
            if path.exists()
        ]
        counts = write_joined(iter_joined(inputs, results), joined)
        retry = 0
        if round_number + 1 < self.max_rounds:
            retry = write_retry_input(joined, work / f"round-{round_number + 1}" / "retry.jsonl")
        self._write_json(done, {"counts": counts, "retry": retry})
        self.log.info(
            "Round %d joined: %s; %s request(s) to send again", round_number + 1, _counts_text(counts), f"{retry:,}"
        )
        return joined

    def _retry_count(self, work: Any, round_number: int) -> int:
        return int(json.loads((work / f"round-{round_number}" / "joined.json").read_bytes())["retry"])

    def _finish(
        self, work: Any, joined: list[Any], batches: list[JobBatch], summaries: list[BatchSummary]
    ) -> JobResult:
        counts = dict.fromkeys(REQUEST_STATUSES, 0)
        counts.update(write_joined(iter_merged(joined), self.destination))
        usage = dict.fromkeys(USAGE_KEYS, 0)
        for batch, summary in zip(batches, summaries, strict=True):
            if summary.get("usage"):
                part = normalize_usage(summary["usage"])
            else:  # a compatible server that reports no usage on the batch: summed from its output
                output = work / f"round-{batch['round']}" / f"output-{batch['shard']:05d}.jsonl"
                part = sum_usage(output) if output.exists() else dict.fromkeys(USAGE_KEYS, 0)
            for key, value in part.items():
                usage[key] += value
        result: JobResult = {
            "joined_uri": str(self.destination),
            "counts": counts,
            "batches": batches,
            "rounds": len(joined),
            "usage_totals": usage,
        }
        if self.price_table:
            model = next((s.get("model") for s in summaries if s.get("model")), None)
            result["cost_estimate"] = estimate_cost(usage, model, self.price_table)
        self.log.info("Job done in %d round(s): %s → %s", len(joined), _counts_text(counts), self.destination)
        if not self.keep_work_dir:
            _remove_tree(work)
        outcome = evaluate_job(counts, self.policy)
        if not outcome.ok:
            raise BatchFailedError(outcome.message)
        (self.log.warning if outcome.warning else self.log.info)(outcome.message)
        return result

    @staticmethod
    def _write_json(path: Any, value: Any) -> None:
        with atomic_writer(path, overwrite=True) as out:
            out.write(json.dumps(value).encode())


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{value:,} {key}" for key, value in counts.items() if value) or "no requests"


def _remove_tree(path: Any) -> None:
    """The work folder, once the result is written (a local folder or one on an object store)."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError, OSError):
        path.fs.rm(path.path, recursive=True)
