"""
What a batch input file will cost and how long it will queue, before anything is uploaded: ``estimate_file``.

A dry run, a ``max_cost`` budget and ``python -m airflow_provider_openai_batch estimate`` all need the same few
numbers (requests, shards, input tokens, the most output the requests allow, the price range, how many times the
input fills OpenAI's per-model batch queue), so they are computed here once, in one streaming pass that validates
with ``batch_file.BatchFileValidator`` (the same errors, naming file, line and field, as the upload would raise)
and counts with ``tokens.request_tokens``.

**Cost** comes from the caller's batch price table, ``{model: {"input": $, "cached_input": $, "output": $}}`` per
million tokens (``results.estimate_cost`` prices it, longest model prefix first). ``low`` = the fewest input
tokens the count allows x the input price (no output, no cache discount); ``high`` = the most input tokens x the
input price + the summed output caps x the output price, ``None`` when a request sets no output cap (nothing
bounds it then). ``cost`` is ``None`` without a table or when the table has no entry for the model.

**Queue.** OpenAI holds a per-model limit on the tokens of batches waiting in its queue (the "batch queue limit";
a batch past it is refused with ``token_limit_exceeded``). With ``enqueued_token_budget`` given, the estimate plans
the input as the job does under ``max_enqueued_tokens``: each request holds its input tokens plus its output cap
(``tokens.queue_load``), the shards are cut so that none holds more than the budget, and ``fills`` is the number of
waves the job's scheduler (``scheduler.to_submit``) sends them in, each wave waiting for the batches of the one
before to end. So the queue time is **at most** ``fills`` x the completion window (``24h``), if nothing else of
the model is queued; a batch usually ends well before its window. A single request above the budget can never be
enqueued.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any, TypedDict

import msgspec

from airflow_provider_openai_batch import scheduler
from airflow_provider_openai_batch.batch_file import (
    MAX_REPORTED_ISSUES,
    OPENAI_BATCH_ENDPOINTS,
    BatchFileValidator,
    ShardLimits,
    estimate_tokens,
    iter_raw_lines,
    too_many_inputs,
)
from airflow_provider_openai_batch.job_state import JobState, Piece
from airflow_provider_openai_batch.results import estimate_cost
from airflow_provider_openai_batch.storage import Source, describe, open_source
from airflow_provider_openai_batch.tokens import Tokenizer, counter_for_model, queue_load, request_tokens

#: The completion window a wave of the queue may take at most (``24h``, the Batch API's default window).
DEFAULT_COMPLETION_WINDOW = "24h"


class CostRange(TypedDict):
    currency: str
    #: Fewest input tokens x input price.
    low: float
    #: Most input tokens x input price + output caps x output price; ``None`` when some request has no cap.
    high: float | None


class QueuePlan(TypedDict):
    #: Tokens (input plus output caps) that may wait in OpenAI's batch queue for this model at once.
    budget: int
    #: What the input holds in the queue as the job counts it: input tokens plus output caps, summed.
    tokens: int
    #: The waves the job sends its shards in under the budget, each waiting for the one before to end.
    fills: int
    #: The completion window, and the longest the queue can take: ``"at most N x <window>"``.
    completion_window: str
    max_wait: str
    #: The largest single request's queue tokens (input plus output cap), and its line.
    largest_request_tokens: int
    largest_request_line: int
    #: False when one request alone is over the budget (OpenAI would refuse every batch holding it).
    fits: bool
    meaning: str


class Estimate(TypedDict):
    source: str
    endpoint: str | None
    model: str | None
    requests: int
    #: Files the input is cut into under the given limits, as the job cuts them (the budget caps a shard's tokens).
    shards: int
    #: Counted input tokens, and the range the true count lies in (equal for a real tokenizer).
    input_tokens: int
    input_tokens_range: list[int]
    #: The summed output caps of the requests that set one, and how many set none.
    max_output_tokens: int
    uncapped_requests: int
    #: Images, audio, files, built-in tools, stored prompts: in the requests, not in ``input_tokens``.
    uncounted_parts: int
    tokenizer: Tokenizer
    #: ``[lowest, highest]`` of counted / true tokens on text (``[1.0, 1.0]`` for a real tokenizer).
    error_bound: list[float]
    cost: CostRange | None
    queue: QueuePlan | None
    #: Sentences for a person: why a figure is missing or what it assumes.
    notes: list[str]


class _Line(msgspec.Struct):
    url: Any = None
    body: Any = None


_decoder = msgspec.json.Decoder(_Line)


class _ShardCounter:
    """
    The cut rule of ``batch_file.shard_batch_file``, applied to counts instead of writing files. ``add`` takes a
    line's tokens as the caller's sharder measures them (the job: ``tokens.queue_load`` under a token budget, else
    ``batch_file.estimate_tokens``); ``loads`` keeps each shard's total, what its batch holds in the queue.
    """

    def __init__(self, limits: ShardLimits) -> None:
        self.limits = limits
        self.loads: list[int] = []
        self.count = self.size = self.inputs = 0

    @property
    def shards(self) -> int:
        return len(self.loads)

    def add(self, size: int, tokens: int, inputs: int) -> None:
        limits = self.limits
        full = bool(self.loads) and (
            self.count + 1 > limits.max_requests
            or self.size + size > limits.max_bytes
            or (limits.max_tokens is not None and self.loads[-1] + tokens > limits.max_tokens)
            or self.inputs + inputs > limits.max_embedding_inputs
        )
        if not self.loads or full:
            self.loads.append(0)
            self.count = self.size = self.inputs = 0
        self.count += 1
        self.size += size
        self.loads[-1] += tokens
        self.inputs += inputs


def estimate_file(
    source: Source,
    endpoint: str | None = None,
    price_table: Mapping[str, Mapping[str, float]] | None = None,
    enqueued_token_budget: int | None = None,
    *,
    limits: ShardLimits | None = None,
    allowed_endpoints: Collection[str] | None = OPENAI_BATCH_ENDPOINTS,
    max_issues: int = MAX_REPORTED_ISSUES,
    completion_window: str = DEFAULT_COMPLETION_WINDOW,
    name: str | None = None,
) -> Estimate:
    """
    Validate ``source`` and estimate its tokens, shards, cost range and queue fills, streaming (a 200 MB file is
    read once, line by line). Raises ``BatchInputError`` naming file, line and field when the file is invalid.
    ``name`` is what the estimate and its errors call the source (default: its path or URI), e.g. for requests a
    task wrote to a scratch file.
    """
    if enqueued_token_budget is not None and enqueued_token_budget <= 0:
        raise ValueError(f"enqueued_token_budget must be positive, got {enqueued_token_budget}")
    limits = limits or ShardLimits()
    notes: list[str] = []
    if enqueued_token_budget is not None and (limits.max_tokens is None or limits.max_tokens > enqueued_token_budget):
        limits = replace(limits, max_tokens=enqueued_token_budget)
        notes.append(
            f"shards hold at most {enqueued_token_budget:,} tokens each, input plus output caps (the queue budget)"
        )
    name = name or describe(source)
    validator = BatchFileValidator(endpoint=endpoint, allowed_endpoints=allowed_endpoints, max_issues=max_issues)
    shards = _ShardCounter(limits)
    input_tokens = max_output = uncapped = uncounted = queued = 0
    largest, largest_line = 0, 0
    with open_source(source) as stream:
        for lineno, line in iter_raw_lines(stream):
            inputs_before = validator.embedding_inputs
            raw = validator.check_line(lineno, line)
            if raw is None or validator.collector.issues:
                continue  # keep reading to report every problem, count nothing more
            line_inputs = validator.embedding_inputs - inputs_before
            if too_many_inputs(validator, lineno, line_inputs, limits):
                continue
            decoded = _decoder.decode(raw)
            body: Mapping[str, Any] = decoded.body
            # One model per file (the validator's rule), known from its first line that names one.
            counted = request_tokens(body, endpoint or decoded.url, counter_for_model(validator.model))
            input_tokens += counted.input_tokens
            uncounted += counted.uncounted_parts
            if counted.max_output_tokens is None:
                uncapped += 1
            else:
                max_output += counted.max_output_tokens
            load = queue_load(counted)
            queued += load
            if load > largest:
                largest, largest_line = load, lineno
            # The job's sharder counts a line as it plans the queue under a token budget, else by its bytes.
            shards.add(len(raw) + 1, load if enqueued_token_budget is not None else estimate_tokens(raw), line_inputs)
    validator.check_end()
    validator.raise_if_invalid(name)

    counter = counter_for_model(validator.model)
    low_ratio, high_ratio = counter.ratio
    tokens_range = [math.floor(input_tokens / high_ratio), math.ceil(input_tokens / low_ratio)]
    if counter.tokenizer == "heuristic":
        notes.append(
            f"no tokenizer for model {validator.model!r}: input tokens are a byte heuristic; the true count lies in "
            f"{tokens_range[0]:,}-{tokens_range[1]:,} on the text it was measured on"
        )
    if uncounted:
        notes.append(
            f"{uncounted:,} images, audio, files, built-in tools or stored prompts add tokens not counted here"
        )
    if uncapped:
        notes.append(
            f"{uncapped:,} of {validator.requests:,} requests set no output cap (max_completion_tokens / max_tokens / "
            "max_output_tokens): nothing bounds their output, so the cost has no upper bound"
        )
    cost = _cost(validator.model, price_table, tokens_range, max_output, uncapped, notes)
    queue = None
    if enqueued_token_budget is not None:
        queue = _queue(enqueued_token_budget, queued, shards.loads, largest, largest_line, completion_window)
    return Estimate(
        source=name,
        endpoint=validator.url or endpoint,
        model=validator.model,
        requests=validator.requests,
        shards=shards.shards,
        input_tokens=input_tokens,
        input_tokens_range=tokens_range,
        max_output_tokens=max_output,
        uncapped_requests=uncapped,
        uncounted_parts=uncounted,
        tokenizer=counter.tokenizer,
        error_bound=[low_ratio, high_ratio],
        cost=cost,
        queue=queue,
        notes=notes,
    )


def _cost(
    model: str | None,
    price_table: Mapping[str, Mapping[str, float]] | None,
    tokens_range: list[int],
    max_output: int,
    uncapped: int,
    notes: list[str],
) -> CostRange | None:
    if price_table is None:
        return None
    prices = {name: dict(price) for name, price in price_table.items()}
    empty = {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0}
    low = estimate_cost({**empty, "input_tokens": tokens_range[0]}, model, prices)
    if low is None:
        notes.append(f"the price table has no entry for model {model!r}: no cost")
        return None
    high = estimate_cost({**empty, "input_tokens": tokens_range[1], "output_tokens": max_output}, model, prices)
    return CostRange(
        currency=str(low["currency"]),
        low=float(low["total"]),
        high=None if uncapped or high is None else float(high["total"]),
    )


def _waves(budget: int, loads: list[int]) -> int | None:
    """
    How many waves the job's scheduler sends shards of these queue ``loads`` in, if every batch of a wave ends
    before the next is sent: ``scheduler.to_submit`` itself, run over stand-in pieces. ``None`` when a shard
    never fits the budget.
    """
    state = JobState(started=0.0, budget=budget, budget_unit="tokens")
    state.pieces = [Piece(0, f"{i:05d}", 1, 0, "", load) for i, load in enumerate(loads)]
    waves = 0
    while chosen := scheduler.to_submit(state, now=0.0):
        for piece in chosen:
            piece.state = "done"
        waves += 1
    return None if state.by_state("waiting") else waves


def _queue(budget: int, tokens: int, loads: list[int], largest: int, largest_line: int, window: str) -> QueuePlan:
    waves = _waves(budget, loads) if largest <= budget else None
    fits = waves is not None
    fills = waves if waves is not None else max(1, math.ceil(tokens / budget))
    if not fits:
        meaning = (
            f"line {largest_line} alone holds {largest:,} tokens (input plus output cap), over the {budget:,} "
            "budget: OpenAI refuses every batch holding it"
        )
    elif fills <= 1:
        meaning = "the whole input fits in the queue at once"
    else:
        meaning = (
            f"the input fills the queue {fills} times: its shards run in {fills} waves, each waiting for the "
            "previous batches to end"
        )
    return QueuePlan(
        budget=budget,
        tokens=tokens,
        fills=fills,
        completion_window=window,
        max_wait=f"at most {fills} x {window}",
        largest_request_tokens=largest,
        largest_request_line=largest_line,
        fits=fits,
        meaning=meaning,
    )


def _money(value: float, currency: str) -> str:
    return f"{value:,.2f} {currency}" if value >= 0.01 or value == 0 else f"{value:.6f} {currency}"


def render_estimate(estimate: Estimate) -> str:
    """The estimate as one table, for a task log or the command line."""
    tokenizer = estimate["tokenizer"]
    low, high = estimate["input_tokens_range"]
    if tokenizer == "heuristic":
        counted = f"{estimate['input_tokens']:,} (heuristic; true count {low:,}-{high:,})"
    else:
        counted = f"{estimate['input_tokens']:,} ({tokenizer})"
    output = f"{estimate['max_output_tokens']:,}"
    if estimate["uncapped_requests"]:
        output += f" + {estimate['uncapped_requests']:,} requests with no cap"
    cost = estimate["cost"]
    if cost is None:
        priced = "not priced"
    elif cost["high"] is None:
        priced = f"at least {_money(cost['low'], cost['currency'])}; no upper bound"
    else:
        priced = f"{_money(cost['low'], cost['currency'])} - {_money(cost['high'], cost['currency'])}"
    rows = [
        ("file", estimate["source"]),
        ("endpoint", estimate["endpoint"] or "-"),
        ("model", estimate["model"] or "-"),
        ("requests", f"{estimate['requests']:,}"),
        ("shards", f"{estimate['shards']:,}"),
        ("input tokens", counted),
        ("max output tokens", output),
        ("cost", priced),
    ]
    if estimate["uncounted_parts"]:
        rows.insert(6, ("uncounted parts", f"{estimate['uncounted_parts']:,}"))
    queue = estimate["queue"]
    if queue is not None:
        rows.append(("queue", f"{queue['fills']:,} fills of {queue['budget']:,} tokens: {queue['meaning']}"))
        rows.append(
            (
                "queue time",
                f"{queue['max_wait']} (a wave takes up to its completion window; batches usually end well before)",
            )
        )
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [f"note: {note}" for note in estimate["notes"]]
    return "\n".join(lines)
