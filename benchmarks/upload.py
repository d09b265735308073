"""P3: validate and upload a 50,000-request, 200 MB input file; also stdlib json parsing as an anchor."""

from __future__ import annotations

import argparse
import json
import threading
import time

from benchmarks.common import emit, rss_bytes


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
    baseline = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    stats = validate_batch_file(args.path, endpoint="/v1/chat/completions")
    validated = time.perf_counter()
    uploaded = hook.upload_file(args.path)
    finished = time.perf_counter()
    done.set()
    sampler.join()
    emit(
        {
            "validate_wall": validated - started,
            "upload_wall": finished - validated,
            "bytes": stats.bytes,
            "requests": stats.requests,
            "uploaded_bytes": uploaded.bytes,
            "extra_rss": peak - baseline,
        }
    )


if __name__ == "__main__":
    main()
