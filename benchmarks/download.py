"""P2: stream one large file from the fake server to a local path or a file:// ObjectStoragePath."""

from __future__ import annotations

import argparse
import time

from benchmarks.common import PeakRss, emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file-id", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--mode", choices=["local", "objectstorage"], default="local")
    args = parser.parse_args()
    from airflow.sdk import ObjectStoragePath

    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    hook = OpenAIBatchHook()
    hook.get_conn()
    target = ObjectStoragePath(f"file://{args.dest}") if args.mode == "objectstorage" else args.dest
    with PeakRss() as peak:
        started = time.perf_counter()
        result = hook.download_file(args.file_id, target, overwrite=True)
        wall = time.perf_counter() - started
    emit({"wall": wall, "bytes": result.bytes, "extra_rss": peak.extra})


if __name__ == "__main__":
    main()
