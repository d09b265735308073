"""
The job's scheduler on its own (``scheduler``): what it sends within the queue's budget, how a refusal teaches the
budget, when a piece can never be admitted, and the progress line a person reads. Pure decisions over
``job_state.JobState``; the job through the fake is in test_job_queue.py.
"""

from __future__ import annotations

from airflow_provider_openai_batch import scheduler
from airflow_provider_openai_batch.batch_status import QueueRefusal
from airflow_provider_openai_batch.job_state import JobState, Piece


def piece(part: str, tokens: int, requests: int = 10, state: str = "waiting") -> Piece:
    made = Piece(0, part, requests, 100, "0" * 64, tokens)
    made.state = state  # type: ignore[assignment]
    return made


def refusal(limit: int, unit: str = "tokens") -> QueueRefusal:
    return QueueRefusal(f"Limit: {limit:,} enqueued {unit}", limit, unit, "gpt-4o-mini")  # type: ignore[arg-type]


def test_the_first_refusal_sets_the_budget_and_the_rest_of_its_wave_teaches_nothing():
    """A first wave goes before the limit is known: each of its refusals names the same limit; one is enough."""
    state = JobState(pieces=[piece(f"{i:05d}", 100) for i in range(10)])
    assert scheduler.learn(state, refusal(1000), planned=False)
    assert (state.budget, state.budget_unit, state.budget_learned) == (900, "tokens", True)
    for _ in range(8):
        assert not scheduler.learn(state, refusal(1000), planned=False)
    assert state.budget == 900


def test_a_refusal_within_the_learned_budget_lowers_it():
    state = JobState(budget=900, budget_learned=True, limit=1000)
    assert scheduler.learn(state, refusal(1000), planned=True)
    assert state.budget == 810


def test_a_declared_budget_stands_unless_openai_names_a_smaller_limit():
    state = JobState(budget=1000)
    assert not scheduler.learn(state, refusal(5000), planned=True)
    assert state.budget == 1000 and not state.budget_learned
    assert scheduler.learn(state, refusal(500), planned=True)
    assert state.budget == 450 and state.limit == 500


def test_pieces_go_while_they_fit_the_budget_a_smaller_one_past_a_larger():
    state = JobState(pieces=[piece("00000", 400, state="submitted"), piece("00001", 700), piece("00002", 300)])
    state.budget = 1000
    assert [p.part for p in scheduler.to_submit(state, now=0)] == ["00002"]


def test_with_no_budget_known_every_waiting_piece_goes():
    state = JobState(pieces=[piece(f"{i:05d}", 10**9) for i in range(3)])
    assert len(scheduler.to_submit(state, now=0)) == 3


def test_a_single_request_over_the_learned_budget_goes_alone_when_the_queue_holds_it():
    """A learned budget is a share of the limit: a request between the two still runs, alone, never stuck."""
    big = piece("00001", 950, requests=1)
    state = JobState(pieces=[piece("00000", 10, state="done"), big], budget=900, budget_learned=True, limit=1000)
    assert scheduler.oversized(state) == []  # one request cannot be cut
    assert scheduler.to_submit(state, now=0) == [big]
    assert scheduler.too_big(state, big) is None
    big.state = "waiting"
    state.pieces.append(piece("00002", 10, state="submitted"))
    assert scheduler.to_submit(state, now=0) == []  # not while others of the job hold the queue


def test_a_single_request_over_the_whole_queue_is_named():
    big = piece("00003", 1500, requests=1)
    state = JobState(pieces=[big], budget=900, budget_learned=True, limit=1000)
    assert scheduler.to_submit(state, now=0) == []
    reason = scheduler.too_big(state, big)
    assert reason is not None and "gen 0 part 00003" in reason and "1,500" in reason and "1,000" in reason


def test_a_piece_larger_than_the_budget_is_cut_first():
    state = JobState(pieces=[piece("00000", 2000, requests=5)], budget=900)
    assert [p.part for p in scheduler.oversized(state)] == ["00000"]
    assert scheduler.to_submit(state, now=0) == []


def test_a_refused_piece_waits_for_its_backoff_and_a_new_key():
    waiting = piece("00000", 10)
    before = waiting.identity
    scheduler.requeue(waiting, now=1000.0, backoff=True)
    assert waiting.identity != before  # a new attempt: a new idempotency key
    assert waiting.not_before > 1000.0
    state = JobState(pieces=[waiting], budget=100)
    assert scheduler.to_submit(state, now=1000.0) == []
    assert scheduler.next_wake(state, 1000.0) == waiting.not_before
    assert scheduler.to_submit(state, now=waiting.not_before) == [waiting]


def test_the_progress_line_says_what_a_person_needs():
    done = piece("00000", 100, requests=3, state="done")
    done.summary = {"request_counts": {"total": 3, "completed": 3, "failed": 0}}
    state = JobState(
        pieces=[done, piece("00001", 100, requests=100_000, state="submitted"), piece("00002", 100, requests=7)],
        budget=1000,
        budget_learned=True,
        started=1000.0,
    )
    line = scheduler.progress_line(state, now=1000.0 + 3723, spent="0.42 USD")
    assert line.startswith("Job: pieces 1 done, 1 running, 1 waiting for the queue; requests 3/100,010 done (<0.1 %)")
    assert "enqueued ~100 of 1,000 tokens (learned)" in line
    assert "spent 0.42 USD" in line
    assert "elapsed 1h02m" in line and "left" in line and "/min" in line
