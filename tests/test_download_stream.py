"""Downloads larger than one read piece: every byte and line arrives, whatever the piece boundaries."""

from __future__ import annotations

import random

from airflow.sdk import ObjectStoragePath

from airflow_provider_openai_batch.hooks.openai_batch import DOWNLOAD_CHUNK_SIZE


def test_a_multi_piece_download_is_byte_exact(hook, tmp_path):
    rng = random.Random(3)
    # Lines of random length, so piece boundaries fall mid-line; the last line has no newline.
    lines = [b'{"custom_id": "r%d", "pad": "%s"}' % (i, b"x" * rng.randrange(10, 9_000)) for i in range(900)]
    content = b"\n".join(lines)
    assert len(content) > 3 * DOWNLOAD_CHUNK_SIZE
    source = tmp_path / "source.jsonl"
    source.write_bytes(content)
    file_id = hook.upload_file(source).id
    local = tmp_path / "copy.jsonl"
    got = hook.download_file(file_id, local)
    assert (got.bytes, got.lines) == (len(content), len(lines))
    assert local.read_bytes() == content
    remote = ObjectStoragePath("memory://downloads/copy.jsonl")
    assert hook.download_file(file_id, remote).lines == len(lines)
    assert remote.read_bytes() == content
