"""OpenAIBatchHook over real HTTP: the real openai SDK against FakeOpenAIServer on a real socket."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
import tracemalloc
from pathlib import Path

import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_openai_batch.exceptions import BatchTimeoutError, OpenAIBatchAPIError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import FakeOpenAIServer
from tests.conftest import FAST, connection_env, jsonl, request_line


def _finished(hook: OpenAIBatchHook, batch_id: str):
    return hook.wait_for_batch(batch_id, poll_interval=0.05, timeout=10)


class TestFiles:
    def test_upload_from_path_bytes_and_stream(self, hook, server, input_file):
        from_path = hook.upload_file(input_file)
        from_bytes = hook.upload_file(input_file.read_bytes(), filename="rows.jsonl")
        with input_file.open("rb") as stream:
            from_stream = hook.upload_file(stream)
        assert from_path.filename == "input.jsonl"
        assert from_bytes.filename == "rows.jsonl"
        assert from_path.bytes == from_bytes.bytes == from_stream.bytes == input_file.stat().st_size
        assert {f.purpose for f in (from_path, from_bytes, from_stream)} == {"batch"}
        assert server.count("files.create") == 3

    def test_upload_from_object_storage_paths(self, hook, server, input_file):
        local = hook.upload_file(ObjectStoragePath(f"file://{input_file}"))
        mem = ObjectStoragePath("memory://bucket/in/input.jsonl")
        mem.parent.mkdir(parents=True, exist_ok=True)
        mem.write_bytes(input_file.read_bytes())
        remote = hook.upload_file(mem)
        assert local.bytes == remote.bytes == input_file.stat().st_size
        assert remote.filename == "input.jsonl"
        assert server.state.files[remote.id].path.read_bytes() == input_file.read_bytes()

    def test_upload_with_expiry(self, hook, input_file):
        uploaded = hook.upload_file(input_file, expires_after_seconds=7 * 86400)
        assert uploaded.expires_at == uploaded.created_at + 7 * 86400

    def test_get_list_delete(self, hook, input_file):
        uploaded = hook.upload_file(input_file)
        assert hook.get_file(uploaded.id).id == uploaded.id
        assert uploaded.id in {f.id for f in hook.list_files(purpose="batch")}
        assert hook.delete_file(uploaded.id).deleted is True
        assert uploaded.id not in {f.id for f in hook.list_files()}
        with pytest.raises(OpenAIBatchAPIError) as raised:
            hook.get_file(uploaded.id)
        assert raised.value.http_status == 404
        assert uploaded.id in str(raised.value)

    def test_list_files_walks_every_page(self, conn_id, monkeypatch):
        with FakeOpenAIServer(timings=FAST, page_limit_cap=2) as srv:
            monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
            hook = OpenAIBatchHook(strict_response_validation=True)
            ids = {hook.upload_file(jsonl([request_line(i)]), filename=f"f{i}.jsonl").id for i in range(7)}
            listed = [f.id for f in hook.list_files()]
            assert set(listed) == ids
            assert len(listed) == 7
            assert srv.count("files.list") == 4  # 2 + 2 + 2 + 1

    def test_download_to_path_and_object_storage(self, hook, server, tmp_path, input_file):
        uploaded = hook.upload_file(input_file)
        downloaded = hook.download_file(uploaded.id, tmp_path / "out" / "copy.jsonl")
        assert downloaded.bytes == input_file.stat().st_size
        assert downloaded.lines == 10
        assert (tmp_path / "out" / "copy.jsonl").read_bytes() == input_file.read_bytes()
        target = ObjectStoragePath("memory://results/copy.jsonl")
        hook.download_file(uploaded.id, target)
        assert target.read_bytes() == input_file.read_bytes()
        with pytest.raises(FileExistsError):
            hook.download_file(uploaded.id, tmp_path / "out" / "copy.jsonl")
        hook.download_file(uploaded.id, tmp_path / "out" / "copy.jsonl", overwrite=True)

    def test_truncated_download_leaves_nothing_and_is_retried(self, hook, server, tmp_path, input_file):
        uploaded = hook.upload_file(input_file)
        server.faults.script("files.content", "truncate")
        target = tmp_path / "res" / "out.jsonl"
        assert hook.download_file(uploaded.id, target).bytes == input_file.stat().st_size
        assert target.read_bytes() == input_file.read_bytes()
        assert server.count("files.content") == 2
        assert sorted(p.name for p in target.parent.iterdir()) == ["out.jsonl"]

    def test_download_cut_every_time_fails_without_a_file(self, hook, server, tmp_path, input_file):
        uploaded = hook.upload_file(input_file)
        server.faults.script("files.content", "truncate", "truncate")
        target = tmp_path / "res" / "out.jsonl"
        with pytest.raises(OpenAIBatchAPIError, match=r"files\.content"):
            hook.download_file(uploaded.id, target, attempts=2)
        assert not target.exists()
        assert list(target.parent.iterdir()) == []

    def test_large_download_memory_stays_bounded(self, hook, server, tmp_path):
        line = json.dumps(request_line(0, padding="x" * 4000)).encode() + b"\n"
        big = tmp_path / "big.jsonl"
        with big.open("wb") as out:
            for _ in range((64 << 20) // len(line)):
                out.write(line)
        uploaded = hook.upload_file(big)
        tracemalloc.start()
        try:
            hook.download_file(uploaded.id, tmp_path / "big-copy.jsonl")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (tmp_path / "big-copy.jsonl").stat().st_size == big.stat().st_size
        # 64 MB went through; the client (and the in-process server) held a few 1 MB chunks at a time.
        assert peak < 16 << 20, f"peak traced memory {peak / 2**20:.1f} MiB"


class TestBatches:
    def test_create_wait_and_summary_fields(self, hook, server, input_file):
        uploaded = hook.upload_file(input_file)
        batch = hook.create_batch(uploaded.id, "/v1/chat/completions", metadata={"team": "etl"})
        assert batch.status == "validating"
        assert batch.metadata == {"team": "etl"}
        done = _finished(hook, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None and done.request_counts.completed == 10
        assert done.usage is not None and done.usage.total_tokens > 0
        assert done.model == "gpt-4o-mini"
        assert done.output_file_id and done.error_file_id is None

    def test_cancel(self, hook, server, input_file):
        uploaded = hook.upload_file(input_file)
        batch = hook.create_batch(uploaded.id, "/v1/chat/completions", metadata={"fake_scenario": "stall"})
        assert hook.cancel_batch(batch.id).status == "cancelling"
        done = _finished(hook, batch.id)
        assert done.status == "cancelled"

    def test_list_batches_walks_every_page_and_find_batch(self, conn_id, monkeypatch, input_file):
        with FakeOpenAIServer(timings=FAST, page_limit_cap=2) as srv:
            monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(srv))
            hook = OpenAIBatchHook(strict_response_validation=True)
            file_id = hook.upload_file(input_file).id
            started = time.time() - 5
            made = [hook.create_batch(file_id, "/v1/chat/completions", metadata={"k": str(i)}) for i in range(5)]
            assert {b.id for b in hook.list_batches()} == {b.id for b in made}
            assert srv.count("batches.list") == 3
            found = hook.find_batch("k", "1", created_after=started)
            assert found is not None and found.id == made[1].id
            assert hook.find_batch("k", "nope", created_after=started) is None

    def test_wait_for_batch_times_out(self, hook, input_file):
        batch = hook.create_batch(
            hook.upload_file(input_file).id, "/v1/chat/completions", metadata={"fake_scenario": "stall"}
        )
        with pytest.raises(BatchTimeoutError, match=batch.id):
            hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=0.3)

    def test_sdk_retries_429_and_5xx(self, hook, server, input_file):
        batch = hook.create_batch(hook.upload_file(input_file).id, "/v1/chat/completions")
        server.faults.script("batches.retrieve", "429", "503", "drop")
        assert hook.get_batch(batch.id).id == batch.id
        assert server.count("batches.retrieve") == 4

    def test_retries_exhausted_give_a_clear_error(self, hook, server):
        server.faults.script("batches.retrieve", *["503"] * 4)
        with pytest.raises(OpenAIBatchAPIError) as raised:
            hook.get_batch("batch_x")
        assert raised.value.http_status == 503
        assert raised.value.retryable
        assert "batches.retrieve" in str(raised.value)
        assert raised.value.request_id and raised.value.request_id in str(raised.value)

    def test_not_found_is_clear(self, hook):
        with pytest.raises(OpenAIBatchAPIError) as raised:
            hook.get_batch("batch_missing")
        assert raised.value.http_status == 404
        assert not raised.value.retryable
        assert "No such Batch object: batch_missing" in str(raised.value)

    def test_wrong_key_is_401_without_the_key(self, server, monkeypatch):
        secret = "sk-wrong-secret-value-123456"
        monkeypatch.setenv(
            "AIRFLOW_CONN_OPENAI_DEFAULT",
            json.dumps({"conn_type": "openai_batch", "host": server.base_url, "password": secret}),
        )
        hook = OpenAIBatchHook()
        with pytest.raises(OpenAIBatchAPIError) as raised:
            hook.get_batch("batch_x")
        assert raised.value.http_status == 401
        assert secret not in str(raised.value) and secret not in repr(raised.value)
        assert raised.value.__cause__ is None and raised.value.__suppress_context__
        ok, message = hook.test_connection()
        assert not ok and "401" in message and secret not in message

    def test_test_connection_ok(self, hook):
        assert hook.test_connection() == (True, "Connection works: the API key can list batches.")


class TestAsync:
    async def test_async_twins_share_one_client(self, conn_id, server, input_file):
        sync_hook = OpenAIBatchHook(conn_id)
        # A stalled batch stays cancellable however slow the machine is.
        batch = sync_hook.create_batch(
            sync_hook.upload_file(input_file).id, "/v1/chat/completions", metadata={"fake_scenario": "stall"}
        )
        first, second = OpenAIBatchHook(conn_id), OpenAIBatchHook(conn_id)
        assert await first.get_async_conn() is await second.get_async_conn()
        got = await first.aget_batch(batch.id)
        assert got.id == batch.id
        assert (await first.aget_file(batch.input_file_id)).id == batch.input_file_id
        assert batch.id in [b.id async for b in second.alist_batches()]
        cancelled = await second.acancel_batch(batch.id)
        assert cancelled.status == "cancelling"

    def test_a_new_loop_gets_a_new_client(self, conn_id):
        hook = OpenAIBatchHook(conn_id)

        clients = []

        async def use_client() -> None:
            client = await hook.get_async_conn()
            assert client is await hook.get_async_conn()  # shared within a loop
            clients.append(client)
            assert [b async for b in hook.alist_batches()] == []  # no "attached to a different loop" error

        asyncio.run(use_client())
        asyncio.run(use_client())
        assert clients[0] is not clients[1]  # both kept alive here, so a reused id cannot hide a shared client

    def test_a_client_left_by_an_ended_loop_is_dropped_quietly(self, conn_id):
        """
        ``dag.test`` runs each trigger in its own loop: the client the last loop left behind is dropped in the next
        one, and closing it there (its connections belong to a closed loop) must not end in an error the loop logs.
        """
        hook = OpenAIBatchHook(conn_id)

        async def use_client() -> None:
            assert [b async for b in hook.alist_batches()] == []  # a connection opened in this loop

        asyncio.run(use_client())
        logged: list[dict[str, object]] = []

        async def next_loop() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda loop, context: logged.append(context))
            await hook.get_async_conn()  # the last loop's client is dropped here
            for _ in range(3):
                gc.collect()
                await asyncio.sleep(0.01)

        asyncio.run(next_loop())
        gc.collect()
        assert [context.get("message") for context in logged] == []

    async def test_async_errors_are_translated(self, conn_id, server):
        hook = OpenAIBatchHook(conn_id)
        with pytest.raises(OpenAIBatchAPIError) as raised:
            await hook.aget_batch("batch_missing")
        assert raised.value.http_status == 404


def test_stream_adapter_for_non_io_objects(hook, input_file):
    class Reader:  # what some fsspec wrappers look like: read/seek/tell but not io.IOBase
        def __init__(self, data: bytes) -> None:
            self._buf = io.BytesIO(data)
            self.name = "wrapped.jsonl"

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(n)

        def seek(self, offset: int, whence: int = 0) -> int:
            return self._buf.seek(offset, whence)

        def tell(self) -> int:
            return self._buf.tell()

        def seekable(self) -> bool:
            return True

    uploaded = hook.upload_file(Reader(input_file.read_bytes()))
    assert uploaded.filename == "wrapped.jsonl"
    assert uploaded.bytes == input_file.stat().st_size


def test_strict_validation_is_really_on(hook):
    assert hook.get_conn()._strict_response_validation is True


def test_file_uri_string_is_read(hook, input_file: Path):
    assert hook.upload_file(f"file://{input_file}").bytes == input_file.stat().st_size
