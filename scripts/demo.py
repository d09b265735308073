"""
``make demo``: the batch workflow end to end, offline, against the embedded FakeOpenAIServer.

Upload → create → wait → download through OpenAIBatchHook, then a few results joined to their inputs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="openai-batch-demo-"))
    os.environ.setdefault("AIRFLOW_HOME", str(work / "airflow"))
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.testing import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "openai_batch", "host": server.base_url, "password": server.api_key}
        )
        hook = OpenAIBatchHook()
        inputs = {
            f"city-{i}": f"Name one landmark in {city}."
            for i, city in enumerate(["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn"])
        }
        source = work / "requests.jsonl"
        source.write_text(
            "".join(
                json.dumps(
                    {
                        "custom_id": cid,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
                    }
                )
                + "\n"
                for cid, text in inputs.items()
            )
        )
        uploaded = hook.upload_file(source)
        batch = hook.create_batch(uploaded.id, "/v1/chat/completions")
        print(f"created {batch.id} from {uploaded.id}")
        done = hook.wait_for_batch(batch.id, poll_interval=0.2, timeout=60, on_progress=print)
        if done.status != "completed" or not done.output_file_id:
            print(f"batch ended {done.status}", file=sys.stderr)
            return 1
        output = work / "results" / "output.jsonl"
        hook.download_file(done.output_file_id, output)
        print(f"results downloaded to {output}")
        for line in output.read_text().splitlines()[:3]:
            row = json.loads(line)
            answer = row["response"]["body"]["choices"][0]["message"]["content"]
            print(f"  {row['custom_id']}: {inputs[row['custom_id']]!r} -> {answer!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
