"""
``python -m benchmarks.tokens``: how fast request tokens are counted, and how far the byte heuristic is from the
real tokenizers (the figures ``tokens.py`` states in its docstring come from here).

Throughput: 200,000 varied chat / responses / embeddings lines, each decoded with msgspec and counted with
``request_tokens``, against the anchor of the same lines through ``BatchFileValidator.check_line`` (what the
sharding pass already does per line). Accuracy: text the project already has on disk (Python's documentation,
standard-library source, Airflow's JSON schemas and its UI translations into 21 languages), in chunks of 100 to
3,000 characters, heuristic count over the real o200k_base and cl100k_base count.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.common import rss_bytes, run_child

LINES = 200_000
#: The tokenizer sets the pace (its Rust ``count`` holds the GIL, so threads do not help): walking the bodies may add
#: at most this much to the time of counting the same strings directly.
GOAL_OVERHEAD = 1.25

_LATIN = ("ca", "de", "es", "fr", "hu", "it", "nl", "pl", "pt", "tr")
_OTHER_SCRIPTS = ("ar", "el", "he", "hi", "ja", "ko", "ru", "th", "zh-CN", "zh-TW")


def _site_file(*parts: str) -> Path:
    import airflow

    return Path(airflow.__file__).parent.joinpath(*parts)


def _chunks(text: str, count: int, rng: random.Random, low: int = 100, high: int = 3000) -> list[str]:
    out = []
    for _ in range(count):
        size = min(len(text), rng.randint(low, high))
        start = rng.randint(0, len(text) - size)
        out.append(text[start : start + size])
    return [chunk for chunk in out if chunk.strip()]


def corpus(rng: random.Random) -> dict[str, list[str]]:
    """Text of five kinds, from files every installation of this provider has."""
    import pydoc_data.topics

    english = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    stdlib = Path(os.__file__).parent
    code = "\n".join(
        path.read_text(encoding="utf-8")
        for name in ("json", "email", "asyncio")
        for path in sorted((stdlib / name).glob("*.py"))
    )
    schemas = [_site_file("provider.yaml.schema.json"), _site_file("sdk", "execution_time", "schema", "schema.json")]
    loaded = [json.loads(path.read_text(encoding="utf-8")) for path in schemas if path.exists()]
    json_text = "\n".join(
        json.dumps(doc, indent=2) + json.dumps(doc) + json.dumps(doc, ensure_ascii=False) for doc in loaded
    )

    def walk(node: Any, values: list[str]) -> None:
        if isinstance(node, dict):
            for item in node.values():
                walk(item, values)
        elif isinstance(node, str):
            values.append(node)

    def translations(langs: tuple[str, ...]) -> dict[str, str]:
        texts = {}
        for lang in langs:
            values: list[str] = []
            for path in sorted(glob.glob(str(_site_file("ui", "dist", "i18n", "locales", lang, "*.json")))):
                walk(json.loads(Path(path).read_text(encoding="utf-8")), values)
            if values:
                texts[lang] = " ".join(values)
        return texts

    kinds = {
        "English (Python docs)": _chunks(english, 150, rng),
        "code (stdlib)": _chunks(code, 150, rng),
        "JSON (Airflow schemas)": _chunks(json_text, 150, rng),
        "Latin with accents": [c for t in translations(_LATIN).values() for c in _chunks(t, 15, rng, 100, 1500)],
        "other scripts": [c for t in translations(_OTHER_SCRIPTS).values() for c in _chunks(t, 15, rng, 100, 1500)],
    }
    return {kind: texts for kind, texts in kinds.items() if texts}


def accuracy(rng: random.Random) -> tuple[list[tuple[str, str, float, float, int]], float, float]:
    from airflow_provider_openai_batch import tokens

    rows = []
    lowest, highest = float("inf"), 0.0
    counters = {name: tokens.counter_for_model(model) for name, model in (("o200k", "gpt-4o"), ("cl100k", "gpt-4"))}
    for kind, texts in corpus(rng).items():
        for name, counter in counters.items():
            if counter.tokenizer == "heuristic":
                raise SystemExit("bpe-openai is not installed: the heuristic cannot be measured against it")
            ratios = [tokens.heuristic_count(text) / max(1, counter.count(text)) for text in texts]
            rows.append((kind, name, min(ratios), max(ratios), len(texts)))
            lowest, highest = min(lowest, *ratios), max(highest, *ratios)
    return rows, lowest, highest


def request_lines(count: int, rng: random.Random) -> list[bytes]:
    """Chat, responses and embeddings lines of varied size, as a real job's input has them."""
    words = ("the", "a", "batch", "of", "requests", "model", "token", "cost", "queue", "review", "order", "late")
    encoder = msgspec.json.Encoder()
    lines = []
    for n in range(count):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 400)))
        kind = n % 3
        if kind == 0:
            body: dict[str, Any] = {
                "model": "gpt-4o-mini",
                "max_completion_tokens": 256,
                "messages": [
                    {"role": "system", "content": "You summarize customer reviews in one sentence."},
                    {"role": "user", "content": [{"type": "text", "text": text}]},
                ],
            }
            url = "/v1/chat/completions"
        elif kind == 1:
            body = {
                "model": "gpt-4o-mini",
                "instructions": "Classify the review.",
                "input": text,
                "max_output_tokens": 16,
            }
            url = "/v1/responses"
        else:
            body = {"model": "text-embedding-3-small", "input": [text, text[: len(text) // 2]]}
            url = "/v1/embeddings"
        lines.append(encoder.encode({"custom_id": f"r{n}", "method": "POST", "url": url, "body": body}))
    return lines


class _Line(msgspec.Struct):
    url: str
    body: dict[str, Any]


def throughput(lines: list[bytes]) -> dict[str, float]:
    from airflow_provider_openai_batch import tokens
    from airflow_provider_openai_batch.batch_file import BatchFileValidator

    decoder = msgspec.json.Decoder(_Line)

    def timed(fn: Any) -> float:
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    def validate() -> None:
        validator = BatchFileValidator(allowed_endpoints=None)
        for number, raw in enumerate(lines, start=1):
            validator.check(number, raw)

    total = 0

    def count() -> None:
        nonlocal total
        total = 0
        for raw in lines:
            line = decoder.decode(raw)
            total += tokens.request_tokens(line.body, line.url).input_tokens

    bodies = [decoder.decode(raw) for raw in lines]
    strings: list[tuple[Any, str]] = []
    for line in bodies:
        counter = tokens.counter_for_model(line.body["model"])
        for message in line.body.get("messages", []):
            content = message["content"]
            strings.append((counter, message["role"]))
            strings.append((counter, content if isinstance(content, str) else content[0]["text"]))
        for key in ("instructions", "input"):
            value = line.body.get(key)
            for text in [value] if isinstance(value, str) else value or []:
                strings.append((counter, text))

    def raw_count() -> None:
        for counter, text in strings:
            counter.count(text)

    def count_heuristic() -> None:
        for raw in lines:
            line = decoder.decode(raw)
            tokens.request_tokens(line.body, line.url, tokens.HEURISTIC)

    validate_s, count_s, heuristic_s, raw_s = timed(validate), timed(count), timed(count_heuristic), timed(raw_count)
    decode_s = timed(lambda: [decoder.decode(raw) for raw in lines])
    return {
        "validate_per_s": len(lines) / validate_s,
        "count_per_s": len(lines) / count_s,
        "heuristic_per_s": len(lines) / heuristic_s,
        "tokens_per_s": total / count_s,
        "raw_per_s": len(lines) / raw_s,
        "overhead": (count_s - decode_s) / raw_s,
        "tokens": total,
    }


def load() -> None:
    """In a fresh interpreter: what the first count costs (the tokenizers are loaded then, once per process)."""
    from airflow_provider_openai_batch import tokens

    before = rss_bytes()
    started = time.perf_counter()
    tokens.counter_for_model("gpt-4o-mini").count("warm up")
    tokens.counter_for_model("text-embedding-3-small").count("warm up")
    print(json.dumps({"load_s": time.perf_counter() - started, "load_mb": (rss_bytes() - before) / 1e6}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=LINES)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        load()
        return
    from airflow_provider_openai_batch import tokens

    rng = random.Random(7)
    loaded = run_child("benchmarks.tokens", "--load")

    rows, lowest, highest = accuracy(rng)
    print("Heuristic count / real count, per text chunk (min-max):")
    print(f"  {'kind':24} {'encoding':8} {'min':>5} {'max':>5} {'chunks':>6}")
    for kind, name, low, high, n in rows:
        print(f"  {kind:24} {name:8} {low:5.2f} {high:5.2f} {n:6d}")
    stated = tokens.HEURISTIC_RATIO
    holds = stated[0] <= round(lowest, 2) and round(highest, 2) <= stated[1]
    print(
        f"  overall: {lowest:.2f}-{highest:.2f} (undercount at most {max(0.0, 1 - lowest):.0%}); "
        f"tokens.HEURISTIC_RATIO states {stated[0]:.2f}-{stated[1]:.2f}: {'holds' if holds else 'DOES NOT HOLD'}"
    )

    figures = throughput(request_lines(args.lines, rng))
    where = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    print(f"\nRequest tokens over {args.lines:,} lines (median of 3 runs, {where}):")
    rows_out = [
        ("first count in a fresh process", f"{loaded['load_s'] * 1000:.0f} ms, +{loaded['load_mb']:.0f} MB RSS"),
        ("validation alone (anchor)", f"{figures['validate_per_s']:,.0f} lines/s"),
        ("the strings counted directly", f"{figures['raw_per_s']:,.0f} lines/s (anchor: the tokenizer's pace)"),
        ("decode + request_tokens", f"{figures['count_per_s']:,.0f} lines/s, {figures['tokens_per_s']:,.0f} tokens/s"),
        ("decode + request_tokens, heuristic", f"{figures['heuristic_per_s']:,.0f} lines/s"),
        ("1,000,000 such requests", f"{1_000_000 / figures['count_per_s']:.1f} s of counting"),
    ]
    for label, value in rows_out:
        print(f"  {label:36} {value}")
    verdict = "met" if figures["overhead"] <= GOAL_OVERHEAD else "MISSED"
    print(f"  request_tokens / direct count time: {figures['overhead']:.2f}x (goal <= {GOAL_OVERHEAD:.2f}x): {verdict}")


if __name__ == "__main__":
    main()
