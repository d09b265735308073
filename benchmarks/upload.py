"""P3: validate and upload a 50,000-request, 200 MB input file; also stdlib json parsing as an anchor."""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import PeakRss, emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", required=True)
    parser.add_argument("--mode", choices=["ours", "stdlib"], default="ours")
    args = parser.parse_args()
    from airflow_provider_openai_batch.batch_file import validate_batch_file
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    if args.mode == "stdlib":
        started = time.perf_counter()
        size = 0
        with open(args.path, "rb") as stream:
            for line in stream:
                json.loads(line)
                size += len(line)
        emit({"validate_wall": time.perf_counter() - started, "bytes": size})
        return
    hook = OpenAIBatchHook()
    hook.get_conn()
    with PeakRss() as peak:
        started = time.perf_counter()
        stats = validate_batch_file(args.path, endpoint="/v1/chat/completions")
        validated = time.perf_counter()
        uploaded = hook.upload_file(args.path)
        finished = time.perf_counter()
    emit(
        {
            "validate_wall": validated - started,
            "upload_wall": finished - validated,
            "bytes": stats.bytes,
            "requests": stats.requests,
            "uploaded_bytes": uploaded.bytes,
            "extra_rss": peak.extra,
        }
    )


if __name__ == "__main__":
    main()
