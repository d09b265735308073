"""Join 1,000,000 requests across 20 shards' input, output and error files; wall time and peak RSS."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from benchmarks.common import PeakRss, emit

SHARDS, PER_SHARD = 20, 50_000


def generate(folder: Path) -> tuple[list[Path], list[Path]]:
    """20 input shards, and for each an output file in shuffled order plus an error file (1 % failed)."""
    inputs, results = [], []
    rng = random.Random(7)
    for shard in range(SHARDS):
        ids = [f"s{shard:02d}-{i:06d}" for i in range(PER_SHARD)]
        path = folder / f"in-{shard:02d}.jsonl"
        with path.open("w") as out:
            for cid in ids:
                out.write(
                    f'{{"custom_id":"{cid}","method":"POST","url":"/v1/embeddings",'
                    f'"body":{{"model":"text-embedding-3-small","input":"row {cid}"}}}}\n'
                )
        inputs.append(path)
        rng.shuffle(ids)
        output, errors = folder / f"out-{shard:02d}.jsonl", folder / f"err-{shard:02d}.jsonl"
        with output.open("w") as out, errors.open("w") as err:
            for n, cid in enumerate(ids):
                if n % 100 == 0:
                    line = {"id": f"r{n}", "custom_id": cid, "response": {"status_code": 500, "body": {"error": {}}}}
                    err.write(json.dumps(line) + "\n")
                else:
                    body = {"object": "list", "data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 3}}
                    line = {"id": f"r{n}", "custom_id": cid, "response": {"status_code": 200, "body": body}}
                    out.write(json.dumps(line) + "\n")
        results += [output, errors]
    return inputs, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    args = parser.parse_args()
    folder = Path(args.folder)
    inputs = sorted(folder.glob("in-*.jsonl"))
    results = sorted(folder.glob("out-*.jsonl")) + sorted(folder.glob("err-*.jsonl"))
    from airflow_provider_openai_batch.results import iter_joined, write_joined

    with PeakRss(every=0.02) as peak:
        started = time.perf_counter()
        counts = write_joined(iter_joined(inputs, results), folder / "joined.jsonl")
        wall = time.perf_counter() - started
    emit({"wall": wall, "rows": sum(counts.values()), "counts": counts, "extra_rss": peak.extra})


if __name__ == "__main__":
    main()
