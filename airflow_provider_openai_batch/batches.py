"""
The one create path: every batch the provider makes is made here, by the create operator and the one-task job alike.

A batch costs money, so "create" is a decision, not a call. For one piece of work (``BatchWork``) of one task
instance, in order:

1. **Key.** ``airflow_idempotency_key``: a hash of the deployment salt, the task instance (never the try number) and
   everything that changes what the batch does; ``airflow_first_try`` tells a retry from a re-run after a clear.
2. **Lookup.** The task's ``task_state_store`` record (Airflow 3.3+), then (not on the task's first try) one scan of
   the account's batches back to the DAG run's start for *every* batch carrying the key. Among them the live ones
   come first, oldest first: the rule every try applies, so a third try after a settled race takes the survivor,
   not the cancelled loser that happens to be newest.
3. **Reuse verdict** (``batch_status.reuse_verdict``): a retry takes a working batch, or a completed one that passes
   the outcome policy; a re-run after a clear follows ``reuse``. What the lookup saw and did not take is remembered:
   it existed before this try created, so it is no racer.
4. **Create once** (``idempotency.call_once``): SDK retries off; a lost answer is looked for before sending again.
5. **Settle.** Two tries of one task instance can run at once (an orphaned Celery task process keeps running while
   Airflow starts the next try): each may look, find nothing and create. Right after creating, each try lists the
   batches made since *it started looking* (less ``RACE_SKEW``) and applies ``surviving_batch``: the oldest live
   contender wins (in the same second, the earlier try's), the others cancel their own. Nothing is logged before
   that (an orphan dies at its first log line): what the create, the SDK's retries and the settle have to say is
   held and said after (``HeldLog``). A caller whose own record shows that no later try has begun (the job's work
   folder) skips the settle on the first try of a run: no racer can win against it (``create_many``).
6. **A second look**: OpenAI does not say that a new batch is listed at once. A settle listing that does not show
   the try's own batch is lagging, and may miss a racer too: the try lists again (a few seconds apart, up to
   ``SETTLE_WAIT_FOR_OWN``) until its own batch shows, and then applies the rule. A listing that shows a batch shows
   every batch created before it, so from then on no older racer can hide. If the own batch never shows, whoever
   waits for it (trigger or blocking wait: ``SiblingLook``) lists once more when it is ``SIBLING_LOOK_AFTER`` old and
   applies the same rule, cancelling its own batch and following the survivor when it lost. A try nobody of ours
   waits for (``CreatePath(waits=False)``: a create without ``wait_for_completion``) keeps settling instead, listing
   further and further apart until its batch shows or is ``SIBLING_LOOK_AFTER`` old. Without lag this costs
   nothing: the first listing shows the own batch.

Guarantee (docs/guarantees.md): one live batch per task instance and work, provided OpenAI's
clock and the workers' agree within ``RACE_SKEW``, and a listing that shows a batch shows the older ones too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from openai.types import Batch

from airflow_provider_openai_batch import idempotency
from airflow_provider_openai_batch.batch_status import (
    OutcomePolicy,
    can_survive_a_race,
    is_reusable,
    reuse_verdict,
    summarize,
)
from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
from airflow_provider_openai_batch.idempotency import (
    CLOCK_SKEW,
    FIRST_TRY_METADATA_KEY,
    IDEMPOTENCY_METADATA_KEY,
    RACE_SKEW,
    STATE_STORE_KEY,
    HeldLog,
    build_metadata,
    call_once,
    first_try,
    idempotency_key,
    scan_start,
    surviving_batch,
    task_identity,
    work_parts,
)

log = logging.getLogger(__name__)

#: What a re-run after a clear may use instead of creating a batch (see ``OpenAIBatchCreateOperator``).
ReuseMode = Literal["active", "active_or_completed", "never"]
REUSE_MODES: tuple[str, ...] = ("active", "active_or_completed", "never")
#: How long the settle step lists again (``SETTLE_RELIST`` apart) while its own new batch is not listed yet.
SETTLE_WAIT_FOR_OWN = 60.0
SETTLE_RELIST = 2.0
#: How old a batch whose settle never saw it listed is when its waiter looks for a sibling once more (``SiblingLook``).
#: OpenAI does not say how soon a new batch is listed; ten minutes is far beyond any lag seen, and costs one list call.
SIBLING_LOOK_AFTER = 600.0
#: A wait that starts later than this after the creating try began looking makes no second look (``worth_it``).
SIBLING_LOOK_WITHIN = 1800.0


@dataclass(frozen=True)
class BatchWork:
    """
    What one batch does: everything that goes into its key besides the task instance.

    ``input_identity`` names the input in the key; by default the input file id. The one-task job names a shard by
    its content hash and place instead, so a retry finds the shard's batch before uploading the shard again.
    """

    input_file_id: str | None
    endpoint: str
    completion_window: str = "24h"
    metadata: Mapping[str, str] | None = None
    output_expires_after_seconds: int | None = None
    input_identity: str | None = None

    def key_parts(self) -> tuple[str, ...]:
        return work_parts(
            self.input_identity or str(self.input_file_id),
            self.endpoint,
            self.completion_window,
            self.metadata,
            self.output_expires_after_seconds,
        )


@dataclass(frozen=True)
class SiblingLook:
    """
    The second look for a duplicate, made by whoever waits for the batch (JSON-able: it travels in trigger kwargs).

    ``key`` and ``first`` are the batch's idempotency key and first try; ``since`` when the creating try started
    looking (epoch seconds): contenders are created after it, less ``RACE_SKEW``.
    """

    key: str
    first: int | None
    since: float

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "first": self.first, "since": self.since}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> SiblingLook | None:
        if not value:
            return None
        first = value.get("first")
        return cls(str(value["key"]), None if first is None else int(first), float(value["since"]))

    def due(self, created_at: float, now: float) -> bool:
        """Whether to look now: the batch is ``SIBLING_LOOK_AFTER`` old, so a lagging list has caught up."""
        return now - created_at >= SIBLING_LOOK_AFTER

    def worth_it(self, now: float) -> bool:
        """
        Whether the look is still worth a listing: it reads every batch since ``since``, so a wait that starts long
        after the create (a sensor run hours later) skips it; the racing tries' own waiters have looked by then.
        """
        return now - self.since <= SIBLING_LOOK_WITHIN

    @property
    def cutoff(self) -> float:
        return self.since - RACE_SKEW.total_seconds()

    def survivor(self, own: Any, listing: Iterable[Any]) -> Any:
        """The batch that keeps running: ``own`` or an older live sibling (``idempotency.surviving_batch``). ``own``
        is judged as listed when it is (its metadata names the try that made it, which breaks a same-second tie)."""
        listing = list(listing)
        own = next((batch for batch in listing if batch.id == own.id), own)
        return surviving_batch(own, listing, self.key, self.since, self.first)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def recent_batches(hook: Any, cutoff: float) -> list[Batch]:
    """The account's batches created since ``cutoff`` (epoch seconds), newest first: a page or two."""
    found: list[Batch] = []
    for batch in hook.list_batches():
        if batch.created_at < cutoff:
            break
        found.append(batch)
    return found


