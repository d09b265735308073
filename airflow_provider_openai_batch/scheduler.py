"""
What the one-task job submits when: living within the model's enqueued-token queue.

OpenAI limits the input tokens a model may have *enqueued* per organization (batches in progress); a batch that
does not fit is accepted, then fails at the end of validation with ``token_limit_exceeded`` (``batch_status``
reads it). So the job keeps its pieces' estimated tokens in flight within a budget: the one the user declares
(``max_enqueued_tokens``), else the ``Limit: N`` OpenAI names in the first refusal, kept for the job. A refused piece
waits for capacity (with a backoff when it was refused although the budget said it fits: others share the queue)
and is sent again with a new key; it never uses up a resubmission round. Pure decisions over ``job_state.JobState``
and the progress line a person reads: no I/O here.
"""

from __future__ import annotations

import time
from typing import TypedDict

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
    waits; a piece larger than the whole budget is cut first (``oversized``), never sent as it is, except one that
    cannot be cut (a single request): it goes alone, when nothing else of the job is in the queue, if the limit
    OpenAI named holds it (``too_big`` says when it never can).
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
    if not chosen and waiting and not state.in_flight():
        alone = waiting[0]
        if alone.requests == 1 and too_big(state, alone) is None:
            chosen.append(alone)
    return chosen


def too_big(state: JobState, piece: Piece) -> str | None:
    """Why a piece can never be admitted (a single request larger than the queue OpenAI named), else ``None``."""
    load = piece_load(piece, state.budget_unit)
    limit = state.limit if state.limit is not None else (state.budget if not state.budget_learned else None)
    if piece.requests == 1 and limit is not None and load > limit:
        return (
            f"{piece.name} is one request of ~{load:,} queue {state.budget_unit}, more than the model's whole queue "
            f"({limit:,}): OpenAI would refuse it every time. Shorten it (or its output cap)."
        )
    return None


def oversized(state: JobState) -> list[Piece]:
    """Waiting pieces that could never fit the budget, even alone: they must be cut."""
    if state.budget is None:
        return []
    return [p for p in state.by_state("waiting") if piece_load(p, state.budget_unit) > state.budget and p.requests > 1]


def learn(state: JobState, refusal: QueueRefusal, planned: bool) -> bool:
    """
    Take the queue's limit from a refusal: the budget becomes ``LEARNED_BUDGET_SHARE`` of the limit OpenAI names
    (a declared budget above that limit is lowered to it: the account says otherwise). A refusal of a piece sent
    within a learned budget (``planned``) lowers the budget once more by that share: our count was short or others
    share the queue. Refusals of pieces sent before the budget was known teach nothing new: the first one sets it.
    Returns whether the budget changed.
    """
    if refusal.limit is None:
        return False
    share = LEARNED_BUDGET_SHARE if refusal.unit == "tokens" else 1.0
    named = max(1, int(refusal.limit * share))
    same_unit = state.budget is not None and state.budget_unit == refusal.unit
    if same_unit:
        state.limit = refusal.limit
    if state.budget is not None and not state.budget_learned:
        if not same_unit or refusal.limit >= state.budget:
            return False  # a declared budget within the limit stands (others share the queue: back off)
    elif same_unit and state.budget is not None:
        if not planned:
            return False
        named = min(named, max(1, int(state.budget * LEARNED_BUDGET_SHARE)))
    state.budget, state.budget_unit, state.budget_learned, state.limit = named, refusal.unit, True, refusal.limit
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


def _percent(part: int, whole: int) -> str:
    """``30.0 %``; a share that rounds to nothing is ``<0.1 %``, not ``0.0 %``, and only all of it is ``100.0 %``."""
    share = 100.0 * part / whole
    if 0 < share < 0.1:
        return "<0.1 %"
    if 99.9 < share < 100:
        return ">99.9 %"
    return f"{share:.1f} %"


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressSnapshot(TypedDict):
    """What the progress line says of the job as the task last saw it (JSON-able: the trigger carries it)."""

    total: int
    done: int
    pieces_done: int
    running: int
    waiting: int
    budget: int | None
    unit: str
    learned: bool
    enqueued: int
    started: float
    spent: str | None


def progress_snapshot(state: JobState, spent: str | None = None) -> ProgressSnapshot:
    """The job's progress as its work folder says now; ``spent`` is the cost so far, rendered, when priced."""
    total = sum(p.requests for p in state.pieces if p.gen == 0)
    done = sum(
        (p.summary or {}).get("request_counts", {}).get("completed", 0)
        for p in state.pieces
        if p.state in ("ended", "done")
    )
    return ProgressSnapshot(
        total=total,
        done=min(done, total),
        pieces_done=len(state.by_state("done")),
        running=len(state.in_flight()),
        waiting=len(state.by_state("waiting")),
        budget=state.budget,
        unit=state.budget_unit,
        learned=state.budget_learned,
        enqueued=enqueued(state) if state.budget is not None else 0,
        started=state.started,
        spent=spent,
    )


def render_progress(snapshot: ProgressSnapshot, now: float, running_done: int = 0) -> str:
    """
    ``pieces 3 done, 2 running, 5 waiting for the queue; requests 30,000/100,000 done (30.0 %) at 500/min;
    enqueued ~1,200,000 of 1,800,000 tokens (learned); spent $1.20; elapsed 1h02m, about 2h04m left`` for the task
    log. ``running_done``: requests the running batches finished so far (the trigger reads them live).
    """
    total = snapshot["total"]
    done = min(total, snapshot["done"] + running_done)
    parts = [f"{snapshot['pieces_done']} done", f"{snapshot['running']} running"]
    if snapshot["waiting"]:
        parts.append(f"{snapshot['waiting']} waiting for the queue")
    elapsed = max(0.0, now - snapshot["started"])
    line = f"pieces {', '.join(parts)}; requests {done:,}/{total:,} done"
    if total:
        line += f" ({_percent(done, total)})"
    if done and elapsed >= 1:
        line += f" at {done * 60 / elapsed:,.0f}/min"
    if snapshot["budget"] is not None:
        line += f"; enqueued ~{snapshot['enqueued']:,} of {snapshot['budget']:,} {snapshot['unit']}"
        if snapshot["learned"]:
            line += " (learned)"
    if snapshot["spent"]:
        line += f"; spent {snapshot['spent']}"
    line += f"; elapsed {_elapsed(elapsed)}"
    if 0 < done < total and elapsed > 0:
        line += f", about {_elapsed(elapsed * (total - done) / done)} left"
    return line


def progress_line(state: JobState, now: float, spent: str | None = None) -> str:
    """The task's progress line of ``state`` now (``render_progress``)."""
    return "Job: " + render_progress(progress_snapshot(state, spent), now)
