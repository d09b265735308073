"""
Uploading a batch input file at most once: shared by the upload operator and the one-task job.

The file name carries a hash of the bytes sent, so a retry (or the next round of a job) finds an earlier upload of
the same content among recent files and reuses it instead of sending 200 MB again; the send itself runs with the
SDK's retries off and looks for a lost attempt's file before sending again (``idempotency.call_once``).

The name is a promise about the content, so it is kept only when true: the bytes are hashed again as they are
sent, and a source that changed after validation is refused before its upload completes (a file made anyway is
deleted). A file of that name at OpenAI therefore holds exactly the hashed bytes and is safe to reuse.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import call_once, content_filename
from airflow_provider_openai_batch.storage import Source

log = logging.getLogger(__name__)


def find_upload(hook: OpenAIBatchHook, filename: str, size: int, reuse_window: timedelta) -> str | None:
    """The id of a recent batch file with this content-hashed name and size, newest first; ``None`` if none."""
    cutoff = time.time() - reuse_window.total_seconds()
    for existing in hook.list_files(purpose="batch"):
        if existing.created_at < cutoff:
            return None
        if existing.filename == filename and existing.bytes == size:
            return existing.id
    return None


def upload_once(
    hook: OpenAIBatchHook,
    source: Source,
    name: str,
    *,
    sha256: str,
    size: int,
    reuse_window: timedelta,
    expires_after_seconds: int | None = None,
    logger: Any = None,
) -> str:
    """
    Upload the first ``size`` bytes of a validated ``source`` (whose hash is ``sha256``) unless the same content
    was uploaded within ``reuse_window``; returns the file id.

    Raises ``BatchInputError`` naming ``source`` when its bytes are no longer the validated ones ("changed between
    validation and upload"); then no file of this content's name is left at OpenAI.
    """
    out = logger or log
    filename = content_filename(name, sha256)
    existing = find_upload(hook, filename, size, reuse_window)
    if existing is not None:
        out.info("Reusing %s: the same content was already uploaded as %s", existing, filename)
        return existing

    def send() -> str:
        return hook.upload_file(
            source,
            purpose="batch",
            filename=filename,
            expires_after_seconds=expires_after_seconds,
            max_retries=0,
            length=size,
            sha256=sha256,
        ).id

    file_id = call_once("files.create", send, lambda: find_upload(hook, filename, size, reuse_window))
    out.info("Uploaded %s as %s", name, file_id)
    return file_id
