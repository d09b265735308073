"""
What the one-task job submits when: living within the model's enqueued-token queue.

OpenAI limits the input tokens a model may have *enqueued* per organization (batches in progress); a batch that
does not fit is accepted, then fails at the end of validation with ``token_limit_exceeded`` (``batch_status``
reads it). So the job keeps its pieces' estimated tokens in flight within a budget: the one the user declares
(``max_enqueued_tokens``), else the ``Limit: N`` OpenAI names in the first refusal, kept for the job. A refused piece
waits for capacity with a backoff and is sent again with a new key; it never uses up a resubmission round. Pure
decisions over ``job_state.JobState``: no I/O here.
"""

from __future__ import annotations

import time

from airflow_provider_openai_batch.batch_status import QueueRefusal
from airflow_provider_openai_batch.job_state import JobState, Piece
from airflow_provider_openai_batch.polling import backoff_delay

#: First wait after a queue refusal, doubling per refusal of the same piece, up to ``QUEUE_BACKOFF_MAX``.
QUEUE_BACKOFF_BASE = 60.0
QUEUE_BACKOFF_MAX = 1800.0
#: A learned token limit is used at this share: the job's token count and OpenAI's may differ a little (OpenAI does
#: not document how it counts). A request limit is exact, and used whole.
LEARNED_BUDGET_SHARE = 0.9


def piece_load(piece: Piece, unit: str) -> int:
    """What a piece holds in the queue, in the budget's unit."""
    return piece.requests if unit == "requests" else piece.tokens


def enqueued(state: JobState) -> int:
    """The job's estimated share of the queue now: pieces being created or submitted (not yet ended)."""
    return sum(piece_load(p, state.budget_unit) for p in state.in_flight())


def to_submit(state: JobState, now: float | None = None) -> list[Piece]:
    """
    The waiting pieces to send now, in input order, while the estimated queue stays within the budget. With no
    budget known every waiting piece goes (a refusal will teach the limit). A piece whose backoff has not passed
    waits; a piece larger than the whole budget is cut first (``oversized``), never sent as it is.
    """
    now = time.time() if now is None else now
    waiting = [p for p in state.by_state("waiting") if p.not_before <= now]
    if state.budget is None:
        return waiting
    room = state.budget - enqueued(state)
    chosen = []
    for piece in waiting:
        load = piece_load(piece, state.budget_unit)
        if load <= room:
            chosen.append(piece)
            room -= load
    return chosen


def oversized(state: JobState) -> list[Piece]:
    """Waiting pieces that could never fit the budget, even alone: they must be cut."""
    if state.budget is None:
        return []
    return [p for p in state.by_state("waiting") if piece_load(p, state.budget_unit) > state.budget and p.requests > 1]


def learn(state: JobState, refusal: QueueRefusal) -> bool:
    """
    Take the queue's limit from a refusal (``LEARNED_BUDGET_SHARE`` of it) unless the user declared one; a
    refusal while the job already kept within a learned budget lowers it (our estimate was short). Returns whether
    the budget changed.
    """
    if refusal.limit is None or (state.budget is not None and not state.budget_learned):
        return False
    share = LEARNED_BUDGET_SHARE if refusal.unit == "tokens" else 1.0
    learned = int(refusal.limit * share)
    if state.budget is not None and state.budget_unit == refusal.unit and learned >= state.budget:
        learned = int(state.budget * LEARNED_BUDGET_SHARE)
    state.budget, state.budget_unit, state.budget_learned = learned, refusal.unit, True
    return True


def requeue(piece: Piece, now: float, *, backoff: bool = True) -> None:
    """
    A piece refused for the queue waits for capacity: a new attempt (a new key). With ``backoff`` (it was refused
    although the budget said it fits: others share the queue) not before a backoff; without (the refusal taught
    the budget) as soon as the budget has room.
    """
    piece.queue_attempt += 1
    piece.state, piece.batch_id, piece.created_at, piece.looked_at = "waiting", None, None, None
    piece.second_look_done = piece.planned = False
    piece.not_before = (
        now + backoff_delay(piece.queue_attempt, QUEUE_BACKOFF_BASE, QUEUE_BACKOFF_MAX) if backoff else 0.0
    )


def next_wake(state: JobState, now: float) -> float | None:
    """When waiting work may go even if no batch ends first: the earliest backoff of a refused piece."""
    times = [p.not_before for p in state.by_state("waiting") if p.not_before > now]
    return min(times) if times else None


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(state: JobState, now: float) -> str:
    """
    ``job: pieces 3 done, 2 running, 5 waiting for the queue; requests 30,000/100,000 done (30.0 %); enqueued ~1.2M
    of 1.8M tokens; elapsed 1h02m, about 2h04m left`` for the task log.
    """
    first = [p for p in state.pieces if p.gen == 0]
    total = sum(p.requests for p in first)
    done = sum(
        (p.summary or {}).get("request_counts", {}).get("completed", 0) for p in state.pieces if p.state == "done"
    )
    done = min(done, total)
    pieces = {s: len(state.by_state(s)) for s in ("done", "submitted", "creating", "waiting")}
    parts = [f"{pieces['done']} done", f"{pieces['submitted'] + pieces['creating']} running"]
    if pieces["waiting"]:
        parts.append(f"{pieces['waiting']} waiting for the queue")
    percent = f" ({100.0 * done / total:.1f} %)" if total else ""
    line = f"job: pieces {', '.join(parts)}; requests {done:,}/{total:,} done{percent}"
    if state.budget is not None:
        unit = state.budget_unit
        line += f"; enqueued ~{enqueued(state):,} of {state.budget:,} {unit}"
        if state.budget_learned:
            line += " (learned)"
    elapsed = now - state.started
    line += f"; elapsed {_elapsed(elapsed)}"
    if 0 < done < total and elapsed > 0:
        line += f", about {_elapsed(elapsed * (total - done) / done)} left"
    return line
