"""``python -m airflow_provider_openai_batch.testing --port 8787``: the fake server in the foreground."""

from __future__ import annotations

import argparse
import sys

from airflow_provider_openai_batch.testing.server import FakeOpenAIServer
from airflow_provider_openai_batch.testing.state import Timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An embedded, offline OpenAI Files + Batches API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--api-key", default="sk-fake-test-key", help="bearer key to require ('' accepts any)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--validating", type=float, default=0.2, help="seconds a batch spends validating")
    parser.add_argument("--in-progress", type=float, default=0.6, help="seconds a batch spends in progress")
    parser.add_argument("--finalizing", type=float, default=0.2, help="seconds a batch spends finalizing")
    parser.add_argument("--scenario", default="complete", choices=["complete", "expire", "fail", "stall"])
    parser.add_argument("--chaos", type=float, default=0.0, help="share of calls failing with transient faults")
    parser.add_argument(
        "--queue-limit", action="append", default=[], metavar="MODEL=TOKENS", help="a model's enqueued-token queue"
    )
    parser.add_argument(
        "--request-queue-limit", action="append", default=[], metavar="MODEL=REQUESTS", help="a request queue"
    )
    args = parser.parse_args(argv)

    def limits(values: list[str]) -> dict[str, int] | None:
        pairs = [value.rsplit("=", 1) for value in values]
        return {model: int(number) for model, number in pairs} if pairs else None

    server = FakeOpenAIServer(
        api_key=args.api_key or None,
        host=args.host,
        port=args.port,
        latency=args.latency,
        scenario=args.scenario,
        timings=Timings(validating=args.validating, in_progress=args.in_progress, finalizing=args.finalizing),
        queue_limits=limits(args.queue_limit),
        request_queue_limits=limits(args.request_queue_limit),
    )
    if args.chaos:
        server.faults.chaos(args.chaos)
    print(f"FakeOpenAIServer listening on http://{args.host}:{args.port}/v1", flush=True)
    # The server's own process: requests take the interpreter lock from the worker thread (validating inputs, writing
    # answers) within half a millisecond instead of Python's default five, as OpenAI answers whatever it is running.
    sys.setswitchinterval(0.0005)
    server.serve_forever()


if __name__ == "__main__":
    main()
