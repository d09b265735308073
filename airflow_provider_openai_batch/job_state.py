"""
The one-task job's work folder: its on-storage layout and the state of every piece of work, in one typed class.

The folder outlives a worker (put it where every worker reaches, as an object store is), so a retry or a resume on
another worker continues from it. Its layout is a format that in-flight jobs depend on across provider upgrades, so
it is versioned (``FORMAT``); a folder of another format is never read as this one.

```
<work>/state.json                 {"format": 3, "pieces": [...], "budget": ..., "started": ...}  (written atomically)
<work>/gen-<g>/input-<part>.jsonl  a piece's requests (generation 0: the shards of the input; g > 0: resubmissions)
<work>/gen-<g>/output-<part>.jsonl, error-<part>.jsonl   its batch's result files, once it ended
<work>/gen-<g>/joined-<part>.jsonl  its requests joined to its results (when a later generation needs them)
<work>/joined-0.jsonl              generation 0 joined in input order (only when later generations are merged in)
<work>/tries/<n>                   one empty file per try that worked on the folder (never overwritten)
```

A piece moves ``waiting`` (for queue capacity, or its backoff after a queue refusal) → ``creating`` (the create is
being sent: a later try looks for its batch before sending again) → ``submitted`` → ``ended`` (its batch ended; it
no longer holds queue capacity, its results are not downloaded yet) → ``done`` (results downloaded).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from airflow_provider_openai_batch.storage import atomic_writer

FORMAT = 3
#: Formats this version reads: format 2 is format 3 without the ``ended`` state.
READS_FORMATS = (2, 3)
PieceState = Literal["waiting", "creating", "submitted", "ended", "done"]


@dataclass
class Piece:
    """
    One batch's worth of the job's requests. ``part`` orders the pieces as the input is ordered (``"00003"``, and
    ``"00003-01"`` for the first part of a shard cut to fit the queue); ``gen`` 0 is the input itself, a later
    generation resends the requests of the piece before it that failed for a transient reason.
    """

    gen: int
    part: str
    requests: int
    bytes: int
    sha256: str
    #: Estimated tokens this piece holds in the model's enqueued-token queue (input plus output caps).
    tokens: int
    state: PieceState = "waiting"
    batch_id: str | None = None
    #: Queue refusals so far: each resend after one is a new attempt with a key of its own.
    queue_attempt: int = 0
    #: Epoch seconds before which a refused piece is not sent again (its backoff).
    not_before: float = 0.0
    created_at: float | None = None
    #: When the try that created its batch started looking for it (the settle and second-look window).
    looked_at: float | None = None
    #: Whether the second look for a duplicate was made (``batches.SiblingLook``).
    second_look_done: bool = False
    #: Whether it was sent under a known budget: a refusal then means others share the queue (back off), not that
    #: the job had yet to learn the limit.
    planned: bool = False
    #: Its batch passed the job's deadline for it: cancelled (its output kept), or left running for a retry to
    #: collect (``cancel_on_timeout=False``); either way its deadline is not acted on again.
    deadline_passed: bool = False
    #: The batch summary once its batch ended.
    summary: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"gen {self.gen} part {self.part}"

    @property
    def identity(self) -> str:
        """What names the piece in its batch's idempotency key: its place, content and queue attempt."""
        return f"job:gen={self.gen}:part={self.part}:sha256={self.sha256}:queue={self.queue_attempt}"


