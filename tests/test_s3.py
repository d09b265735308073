"""
Object storage for real: upload from and download to ``s3://`` through ``ObjectStoragePath`` with the Amazon
provider's connection, against moto's S3 server on loopback (started here, no AWS account involved).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest

pytest.importorskip("airflow.providers.amazon")
moto_server = pytest.importorskip("moto.server")

from airflow.sdk import ObjectStoragePath  # noqa: E402

from airflow_provider_openai_batch.operators.openai_batch import (  # noqa: E402
    OpenAIBatchDownloadOperator,
    OpenAIBatchUploadOperator,
)
from tests.conftest import jsonl, request_line  # noqa: E402

BUCKET = "nightly-batches"
#: ObjectStoragePath takes the Airflow connection from the URI's user part (or from ``conn_id=``).
S3 = f"s3://aws_default@{BUCKET}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """``aws_default`` pointing at moto, and an empty bucket; returns a boto3 client to look at what landed."""
    import boto3

    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    existing = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    if BUCKET in existing:
        for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    else:
        client.create_bucket(Bucket=BUCKET)
    return client


def _keys(client) -> list[str]:
    return sorted(item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_upload_from_s3(s3, server, conn_id):
    body = jsonl([request_line(i) for i in range(12)])
    s3.put_object(Bucket=BUCKET, Key="in/2026-11-24/requests.jsonl", Body=body)
    op = OpenAIBatchUploadOperator(
        task_id="upload", source=f"{S3}/in/2026-11-24/requests.jsonl", endpoint="/v1/chat/completions"
    )
    file_id = op.execute({})
    assert server.state.files[file_id].path.read_bytes() == body
    assert server.state.files[file_id].filename.startswith("requests.")


def test_bad_input_on_s3_is_named_by_its_uri(s3, server, conn_id):
    s3.put_object(Bucket=BUCKET, Key="in/bad.jsonl", Body=b'{"custom_id": 1}\n')
    op = OpenAIBatchUploadOperator(task_id="upload", source=f"{S3}/in/bad.jsonl", endpoint="/v1/chat/completions")
    with pytest.raises(ValueError, match=re.escape(f"{S3}/in/bad.jsonl:line 1, field 'custom_id'")):
        op.execute({})
    assert server.count("files.create") == 0


def test_download_to_s3(s3, hook, server, conn_id):
    rows = [request_line(i, **({"fake_error": {"code": "x"}} if i == 3 else {})) for i in range(9)]
    batch = hook.create_batch(hook.upload_file(jsonl(rows)).id, "/v1/chat/completions")
    done = hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)

    class TI:
        dag_id, task_id, run_id, map_index = "d", "download", "r", -1

        def xcom_push(self, key, value):
            pass

    op = OpenAIBatchDownloadOperator(task_id="download", batch_id=batch.id, destination=f"{S3}/out/run-1/")
    result = op.execute({"ti": TI()})
    assert result["output_uri"] == f"{S3}/out/run-1/output.jsonl"
    assert (result["output_lines"], result["error_lines"]) == (8, 1)
    assert _keys(s3) == ["out/run-1/errors.jsonl", "out/run-1/output.jsonl"]
    stored = s3.get_object(Bucket=BUCKET, Key="out/run-1/output.jsonl")["Body"].read()
    assert stored == server.state.files[done.output_file_id].path.read_bytes()
    assert ObjectStoragePath(result["error_uri"]).read_text().count("\n") == 1


def test_a_cut_download_leaves_no_object(s3, hook, server, conn_id):
    batch = hook.create_batch(hook.upload_file(jsonl([request_line(i) for i in range(5)])).id, "/v1/chat/completions")
    done = hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)
    server.faults.script("files.content", *["truncate"] * 10)
    with pytest.raises(Exception, match=r"files\.content"):
        hook.download_file(done.output_file_id, f"{S3}/out/cut/output.jsonl", attempts=2)
    assert _keys(s3) == []


@pytest.mark.parametrize("name", ["run [nightly]", "out*"], ids=["brackets", "star"])
def test_a_destination_whose_name_looks_like_a_pattern_is_written_as_named(s3, hook, server, conn_id, name):
    """S3 keys may hold ``[``, ``]`` and ``*``: the result lands at that key, with nothing left beside it."""
    batch = hook.create_batch(hook.upload_file(jsonl([request_line(i) for i in range(4)])).id, "/v1/chat/completions")
    done = hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=10)
    hook.download_file(done.output_file_id, f"{S3}/out/{name}/output.jsonl")
    assert _keys(s3) == [f"out/{name}/output.jsonl"]
    hook.download_file(done.output_file_id, f"{S3}/out/{name}/output.jsonl", overwrite=True)  # a retry
    assert _keys(s3) == [f"out/{name}/output.jsonl"]
    stored = s3.get_object(Bucket=BUCKET, Key=f"out/{name}/output.jsonl")["Body"].read()
    assert stored == server.state.files[done.output_file_id].path.read_bytes()


def test_a_work_folder_on_s3_sees_what_another_worker_wrote(s3):
    """
    Two tries of a job on two workers share its work folder: what one writes, the other reads at its next look,
    not what its own process listed before (the filesystem keeps listings it made).
    """
    from airflow_provider_openai_batch.job_state import JobState, JobWorkFolder

    folder = JobWorkFolder(ObjectStoragePath(f"{S3}/work/.out.jsonl.t1.work"))
    folder.mark_try(1)
    folder.save(JobState(owner="try 1"))
    assert not folder.later_try_began(1) and folder.owner() == "try 1"
    # Try 2, another worker: marks the folder and takes the state over (written with boto3, not this process).
    s3.put_object(Bucket=BUCKET, Key="work/.out.jsonl.t1.work/tries/2", Body=b"")
    state = folder.load()
    assert state is not None
    state.owner = "try 2 on another worker"
    s3.put_object(Bucket=BUCKET, Key="work/.out.jsonl.t1.work/state.json", Body=json.dumps(state.to_json()).encode())
    assert folder.later_try_began(1)
    assert folder.owner() == "try 2 on another worker"
    loaded = folder.load()
    assert loaded is not None and loaded.owner == "try 2 on another worker"
    for key in _keys(s3):  # the job ended there and its folder is gone
        s3.delete_object(Bucket=BUCKET, Key=key)
    assert folder.owner() is None and folder.load() is None
