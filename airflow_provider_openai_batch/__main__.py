"""
``python -m airflow_provider_openai_batch estimate FILE``: a batch input file's tokens, shards, cost range, queue
fills and queue time, before anything is uploaded; no Airflow configuration, connection or network needed.

    python -m airflow_provider_openai_batch estimate requests.jsonl \\
        --price-table '{"gpt-4o-mini": {"input": 0.075, "output": 0.30}}' --budget 2000000

``--price-table`` takes JSON or the path of a JSON file: batch prices per million tokens, per model (this provider
ships none; they change). Exit status: 0 estimated, 1 the file or the price table is invalid, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _price_table(value: str) -> dict[str, dict[str, float]]:
    text = value if value.lstrip().startswith("{") else Path(value).read_text(encoding="utf-8")
    table = json.loads(text)
    if not isinstance(table, Mapping) or not all(
        isinstance(prices, Mapping)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in prices.items() if k != "currency")
        for prices in table.values()
    ):
        raise ValueError('expected {"model": {"input": <price>, "cached_input": <price>, "output": <price>}, ...}')
    return {str(model): dict(prices) for model, prices in table.items()}


def _positive(value: str) -> int:
    number = int(value.replace("_", "").replace(",", ""))
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_openai_batch", description="OpenAI Batch tools that need no Airflow setup."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    estimate = commands.add_parser(
        "estimate",
        help="tokens, shards, cost range and queue fills of a batch input file",
        description=(__doc__ or "").strip().splitlines()[0],
    )
    estimate.add_argument("file", help="the JSONL input file, a URI (s3://...) or - for standard input")
    estimate.add_argument("--endpoint", help="the batch endpoint every line must use (default: the lines' url)")
    estimate.add_argument("--price-table", help="batch prices per million tokens: JSON, or a JSON file's path")
    estimate.add_argument(
        "--budget",
        type=_positive,
        help="enqueued-token budget: tokens (input plus output caps) the model's batch queue holds at once",
    )
    estimate.add_argument("--max-requests", type=_positive, help="requests per shard (default: OpenAI's 50,000)")
    estimate.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    return parser


def _estimate(args: argparse.Namespace) -> int:
    from airflow_provider_openai_batch.batch_file import ShardLimits
    from airflow_provider_openai_batch.estimate import estimate_file, render_estimate
    from airflow_provider_openai_batch.exceptions import BatchInputError

    try:
        prices = _price_table(args.price_table) if args.price_table else None
    except (OSError, ValueError) as error:
        print(f"--price-table: {error}", file=sys.stderr)
        return 1
    source: Any = sys.stdin.buffer if args.file == "-" else args.file
    limits = ShardLimits(max_requests=args.max_requests) if args.max_requests else None
    try:
        estimate = estimate_file(source, args.endpoint, prices, args.budget, limits=limits)
    except BatchInputError as error:
        print(str(error), file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{args.file}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(json.dumps(estimate, indent=2) if args.json else render_estimate(estimate))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "estimate":
        return _estimate(args)
    return 2  # pragma: no cover - argparse requires a known command


if __name__ == "__main__":
    sys.exit(main())
