"""
API calls per wait: the real trigger, as a default-configured sensor defers it, waiting for a batch that takes
1 h on the fake server's clock; the clock and the trigger's sleeps are virtual, so an hour passes in a second.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import time
import types
from typing import Any

from benchmarks.common import emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours-default", "ours-fixed", "official"], default="ours-default")
    args = parser.parse_args()
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.operators.base import (
        DEADLINE_MARGIN,
        DEFAULT_MAX_POLL_INTERVAL,
        DEFAULT_POLL_INTERVAL,
    )
    from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Timings

    clock = FakeClock()

    async def virtual_sleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    fake_time = types.SimpleNamespace(time=clock, monotonic=clock)
    fake_asyncio = types.SimpleNamespace(sleep=virtual_sleep)
    timings = Timings(validating=60, in_progress=3_480, finalizing=60)
    with FakeOpenAIServer(clock=clock, timings=timings, api_key="sk-polls") as server:
        conn = {"conn_type": "openai_batch", "host": server.base_url, "password": "sk-polls"}
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = json.dumps(conn)
        os.environ["AIRFLOW_CONN_OPENAI_OFFICIAL"] = json.dumps({**conn, "conn_type": "openai"})
        hook = OpenAIBatchHook()
        file_id = hook.upload_file(
            b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}\n'
        ).id
        batch = hook.create_batch(file_id, "/v1/embeddings")
        end_time = batch.created_at + 86_400 + DEADLINE_MARGIN.total_seconds()
        trigger: Any
        module: Any
        if args.impl.startswith("ours"):
            module = importlib.import_module("airflow_provider_openai_batch.triggers.openai_batch")
            trigger = module.OpenAIBatchTrigger(
                batch_id=batch.id,
                conn_id="openai_default",
                poll_interval=DEFAULT_POLL_INTERVAL,
                end_time=end_time,
                created_at=batch.created_at,
                max_poll_interval=DEFAULT_MAX_POLL_INTERVAL if args.impl == "ours-default" else None,
            )
        else:
            module = importlib.import_module("airflow.providers.openai.triggers.openai")
            trigger = module.OpenAIBatchTrigger(
                conn_id="openai_official", batch_id=batch.id, poll_interval=60, timeout=86_400
            )
        module.time = fake_time
        module.asyncio = fake_asyncio
        server.reset_counters()

        async def wait() -> dict[str, Any]:
            async for event in trigger.run():
                return dict(event.payload)
            return {}

        started = clock()
        event = asyncio.run(wait())
        emit(
            {
                "impl": args.impl,
                "polls": server.count("batches.retrieve"),
                "batch_minutes": (timings.validating + timings.in_progress + timings.finalizing) / 60,
                "noticed_after_s": clock() - started - (timings.validating + timings.in_progress + timings.finalizing),
                "status": event.get("status"),
                # The official trigger's event has no summary; ours must show the batch really ran its hour.
                "batch_status": (event.get("summary") or {}).get("status"),
                "real_seconds": time.process_time(),
            }
        )


if __name__ == "__main__":
    main()