def follow_survivor(hook: Any, own: Batch, look: SiblingLook, logger: Any = log) -> Batch:
    """
    The second look, blocking: list the batches since ``look.cutoff``; when an older live sibling wins, cancel
    ``own`` and return the survivor (re-read), else ``own``. A failed listing keeps ``own`` (logged).
    """
    try:
        listing = recent_batches(hook, look.cutoff)
    except OpenAIBatchAPIError as error:
        logger.warning("Could not list batches to look again for a duplicate of %s (%s)", own.id, error)
        return own
    survivor = look.survivor(own, listing)
    if survivor.id == own.id:
        return own
    cancel_duplicate(hook, own.id, survivor.id, logger)
    return hook.get_batch(survivor.id)  # type: ignore[no-any-return]


async def afollow_survivor(hook: Any, own: Any, look: SiblingLook, logger: Any = log) -> Any:
    """
    ``follow_survivor`` in a trigger. ``own`` has ``id``, ``created_at``, ``status`` and ``metadata``; returns the
    batch to keep waiting for (``own``, or the survivor as listed).
    """
    listing: list[Any] = []
    try:
        async for batch in hook.alist_batches():
            if batch.created_at < look.cutoff:
                break
            listing.append(batch)
    except OpenAIBatchAPIError as error:
        logger.warning("Could not list batches to look again for a duplicate of %s (%s)", own.id, error)
        return own
    survivor = look.survivor(own, listing)
    if survivor.id == own.id:
        return own
    try:
        await hook.acancel_batch(own.id)
    except OpenAIBatchAPIError as error:
        if not error.refused_for_state:
            logger.warning("Could not cancel duplicate batch %s: %s", own.id, error)
    logger.warning(
        "Another try of this task created batch %s first; cancelled our duplicate %s and waiting for %s",
        survivor.id,
        own.id,
        survivor.id,
    )
    return survivor


