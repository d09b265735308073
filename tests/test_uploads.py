"""
Uploading a batch input at most once (``uploads.py``), through the fake server with the real SDK: the same content
is found again by its content-hashed name and size within ``reuse_window``; anything else is sent, once, even when
the answer to the send is lost.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_provider_openai_batch import idempotency
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.idempotency import content_filename
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer
from airflow_provider_openai_batch.uploads import find_upload, upload_once
from tests.conftest import FAST, connection_env, jsonl, request_line

WINDOW = timedelta(hours=48)


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idempotency, "RETRY_BASE_DELAY", 0.01)


@pytest.fixture
def content(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([request_line(i) for i in range(5)]))
    return path


def _digest(path: Path, size: int | None = None) -> tuple[str, int]:
    data = path.read_bytes()[:size]
    return hashlib.sha256(data).hexdigest(), len(data)


def _upload(hook: OpenAIBatchHook, path: Path, size: int | None = None) -> str:
    sha256, length = _digest(path, size)
    return upload_once(hook, path, path.name, sha256=sha256, size=length, reuse_window=WINDOW)


def test_the_same_content_is_uploaded_once(hook, server, content):
    first = _upload(hook, content)
    second = _upload(hook, content)
    assert first == second
    assert server.count("files.create") == 1
    stored = server.state.files[first]
    assert stored.filename == content_filename("requests.jsonl", _digest(content)[0])
    assert stored.filename.startswith("requests.") and stored.filename.endswith(".jsonl")
    assert stored.path.read_bytes() == content.read_bytes()


def test_other_content_is_a_new_upload(hook, server, content, tmp_path):
    other = tmp_path / "other" / "requests.jsonl"
    other.parent.mkdir()
    other.write_bytes(jsonl([request_line(i) for i in range(6)]))
    assert _upload(hook, content) != _upload(hook, other)
    assert server.count("files.create") == 2


def test_only_the_validated_bytes_are_sent(hook, server, content):
    size = len(content.read_bytes().splitlines(keepends=True)[0]) * 2  # the first two lines
    file_id = _upload(hook, content, size)
    assert server.state.files[file_id].path.read_bytes() == content.read_bytes()[:size]
    assert _upload(hook, content) != file_id  # the whole file is other content


def test_a_file_with_the_name_but_not_the_size_is_not_reused(hook, server, content):
    sha256, size = _digest(content)
    name = content_filename(content.name, sha256)
    hook.upload_file(b"something else\n", filename=name)
    assert find_upload(hook, name, size, WINDOW) is None


def test_a_file_of_another_purpose_is_not_reused(hook, server, content):
    sha256, size = _digest(content)
    name = content_filename(content.name, sha256)
    hook.upload_file(content, purpose="user_data", filename=name)
    assert find_upload(hook, name, size, WINDOW) is None


def test_the_newest_of_several_matching_uploads_is_taken(hook, server, content):
    sha256, size = _digest(content)
    name = content_filename(content.name, sha256)
    older = hook.upload_file(content, filename=name).id
    newer = hook.upload_file(content, filename=name).id
    assert find_upload(hook, name, size, WINDOW) == newer != older


@pytest.fixture
def three_days_ago(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeOpenAIServer, OpenAIBatchHook]]:
    """A server whose clock reads three days ago: what it stores now is three days old to the provider."""
    with FakeOpenAIServer(timings=FAST, clock=FakeClock(start=time.time() - 3 * 86_400)) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
        yield srv, OpenAIBatchHook()


def test_an_upload_older_than_the_reuse_window_is_sent_again(three_days_ago, content):
    srv, hook = three_days_ago
    first = _upload(hook, content)
    sha256, size = _digest(content)
    name = content_filename(content.name, sha256)
    assert find_upload(hook, name, size, timedelta(hours=48)) is None
    assert find_upload(hook, name, size, timedelta(days=4)) == first
    assert _upload(hook, content) != first
    assert srv.count("files.create") == 2


def test_an_upload_whose_answer_was_lost_is_not_sent_again(hook, server, content):
    server.faults.script("files.create", "drop_after")  # stored, then the connection drops before the answer
    file_id = _upload(hook, content)
    assert len(server.state.files) == 1 and file_id in server.state.files
    assert server.count("files.create") == 1


def test_an_upload_that_failed_before_taking_effect_is_sent_again(hook, server, content):
    server.faults.script("files.create", "503")
    file_id = _upload(hook, content)
    assert list(server.state.files) == [file_id]
    assert server.count("files.create") == 2


def test_an_upload_refused_for_good_is_not_retried(hook, server, content):
    from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError

    server.faults.script("files.create", "403")
    with pytest.raises(OpenAIBatchAPIError) as raised:
        _upload(hook, content)
    assert raised.value.http_status == 403
    assert server.count("files.create") == 1 and not server.state.files
