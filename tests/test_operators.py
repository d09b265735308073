"""The operators in real DAG runs (dag.test on SQLite) against FakeOpenAIServer over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_openai_batch.exceptions import BatchInputError
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchCancelOperator,
    OpenAIBatchCreateOperator,
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor
from tests.conftest import (
    SUMMARY_KEYS,
    connection_env,
    deferring_server,
    jsonl,
    request_line,
    run_dag,
    task_states,
    xcoms,
)

DOWNLOAD_KEYS = SUMMARY_KEYS | {
    "output_uri",
    "error_uri",
    "output_lines",
    "error_lines",
    "usage_totals",
    "usage_source",
}


@pytest.fixture(autouse=True)
def _db(airflow_db, conn_id):
    return None


def test_full_chain_xcoms_are_the_contract(input_file, tmp_path, monkeypatch):
    with deferring_server() as server:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server))
        _full_chain(server, input_file, tmp_path)


def _full_chain(server, input_file, tmp_path):
    def build():
        up = OpenAIBatchUploadOperator(task_id="upload", source=str(input_file), endpoint="/v1/chat/completions")
        create = OpenAIBatchCreateOperator(
            task_id="create", input_file_id=up.output, endpoint="/v1/chat/completions", metadata={"run": "{{ run_id }}"}
        )
        wait = OpenAIBatchSensor(task_id="wait", batch_id=create.output, deferrable=True, poke_interval=0.1)
        OpenAIBatchDownloadOperator(task_id="download", batch_id=wait.output, destination=str(tmp_path / "res"))

    run = run_dag(build)
    assert set(task_states(run).values()) == {"success"}
    file_id = xcoms(run, "upload")[-1]
    batch_id = xcoms(run, "create")[-1]
    assert isinstance(file_id, str) and file_id.startswith("file-")
    assert isinstance(batch_id, str) and batch_id.startswith("batch_")
    assert xcoms(run, "create", key="batch_id")[-1] == batch_id
    summary = xcoms(run, "wait")[-1]
    assert set(summary) == SUMMARY_KEYS
    assert summary["input_file_id"] == file_id
    downloaded = xcoms(run, "download")[-1]
    assert set(downloaded) == DOWNLOAD_KEYS
    assert downloaded["output_uri"] == str(tmp_path / "res" / "output.jsonl")
    assert downloaded["error_uri"] is None
    assert (downloaded["output_lines"], downloaded["error_lines"]) == (10, 0)
    assert len((tmp_path / "res" / "output.jsonl").read_text().splitlines()) == 10
    assert server.state.batches[batch_id].metadata["run"] == run.run_id  # templated metadata was rendered
    assert server.count_from("batches.retrieve", "AsyncOpenAI") >= 1


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_sensor_poke_and_reschedule_modes(hook, server, input_file, mode):
    batch_id = hook.create_batch(hook.upload_file(input_file).id, "/v1/chat/completions").id

    def build():
        OpenAIBatchSensor(task_id="wait", batch_id=batch_id, deferrable=False, mode=mode, poke_interval=0.1)

    run = run_dag(build)
    assert task_states(run) == {"wait": "success"}
    assert xcoms(run, "wait")[-1]["status"] == "completed"
    assert server.count_from("batches.retrieve", "AsyncOpenAI") == 0  # polled from the worker, not a trigger


def test_templated_fields_render(server, input_file):
    def build():
        up = OpenAIBatchUploadOperator(
            task_id="upload", source="{{ params.input }}", endpoint="{{ params.endpoint }}", filename="{{ ds }}.jsonl"
        )
        create = OpenAIBatchCreateOperator(
            task_id="create", input_file_id="{{ ti.xcom_pull('upload') }}", endpoint="{{ params.endpoint }}"
        )
        wait = OpenAIBatchSensor(task_id="wait", batch_id="{{ ti.xcom_pull('create') }}", poke_interval=0.1)
        up >> create >> wait

    run = run_dag(build, params={"input": str(input_file), "endpoint": "/v1/chat/completions"})
    assert set(task_states(run).values()) == {"success"}
    (uploaded,) = [f for f in server.state.files.values() if f.purpose == "batch"]
    assert uploaded.filename.startswith(run.logical_date.strftime("%Y-%m-%d."))
    assert xcoms(run, "wait")[-1]["request_counts"]["completed"] == 10


def test_create_waits_when_asked(server, input_file):
    def build():
        up = OpenAIBatchUploadOperator(task_id="upload", source=str(input_file), endpoint="/v1/chat/completions")
        OpenAIBatchCreateOperator(
            task_id="create",
            input_file_id=up.output,
            endpoint="/v1/chat/completions",
            wait_for_completion=True,
            deferrable=False,
            poll_interval=0.1,
        )

    run = run_dag(build)
    assert set(task_states(run).values()) == {"success"}
    assert server.state.status(next(iter(server.state.batches.values()))) == "completed"


def test_cancel_keeps_partial_output(hook, server, input_file):
    batch_id = hook.create_batch(
        hook.upload_file(input_file).id, "/v1/chat/completions", metadata={"fake_scenario": "stall"}
    ).id

    def build():
        cancel = OpenAIBatchCancelOperator(task_id="cancel", batch_id=batch_id, deferrable=True, poll_interval=0.1)
        OpenAIBatchDownloadOperator(task_id="download", batch_id=cancel.output)

    import time

    time.sleep(0.1)  # past validating
    run = run_dag(build)
    assert set(task_states(run).values()) == {"success"}
    summary = xcoms(run, "cancel")[-1]
    assert summary["status"] == "cancelled"
    assert summary["output_file_id"]
    # Requests that never ran are not counted as failed, as OpenAI reports a cancelled batch ...
    assert summary["request_counts"] == {"total": 10, "completed": 3, "failed": 0}
    downloaded = xcoms(run, "download")[-1]
    assert downloaded["output_lines"] == 3
    assert downloaded["error_lines"] == 7  # ... but written to the error file as batch_cancelled


@pytest.mark.parametrize("refusal", [None, "400"], ids=["409-from-the-fake", "400"])
def test_cancel_of_an_ended_batch_is_not_an_error(hook, server, input_file, refusal):
    batch_id = hook.create_batch(hook.upload_file(input_file).id, "/v1/chat/completions").id
    hook.wait_for_batch(batch_id, poll_interval=0.05, timeout=120)
    if refusal:  # OpenAI does not document the status for "already ended": 400 is read the same way as 409
        server.faults.script("batches.cancel", refusal)

    def build():
        OpenAIBatchCancelOperator(task_id="cancel", batch_id=batch_id)

    run = run_dag(build)
    assert xcoms(run, "cancel")[-1]["status"] == "completed"


def test_download_to_object_storage_and_delete_remote(hook, server, tmp_path):
    rows = [request_line(i, **({"fake_error": {"code": "x"}} if i == 4 else {})) for i in range(6)]
    batch = hook.create_batch(hook.upload_file(jsonl(rows)).id, "/v1/chat/completions")
    done = hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)

    def build():
        OpenAIBatchDownloadOperator(
            task_id="download",
            batch_id=batch.id,
            destination="memory://results/run1",
            delete_remote_files=True,
            price_table={"gpt-4o-mini": {"input": 0.075, "output": 0.30}},
        )

    run = run_dag(build)
    result = xcoms(run, "download")[-1]
    assert result["output_uri"] == "memory://results/run1/output.jsonl"
    assert result["error_uri"] == "memory://results/run1/errors.jsonl"
    assert (result["output_lines"], result["error_lines"]) == (5, 1)
    totals = result["usage_totals"]
    assert result["usage_source"] == "batch"
    assert totals["input_tokens"] == done.usage.input_tokens and totals["output_tokens"] == done.usage.output_tokens
    expected = (totals["input_tokens"] * 0.075 + totals["output_tokens"] * 0.30) / 1e6
    assert result["cost_estimate"] == {"model": "gpt-4o-mini", "currency": "USD", "total": round(expected, 6)}
    errors = ObjectStoragePath(result["error_uri"]).read_text().splitlines()
    assert json.loads(errors[0])["custom_id"] == "req-4"
    for file_id in (done.input_file_id, done.output_file_id, done.error_file_id):
        assert file_id not in server.state.files
    assert server.count("files.delete") == 3


def test_a_download_to_a_fixed_folder_leaves_no_earlier_batchs_file_there(hook, server):
    """
    The same destination every night: a batch with no error file (nothing failed) or no output file (everything
    failed) leaves no ``errors.jsonl`` / ``output.jsonl`` of an earlier night for a reader of the folder to take.
    """

    tonight: list[str] = []

    def build():
        OpenAIBatchDownloadOperator(task_id="download", batch_id=tonight[-1], destination="memory://nightly/labels")

    def night(rows: list[dict]) -> dict:
        batch = hook.create_batch(hook.upload_file(jsonl(rows)).id, "/v1/chat/completions")
        hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)
        tonight.append(batch.id)
        return xcoms(run_dag(build), "download")[-1]

    folder = ObjectStoragePath("memory://nightly/labels")
    first = night([request_line(i, **({"fake_error": {"code": "x"}} if i == 2 else {})) for i in range(4)])
    assert (first["output_lines"], first["error_lines"]) == (3, 1)
    assert sorted(p.name for p in folder.iterdir()) == ["errors.jsonl", "output.jsonl"]
    second = night([request_line(i) for i in range(5)])
    assert second["error_uri"] is None and second["output_lines"] == 5
    assert sorted(p.name for p in folder.iterdir()) == ["output.jsonl"]
    third = night([request_line(i, fake_error={"code": "x"}) for i in range(2)])
    assert third["output_uri"] is None and third["error_lines"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["errors.jsonl"]


def test_download_default_folder_is_per_run(hook, server, input_file):
    batch = hook.create_batch(hook.upload_file(input_file).id, "/v1/chat/completions")
    hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)

    def build():
        OpenAIBatchDownloadOperator(task_id="download", batch_id=batch.id)

    run = run_dag(build)
    uri = Path(xcoms(run, "download")[-1]["output_uri"])
    assert uri.exists()
    assert run.run_id.replace(":", "_") in str(uri)


@pytest.mark.parametrize("scenario", ["complete", "expire"])
def test_download_detects_missing_lines(hook, server, input_file, scenario):
    file_id = hook.upload_file(input_file).id
    batch = hook.create_batch(file_id, "/v1/chat/completions", metadata={"fake_scenario": scenario})
    done = hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=120)
    assert done.output_file_id  # expired half way: five output lines, five batch_expired error lines
    stored = server.state.files[done.output_file_id]
    stored.path.write_bytes(b"".join(stored.path.read_bytes().splitlines(keepends=True)[:-1]))
    stored.bytes = stored.path.stat().st_size

    def build():
        OpenAIBatchDownloadOperator(task_id="download", batch_id=batch.id)

    run = run_dag(build)
    assert task_states(run) == {"download": "failed"}


def test_upload_rejects_bad_input_before_sending(server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([request_line(0), {"custom_id": "req-0", "method": "GET", "url": "/v1/x", "body": {}}]))
    op = OpenAIBatchUploadOperator(task_id="upload", source=str(bad), endpoint="/v1/chat/completions")
    with pytest.raises(BatchInputError) as raised:
        op.execute({"ti": None})
    text = str(raised.value)
    assert f"{bad}:line 2, field 'custom_id': duplicate custom_id 'req-0'" in text
    assert f"{bad}:line 2, field 'method'" in text
    assert f"{bad}:line 2, field 'url'" in text
    assert f"{bad}:line 2, field 'body.model'" in text
    assert server.count("files.create") == 0


def test_upload_of_the_same_content_is_reused(server, input_file):
    op = OpenAIBatchUploadOperator(task_id="upload", source=str(input_file), endpoint="/v1/chat/completions")
    first = op.execute({})
    second = op.execute({})
    assert first == second
    assert server.count("files.create") == 1
    changed = input_file.read_bytes() + json.dumps(request_line(99)).encode() + b"\n"
    input_file.write_bytes(changed)
    assert op.execute({}) != first
    assert server.count("files.create") == 2