@dataclass
class JobState:
    pieces: list[Piece] = field(default_factory=list)
    #: The model's enqueued-token (or request) budget: declared by the user, or learned from a queue refusal.
    budget: int | None = None
    budget_unit: Literal["tokens", "requests"] = "tokens"
    budget_learned: bool = False
    #: The queue's limit as OpenAI's last refusal named it (the budget is a share of it), when one did.
    limit: int | None = None
    started: float = 0.0
    model: str | None = None
    #: Batches refused for the queue so far (not charged; their pieces waited and were sent again).
    queue_refusals: int = 0
    #: Started by a try other than the task's first (the first one's folder was lost, or it died before saving
    #: it): before creating a piece's batch, look for one an earlier try made.
    needs_lookup: bool = False
    #: The try (and process) that last wrote the folder: a try that finds another's name here before creating
    #: batches has been superseded (a retry took the job over while it still ran) and stops.
    owner: str = ""

    def ordered(self) -> list[Piece]:
        return sorted(self.pieces, key=lambda p: (p.gen, p.part))

    def by_state(self, state: PieceState) -> list[Piece]:
        return [p for p in self.ordered() if p.state == state]

    def in_flight(self) -> list[Piece]:
        return [p for p in self.ordered() if p.state in ("creating", "submitted")]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "pieces": [asdict(p) for p in self.pieces],
            "budget": self.budget,
            "budget_unit": self.budget_unit,
            "budget_learned": self.budget_learned,
            "limit": self.limit,
            "started": self.started,
            "model": self.model,
            "queue_refusals": self.queue_refusals,
            "needs_lookup": self.needs_lookup,
            "owner": self.owner,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> JobState:
        return cls(
            pieces=[Piece(**p) for p in value.get("pieces") or []],
            budget=value.get("budget"),
            budget_unit=value.get("budget_unit") or "tokens",
            budget_learned=bool(value.get("budget_learned")),
            limit=value.get("limit"),
            started=float(value.get("started") or 0.0),
            model=value.get("model"),
            queue_refusals=int(value.get("queue_refusals") or 0),
            needs_lookup=bool(value.get("needs_lookup")),
            owner=str(value.get("owner") or ""),
        )


class JobWorkFolder:
    """The layout above, on local or object storage (``ObjectStoragePath`` or ``pathlib.Path``)."""

    def __init__(self, root: Any) -> None:
        self.root = root

    @property
    def state_file(self) -> Any:
        return self.root / "state.json"

    def generation(self, gen: int) -> Any:
        return self.root / f"gen-{gen}"

    def input(self, piece: Piece) -> Any:
        return self.generation(piece.gen) / f"input-{piece.part}.jsonl"

    def output(self, piece: Piece) -> Any:
        return self.generation(piece.gen) / f"output-{piece.part}.jsonl"

    def error(self, piece: Piece) -> Any:
        return self.generation(piece.gen) / f"error-{piece.part}.jsonl"

    def joined(self, piece: Piece) -> Any:
        return self.generation(piece.gen) / f"joined-{piece.part}.jsonl"

    @property
    def first_generation_joined(self) -> Any:
        return self.root / "joined-0.jsonl"

    def load(self) -> JobState | None:
        """The saved state, or ``None`` for a folder this job has not started (or one of another format)."""
        if not _fresh(self.state_file).exists():
            return None
        value = json.loads(self.state_file.read_bytes())
        if not isinstance(value, dict) or value.get("format") not in READS_FORMATS:
            found = value.get("format") if isinstance(value, dict) else "?"
            raise ValueError(
                f"{self.root} holds a job work folder of format {found}, not {FORMAT}: it was written by another "
                "provider release. Remove it (or set work_dir elsewhere) to start the job again."
            )
        return JobState.from_json(value)

    def owner(self) -> str | None:
        """Who last wrote the folder (``JobState.owner``), read from storage now; ``None`` when it holds no state."""
        if not _fresh(self.state_file).exists():
            return None
        value = json.loads(self.state_file.read_bytes())
        return str(value.get("owner") or "") if isinstance(value, dict) else None

    def mark_try(self, try_number: int) -> None:
        """
        Record that ``try_number`` works on this folder: a file of its own under ``tries/``, written before the try
        looks for or creates anything and never overwritten (unlike ``JobState.owner``, which the state's writers
        take turns at), so a try can tell for sure whether a later one has begun (``later_try_began``).
        """
        marker = self.root / "tries" / str(try_number)
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_bytes(b"")

    def later_try_began(self, try_number: int) -> bool:
        """Whether a try later than ``try_number`` has marked this folder (``mark_try``)."""
        tries = _fresh(self.root / "tries")
        if not tries.exists():
            return False
        return any(p.name.isdigit() and int(p.name) > try_number for p in tries.iterdir())

    def save(self, state: JobState) -> None:
        with atomic_writer(self.state_file, overwrite=True) as out:
            out.write(json.dumps(state.to_json()).encode())


def _fresh(path: Any) -> Any:
    """
    ``path``, with what its filesystem keeps of earlier listings of it and its folders dropped: s3fs answers
    ``exists``, ``iterdir`` and a file's size from listings it made, which another worker's writes (another try
    of the job) do not update.
    """
    invalidate = getattr(getattr(path, "fs", None), "invalidate_cache", None)
    if invalidate is not None:
        invalidate(path.path)
    return path