def cancel_duplicate(hook: Any, own_id: str, survivor_id: str, logger: Any = log) -> None:
    try:
        hook.cancel_batch(own_id)
    except OpenAIBatchAPIError as error:
        if not error.refused_for_state:  # it had already ended: nothing left to stop
            raise
    logger.warning(
        "Another try of this task created batch %s first; cancelled our duplicate %s and using %s",
        survivor_id,
        own_id,
        survivor_id,
    )


@dataclass(frozen=True)
class Ensured:
    """What ``CreatePath.ensure`` decided: the batch to use, whether this try created it, and any second look."""

    batch: Batch
    created: bool
    #: The second look its waiter makes: only when the settle step never saw the new batch listed.
    look: SiblingLook | None


class CreatePath:
    """
    One task try's creates: key, lookup, reuse verdict, create once, settle (see the module docstring).

    :param hook: The ``OpenAIBatchHook`` every call goes through.
    :param context: The task's context (``ti``, ``dag_run``, ``task_state_store``).
    :param retries: The task's ``retries`` (to compute ``airflow_first_try``).
    :param policy: The outcome policy a completed batch must pass to be reused.
    :param reuse: What a re-run after a clear may reuse (``ReuseMode``).
    :param lookback: The scan window when the context has no DAG run.
    :param logger: The task's logger.
    :param waits: Whether the caller waits for the batches it makes (and makes the second look, ``SiblingLook``,
        for a batch the settle step never saw listed). ``False``: the settle step keeps listing until it sees them.
    """

    def __init__(
        self,
        hook: Any,
        context: Mapping[str, Any],
        *,
        retries: int | None,
        policy: OutcomePolicy,
        reuse: ReuseMode | str = "active",
        lookback: Any = idempotency.DEFAULT_LOOKBACK,
        logger: Any = log,
        waits: bool = True,
    ) -> None:
        if reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {', '.join(REUSE_MODES)}; got {reuse!r}")
        self.hook = hook
        self.context = context
        self.identity = task_identity(context)
        self.first = first_try(context, retries)
        try_number = getattr(context.get("ti"), "try_number", None)
        self.try_number = try_number if isinstance(try_number, int) else None
        self.policy = policy
        self.reuse = reuse
        self.lookback = lookback
        self.log = logger
        self.waits = waits
        self.store = context.get("task_state_store")
        #: When this try last looked for each key (epoch seconds): its racers were created after that.
        self.looked: dict[str, float] = {}
        #: Batches the lookup saw and did not take: they existed before this try created, so they are no racers.
        self.passed_over: set[str] = set()
        #: Keys whose new batch the settle step never saw listed: their waiter makes the second look.
        self.unseen: set[str] = set()

    # --- keys ---------------------------------------------------------------------------------

    def key(self, work: BatchWork) -> str:
        return idempotency_key(self.identity, *work.key_parts())

    def metadata(self, work: BatchWork, key: str) -> dict[str, str]:
        return build_metadata(work.metadata, key, self.first, self.try_number)

    # --- the state store record: {"batches": {key: {"batch_id", "first_try"}}} -------------------------------

    def _records(self) -> dict[str, dict[str, Any]]:
        record = self.store.get(STATE_STORE_KEY) if self.store is not None else None
        if not isinstance(record, dict):
            return {}
        if "key" in record and "batch_id" in record:  # the one-batch record of provider releases before 0.4
            return {str(record["key"]): {"batch_id": record["batch_id"], "first_try": record.get("first_try")}}
        batches = record.get("batches")
        return {str(k): dict(v) for k, v in batches.items() if isinstance(v, dict)} if isinstance(batches, dict) else {}

    def remember(self, key: str, batch_id: str) -> None:
        """Record ``key``'s batch in the task's state store (Airflow 3.3+), so a later try reads it without a scan."""
        if self.store is None:
            return
        records = self._records()
        records[key] = {"batch_id": batch_id, "first_try": self.first}
        self.store.set(STATE_STORE_KEY, {"batches": records})

    # --- lookup --------------------------------------------------------------------------------

    def earlier(self, keys: Collection[str]) -> dict[str, Batch]:
        """
        For each of ``keys``, an earlier try's batch that may stand in for a new one: the state store's record,
        then one scan for every key not settled by it. Each verdict is logged with its reason.
        """
        now = time.time()
        for key in keys:
            self.looked[key] = now
        chosen: dict[str, Batch] = {}
        records = self._records()
        for key in keys:
            record = records.get(key)
            if record is None:
                continue
            try:
                batch = self.hook.get_batch(str(record["batch_id"]))
            except OpenAIBatchAPIError as error:
                if not error.not_found:
                    raise
                continue
            if self._may_reuse(batch, _int(record.get("first_try"))):
                chosen[key] = batch
            else:
                self.passed_over.add(batch.id)  # a later try may still have made one and died before recording it
        missing = set(keys) - set(chosen)
        if not missing or getattr(self.context.get("ti"), "try_number", None) == 1:
            # The task instance's very first try (try numbers grow across retries and clears): no earlier try
            # can have made a batch, so there is nothing to scan for.
            return chosen
        found: dict[str, list[Batch]] = {}
        for batch in recent_batches(self.hook, scan_start(self.context, self.lookback)):
            named = (batch.metadata or {}).get(IDEMPOTENCY_METADATA_KEY)
            if named is not None and named in missing and batch.id not in self.passed_over:
                found.setdefault(named, []).append(batch)
        for key, batches in found.items():
            pick = self._choose(batches)
            if pick is not None:
                chosen[key] = pick
        return chosen

    def _choose(self, batches: list[Batch]) -> Batch | None:
        """Live batches first, oldest first (every try orders them the same way); the first one reusable wins."""
        ordered = sorted(batches, key=lambda b: (not can_survive_a_race(b.status), b.created_at, b.id))
        for batch in ordered:
            if self._may_reuse(batch, _int((batch.metadata or {}).get(FIRST_TRY_METADATA_KEY))):
                self.passed_over.update(b.id for b in batches if b.id != batch.id)
                return batch
            self.passed_over.add(batch.id)
        return None

    def _may_reuse(self, batch: Batch, made_in: int | None) -> bool:
        """
        Whether ``batch`` (made during the run of tries starting at ``made_in``) may stand in for a new one now. A
        retry (same run of tries) follows the never-pay-twice rule; a re-run after a clear follows ``reuse``.
        """
        retry = made_in == self.first
        verdict = reuse_verdict(
            summarize(batch), self.policy, allow_completed=retry or self.reuse == "active_or_completed"
        )
        if verdict.reuse and not retry and self.reuse == "never":
            self.log.info("Not reusing %s: the task was cleared and reuse='never'; creating a new batch", batch.id)
            return False
        what = "a retry" if retry else "a re-run after a clear"
        self.log.info("%s %s for %s: %s", "Reusing" if verdict.reuse else "Not reusing", batch.id, what, verdict.reason)
        return verdict.reuse

    # --- create and settle -----------------------------------------------------------------------------

    def create(self, work: BatchWork, key: str, *, input_file_id: str | None = None) -> Batch:
        """Create the batch once (``call_once``) and settle a race with another try; returns the survivor."""
        created, failure = self.create_many([(work, key, input_file_id)])
        if failure is not None:
            raise failure
        return created[0]

    def create_many(
        self,
        wave: list[tuple[BatchWork, str, str | None]],
        *,
        no_later_try: Callable[[], bool] | None = None,
    ) -> tuple[list[Batch], OpenAIBatchAPIError | None]:
        """
        Create a wave of batches (``(work, key, input file id)`` each, each once) and settle them together: one pause
        and one listing for the whole wave, not one per batch. Nothing is logged until the settle has run (an
        orphaned try dies at its first log line and must have cancelled its duplicates by then): what the create,
        the SDK and the settle have to say is held (``idempotency.HeldLog``) and said after. A create that fails
        stops the wave: the batches created before it are settled and returned with the error, which the caller
        raises (or handles, a queue refusal) once it has recorded the ones made.

        ``no_later_try``, asked right after the creates, says from the caller's own record that no later try of
        this task instance has begun (the job's work folder holds no later try's mark). When it does and this try is
        the first of its run of tries (``sole_try``), the settle is skipped: no earlier try of the run exists, and
        a later one begins looking only after our creates, so each of its batches is younger than ours or, in the
        same second, loses the tie to the earlier try (``surviving_batch``); its own settle cancels it.
        """
        made: list[tuple[Batch, str]] = []
        failure: OpenAIBatchAPIError | None = None
        # The client is built (the connection read) before the window: reading a connection logs on some Airflow
        # versions (3.0: "Connection Retrieved"), which must not fall between a create and its settle.
        self.hook.get_conn()
        held = HeldLog()
        try:
            with held:
                for work, key, input_file_id in wave:
                    try:
                        made.append((self._send(work, key, input_file_id, held), key))
                    except OpenAIBatchAPIError as error:
                        failure = error
                        break
                if made and no_later_try is not None and self.sole_try and no_later_try():
                    say = held.speaker(self.log)
                    for own, _ in made:
                        say.info("Created batch %s for %s", own.id, own.input_file_id)
                    survivors = [own for own, _ in made]
                else:
                    survivors = self.settle_many(made, held) if made else []
        finally:
            held.release()
        return survivors, failure

    @property
    def sole_try(self) -> bool:
        """Whether this try is the first of its run of tries: no earlier try of the run can be creating."""
        return self.first is not None and self.try_number == self.first

    def _send(self, work: BatchWork, key: str, input_file_id: str | None, held: HeldLog) -> Batch:
        file_id = input_file_id or work.input_file_id
        if not file_id:
            raise ValueError("a batch needs an input file id")
        metadata = self.metadata(work, key)
        sent_after = time.time() - CLOCK_SKEW.total_seconds()

        def send() -> Batch:
            batch: Batch = self.hook.create_batch(
                file_id,
                work.endpoint,
                completion_window=work.completion_window,
                metadata=metadata,
                output_expires_after_seconds=work.output_expires_after_seconds,
                max_retries=0,
            )
            return batch

        def find() -> Batch | None:
            # Only a batch this very attempt may have made (its answer lost): created since it started sending.
            for batch in recent_batches(self.hook, sent_after):
                if (batch.metadata or {}).get(IDEMPOTENCY_METADATA_KEY) == key and is_reusable(batch.status):
                    return batch
            return None

        return call_once("batches.create", send, find, logger=held.speaker(idempotency.log))

    def look(self, key: str) -> SiblingLook:
        return SiblingLook(key, self.first, self.looked.get(key, time.time()))

    def _listing(self, cutoff: float) -> list[Batch] | OpenAIBatchAPIError:
        try:
            return recent_batches(self.hook, cutoff)
        except OpenAIBatchAPIError as error:  # after the SDK's retries
            return error

    def settle_many(self, made: list[tuple[Batch, str]], held: HeldLog | None = None) -> list[Batch]:
        """
        Right after creating: list the batches made since this try started looking (less ``RACE_SKEW``) that the
        lookup did not pass over; by ``surviving_batch``, cancel each own batch that is a duplicate and adopt its
        survivor. One pause and one listing for all of ``made``, again while a lagging listing hides an own batch:
        ``SETTLE_RELIST`` apart up to ``SETTLE_WAIT_FOR_OWN``; then, when nobody waits for the batches (``waits``),
        further apart (each wait as long as all before it) until they are ``SIBLING_LOOK_AFTER`` old, where the
        waiter's second look would have listed. A failed listing is tried again the same way; one that still fails
        keeps the batches we have (their waiter, if any, makes the second look). What it says is held until the
        caller releases ``held`` (its own ``HeldLog`` when none is given, released on return).
        """
        if held is None:
            held = HeldLog()
            try:
                with held:
                    return self.settle_many(made, held)
            finally:
                held.release()
        say = held.speaker(self.log)
        time.sleep(idempotency.SETTLE_PAUSE)  # until a racer created in the same second as ours is listed too
        cutoff = min(self.look(key).cutoff for _, key in made)
        ours = {own.id for own, _ in made}
        started = time.time()
        give_up = started + SETTLE_WAIT_FOR_OWN
        # Without a waiter, the settle step makes the second look itself: when the youngest batch is old enough.
        due = max(own.created_at for own, _ in made) + SIBLING_LOOK_AFTER

        def shown(listing: list[Batch] | OpenAIBatchAPIError) -> bool:
            return not isinstance(listing, OpenAIBatchAPIError) and ours <= {b.id for b in listing}

        listing = self._listing(cutoff)
        lagging = False
        while not shown(listing):
            now = time.time()
            if now < give_up:
                pause = SETTLE_RELIST
            elif self.waits or now >= due:
                break
            else:
                pause = min(max(SETTLE_RELIST, now - started), due - now)
            lagging = True
            time.sleep(pause)  # the listing lags: it may hide a racer as it hides our own batch
            listing = self._listing(cutoff)
        if lagging and shown(listing):
            # Our batch shows, so every batch made before it does; one made later in the same second (which
            # can win the tie by id) shows within that second's lag too: list once more a pause later.
            time.sleep(idempotency.SETTLE_PAUSE)
            listing = self._listing(cutoff)
        if isinstance(listing, OpenAIBatchAPIError):  # keep the batches we have, do not fail the try
            say.warning("Could not list batches to look for duplicates of %s (%s)", ", ".join(ours), listing)
            self.unseen.update(key for _, key in made)
            return [own for own, _ in made]
        listed = {b.id for b in listing}
        candidates = [b for b in listing if b.id not in self.passed_over]
        survivors = []
        for own, key in made:
            if own.id not in listed:
                self.unseen.add(key)
            survivor = self.look(key).survivor(own, candidates)
            if survivor.id == own.id:
                say.info("Created batch %s for %s", own.id, own.input_file_id)
            else:
                cancel_duplicate(self.hook, own.id, survivor.id, say)
            survivors.append(survivor)
        return survivors

    def ensure(self, work: BatchWork) -> Ensured:
        """The batch for ``work``: an earlier try's (when it may be reused) or a new one, recorded in the store."""
        key = self.key(work)
        self.metadata(work, key)  # metadata OpenAI would refuse is refused before anything is sent
        batch = self.earlier([key]).get(key)
        created = batch is None
        if batch is None:
            batch = self.create(work, key)
        self.remember(key, batch.id)
        return Ensured(batch, created, self.look(key) if key in self.unseen and self.waits else None)
