"""
A download killed outright (kill -9 of its worker, the OOM killer) cannot clean up after itself: the retry must
still leave exactly one complete result file and no partial one. (`make e2e` scenario 4 kills a real worker.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

#: A writer that gets half way, says so, and waits to be killed.
KILLED_WRITER = """
import sys, time
from airflow_provider_openai_batch.storage import atomic_writer
with atomic_writer(sys.argv[1], overwrite=True) as out:
    out.write(b'{"custom_id": "req-0"}\\n')
    out.flush()
    print("half way", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize(
    "name",
    ["output.jsonl", "run [1] *.jsonl", "夜" * 78 + ".jsonl"],  # the last one: 240 bytes, of 255 allowed
    ids=["plain", "pattern-characters", "long"],
)
def test_a_retry_after_a_killed_download_leaves_one_complete_file(hook: OpenAIBatchHook, input_file, tmp_path, name):
    batch = hook.create_batch(hook.upload_file(input_file).id, "/v1/chat/completions")
    done = hook.wait_for_batch(batch.id, poll_interval=0.05, timeout=30)
    target = tmp_path / "results" / name
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None
        for line in iter(writer.stdout.readline, b""):  # ends at EOF: a writer that died on the way
            if line == b"half way\n":
                break
        else:
            raise AssertionError("the writer ended before it was half way")
    finally:
        writer.kill()
        writer.wait()
    left = [p.name for p in target.parent.iterdir()]
    assert len(left) == 1 and left[0].endswith(".partial"), left

    downloaded = hook.download_file(str(done.output_file_id), target, overwrite=True)

    assert sorted(p.name for p in target.parent.iterdir()) == [name]
    assert downloaded.lines == 10
    assert len(target.read_bytes().splitlines()) == 10
