"""
P1: N trigger waits in one asyncio loop, as a triggerer runs them, against the fake server in another process.

Prints polls made vs ideal, CPU milliseconds per poll, the loop's lag (a 10 ms ticker: how late it wakes) and the
extra RSS per wait. ``--impl official`` runs apache-airflow-providers-openai's trigger instead (installed in the bench
venv only); ``--impl floor`` runs the least a poll can cost on this HTTP stack: a bare async GET of the same batch
through the SDK's own HTTP client (``openai.DefaultAsyncHttpxClient``, httpx2), JSON decoded, at the same cadence.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import statistics
import threading
import time
import urllib.request
from typing import Any

from benchmarks.common import API_KEY, emit, rss_bytes

TICK = 0.010


def _quiet() -> None:
    for name in ("httpx", "httpx2", "openai", "airflow", "airflow_provider_openai_batch", "airflow.task"):
        logging.getLogger(name).setLevel(logging.WARNING)


class FloorWait:
    """
    The floor: one wait as a bare loop (jittered start, GET, ``json.loads``, sleep) on a shared HTTP client.

    No SDK, no model, no retries, no error handling: what any trigger polling this API over httpx2 must pay
    at least, so ``ours / floor`` says how much the provider adds.
    """

    def __init__(self, client: Any, url: str, interval: float) -> None:
        self.client, self.url, self.interval = client, url, interval

    async def run(self) -> Any:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        await asyncio.sleep(random.uniform(0, self.interval))
        while True:
            response = await self.client.get(self.url, headers=headers)
            response.raise_for_status()
            if json.loads(response.content)["status"] in ("completed", "failed", "expired", "cancelled"):
                yield None
                return
            await asyncio.sleep(self.interval)


def build(impl: str, batch_ids: list[str], n: int, interval: float, duration: float, base_url: str) -> list[Any]:
    # The deadline lies past the measured window, so every trigger is still waiting when the window closes.
    end_time = time.time() + duration + 60
    if impl == "floor":
        import openai

        client = openai.DefaultAsyncHttpxClient()
        return [FloorWait(client, f"{base_url}/batches/{batch_ids[i % len(batch_ids)]}", interval) for i in range(n)]
    if impl == "ours":
        from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchTrigger

        return [
            OpenAIBatchTrigger(
                batch_id=batch_ids[i % len(batch_ids)],
                conn_id="openai_default",
                poll_interval=interval,
                end_time=end_time,
            )
            for i in range(n)
        ]
    from airflow.providers.openai.triggers.openai import OpenAIBatchTrigger as OfficialTrigger

    return [
        OfficialTrigger(
            conn_id="openai_official",
            batch_id=batch_ids[i % len(batch_ids)],
            poll_interval=interval,
            timeout=duration + 60,
        )
        for i in range(n)
    ]


def polls_so_far(stats_url: str) -> int:
    with urllib.request.urlopen(stats_url, timeout=30) as answer:
        return int(json.load(answer)["calls"].get("batches.retrieve", 0))


async def warm_up(impl: str, triggers: list[Any], batch_id: str) -> None:
    """One poll before the baseline: imports, the connection lookup and the shared client are not per wait."""
    if impl == "floor":
        (await triggers[0].client.get(triggers[0].url, headers={"Authorization": f"Bearer {API_KEY}"})).read()
    elif impl == "ours":
        from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

        await OpenAIBatchHook("openai_default").aget_batch_summary(batch_id)
    else:
        from airflow.providers.openai.hooks.openai import OpenAIHook

        OpenAIHook(conn_id="openai_official").get_batch(batch_id)


async def measure(
    impl: str, triggers: list[Any], batch_id: str, duration: float, stats_url: str, freeze: bool, finish: Any
) -> dict[str, Any]:
    """
    Run the waits for ``duration`` seconds of wall time; a thread closes the window, whatever the loop does.

    A loop that blocks (the official trigger calls the blocking SDK in ``run()``) may not come back for minutes
    after the window: then the thread reports the figures so far, the stall in progress counted as one lag, and
    ends the process through ``finish``.
    """
    await warm_up(impl, triggers, batch_id)
    gc.collect()
    if freeze:
        gc.freeze()  # what a long-running service can do after start-up: full collections skip the imports
    baseline = rss_bytes()
    lags: list[tuple[float, float, bool]] = []
    peak = [baseline]
    window: dict[str, float] = {"start": polls_so_far(stats_url), "end": 0, "cpu_start": time.process_time()}
    closed, done = threading.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    next_tick = [started + TICK]  # when the ticker should wake next, in loop time (time.monotonic)
    pauses: list[tuple[float, float]] = []  # full collections, in loop time
    gc_started = [0.0]

    def figures(stalled: float = 0.0) -> dict[str, Any]:
        samples = [*lags, (stalled, next_tick[0] - started, False)] if stalled else list(lags)
        worst = max(samples) if samples else (0.0, 0.0, False)
        values = sorted(lag for lag, _, _ in samples)
        polls = int(window["end"] - window["start"])
        return {
            "polls": polls,
            "cpu_ms_per_poll": 1000 * (window["cpu_end"] - window["cpu_start"]) / max(polls, 1),
            "max_lag_ms": 1000 * worst[0],
            "max_lag_at_s": worst[1],
            "max_lag_outside_gc_ms": 1000 * max((lag for lag, _, in_gc in samples if not in_gc), default=0.0),
            "p99_lag_ms": 1000 * values[int(0.99 * (len(values) - 1))] if values else 0.0,
            "median_lag_ms": 1000 * statistics.median(values) if values else 0.0,
            "extra_rss": peak[0] - baseline,
            "full_gc_runs": len(pauses),
            "full_gc_max_ms": 1000 * max((end - start for start, end in pauses), default=0.0),
            "stalled_at_end": bool(stalled),
        }

    def watch() -> None:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.05)
        window["cpu_end"] = time.process_time()  # the whole process: every poll's HTTP, parsing and loop work
        window["end"] = polls_so_far(stats_url)
        closed.set()
        if not done.wait(10.0):
            finish(figures(stalled=max(0.0, time.monotonic() - next_tick[0])))

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") == 2:
            if phase == "start":
                gc_started[0] = loop.time()
            else:
                pauses.append((gc_started[0], loop.time()))

    gc.callbacks.append(on_gc)

    async def ticker() -> None:
        while not closed.is_set():
            expected = next_tick[0] = loop.time() + TICK
            await asyncio.sleep(TICK)
            woke = loop.time()
            in_gc = any(start < woke and end > expected for start, end in pauses)
            lags.append((max(0.0, woke - expected), expected - started, in_gc))

    async def consume(trigger: Any) -> None:
        async for _ in trigger.run():
            return

    tasks = [asyncio.create_task(consume(t)) for t in triggers]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    await ticker()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    done.set()
    watcher.join()
    gc.callbacks.remove(on_gc)
    return figures()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "official", "floor"], default="ours")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--batches", required=True, help="comma-separated batch ids to wait on")
    parser.add_argument("--stats-url", required=True, help="the fake server's /_fake/stats")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after start-up, before the waits")
    args = parser.parse_args()
    _quiet()
    batch_ids = args.batches.split(",")
    base_url = args.stats_url.split("/_fake/", 1)[0] + "/v1"
    triggers = build(args.impl, batch_ids, args.n, args.interval, args.duration, base_url)

    def finish(result: dict[str, Any]) -> None:
        result["heap_objects"] = len(gc.get_objects())
        result.update(
            impl=args.impl,
            n=args.n,
            ideal_polls=args.n * args.duration / args.interval,
            extra_rss_per_wait=result["extra_rss"] / args.n,
        )
        emit(result)
        if result["stalled_at_end"]:
            os._exit(0)  # the loop is still inside a blocking call: nothing to wait for

    finish(
        asyncio.run(measure(args.impl, triggers, batch_ids[0], args.duration, args.stats_url, args.gc_freeze, finish))
    )


if __name__ == "__main__":
    main()
