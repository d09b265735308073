"""
The one poll policy, the one poll step and the one kill policy, for every way of waiting for a batch.

A batch is waited for deferred (the triggers), blocking (``hook.wait_for_batch`` for an operator waiting on one
batch; the one-task job's blocking wait calls ``hook.poll_batch`` for each of its batches) and by a sensor's
``poke`` / ``reschedule`` modes. How often to poll, how many failed polls to tolerate, what one
failed poll means (``read_once`` / ``aread_once``) and whether to cancel when the task is stopped are decided here,
so the same network blip ends every kind of wait the same way.

Kill policy, from what Airflow 3.3 does (``airflow/jobs/triggerer_job_runner.py``, ``TriggerRunner.run_trigger``
and ``cancel_triggers``): a trigger is cancelled with the "user action" message, and then its ``on_kill`` is
called, whenever the user clears, marks failed or marks successful its deferred task; a triggerer shutting down
or handing a trigger to another triggerer cancels without that message (``cleanup`` only), and so does a trigger
timeout. Airflow 3.0 to 3.2 never call a trigger's ``on_kill``. On a worker, the task's ``on_kill`` runs when
the task process is told to stop (the same user actions, seen through the heartbeat). So ``on_kill`` alone does
not say what the user wants; the task instance's state, read back from Airflow at that moment, does:

- ``failed`` / ``skipped`` / ``upstream_failed`` / ``removed``: the user stopped the work (mark failed is
  Airflow 3's "kill"): cancel the batch, if ``cancel_on_kill``.
- no state / ``scheduled`` / ``queued`` / ``restarting`` / ``up_for_retry``: cleared, or retried: the task runs
  again and waits for the same batch (see the create operator's ``reuse``), so cancelling would throw away work
  the re-run needs. Not cancelled.
- ``success``: marked successful: the user accepts the task as done, not the work as worthless; the batch runs
  on and a download afterwards waits for its files (it refuses a batch that has not ended). Not cancelled.
- unknown (the state could not be read): not cancelled, with a warning; a running batch can always be cancelled
  with ``OpenAIBatchCancelOperator``, a wrongly cancelled one cannot be brought back.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError

log = logging.getLogger(__name__)

#: Consecutive failed polls (after the SDK's own retries) tolerated before a wait gives up.
DEFAULT_MAX_POLL_FAILURES = 10
#: Seconds between polls while a batch is young.
DEFAULT_POLL_INTERVAL = 60.0
#: The relaxed cadence's ceiling: a long batch is polled at least every 10 minutes.
DEFAULT_MAX_POLL_INTERVAL = 600.0
#: Airflow's own backstop past a deferred wait's deadline, in case the triggerer is down then: twice the poll
#: interval plus this (``defer_timeout``).
DEFER_BACKSTOP = timedelta(minutes=15)
#: Task-instance states that mean the user wants the work stopped.
STOP_STATES = frozenset({"failed", "skipped", "upstream_failed", "removed"})
#: The state could not be read back (no Task SDK channel, an older Airflow, an API error).
UNKNOWN_STATE = "<unknown>"

PollStep = Literal["retry_now", "retry_later", "give_up"]


@dataclass(frozen=True)
class PollPolicy:
    """
    How a wait polls: cadence, first-poll jitter and tolerance of failed polls.

    :param poll_interval: Seconds between polls while the batch is young.
    :param max_poll_interval: As the batch ages, polls relax to a tenth of its age, up to this; ``None`` keeps
        the cadence fixed.
    :param max_poll_failures: Transient failures in a row (429, 5xx, connection, timeouts, after the SDK's own
        retries) tolerated before the wait gives up; 403/404 give up at once, a 401 after one fresh read of
        the connection (the key may just have been rotated).
    :param jitter_first_poll: Start at a random offset within the interval, so a triggerer restart that loads
        1,000 waits at once does not make them poll in lockstep.
    """

    poll_interval: float
    max_poll_interval: float | None = None
    max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES
    jitter_first_poll: bool = True

    def delay(self, batch_age: float) -> float:
        """
        Seconds until the next poll: ``poll_interval`` at first, then a tenth of the batch's age, capped at
        ``max_poll_interval``.

        A batch that has run for 5 hours will not finish in the next minute any more likely than in the next
        10, so later polls can be sparser while the delay in noticing the end stays under a tenth of the wait.
        A 1 h batch takes about 29 polls instead of 60; a 24 h one 169 under the default 10-minute cap (63 uncapped)
        instead of 1,440.
        """
        if self.max_poll_interval is None or self.max_poll_interval <= self.poll_interval:
            return self.poll_interval
        return min(self.max_poll_interval, max(self.poll_interval, batch_age / 10.0))

    def first_delay(self, remaining: float) -> float:
        """The wait before the first poll: a random share of the interval (never past the deadline)."""
        if not self.jitter_first_poll:
            return 0.0
        return random.uniform(0, min(self.poll_interval, max(0.0, remaining)))


@dataclass
class PollFailures:
    """Failed polls of one wait, in a row; what to do after each (the same answer for every way of waiting)."""

    policy: PollPolicy
    count: int = 0
    reread: bool = field(default=False)
    #: The last failure (a blocking wait past its deadline raises it).
    last: OpenAIBatchAPIError | None = None

    def failed(self, error: OpenAIBatchAPIError) -> PollStep:
        if error.unauthorized and not self.reread:
            # The client holding the refused key is dropped; one fresh read of the connection before failing.
            self.reread = True
            return "retry_now"
        self.count += 1
        if not error.retryable or self.count > self.policy.max_poll_failures:
            return "give_up"
        return "retry_later"

    def succeeded(self) -> None:
        self.count, self.reread = 0, False


def defer_timeout(until: float, poll_interval: float) -> timedelta:
    """
    The ``timeout`` to give ``defer`` for a wait whose trigger ends by ``until`` (epoch seconds): the time left
    (none once it has passed), then twice ``poll_interval`` (room for the trigger's last polls) and
    ``DEFER_BACKSTOP``. The trigger ends the wait itself by ``until``; Airflow's timeout is the backstop for a
    triggerer that is down then, so the task does not stay deferred for ever.
    """
    return timedelta(seconds=max(0.0, until - time.time()) + 2 * poll_interval) + DEFER_BACKSTOP


T = TypeVar("T")


def keep_client() -> None:
    """The ``reset`` of an async read: the hook drops its async client on a 401 itself (``OpenAIBatchHook._acall``)."""


def _failed(
    failures: PollFailures, error: OpenAIBatchAPIError, what: str, reset: Callable[[], None], logger: Any
) -> bool:
    """What one failed read means: ``True``: read again at once (after a 401); ``False``: wait; give-up raises."""
    failures.last = error
    step = failures.failed(error)
    if step == "give_up":
        raise error
    if step == "retry_now":
        logger.warning("Polling %s was refused (%s); re-reading the connection", what, error)
        reset()
        return True
    logger.warning("Polling %s failed (%s); attempt %d", what, error, failures.count)
    return False


def read_once(
    read: Callable[[], T], failures: PollFailures, what: str, reset: Callable[[], None], logger: Any = log
) -> T | None:
    """
    One poll under the policy: the value read, or ``None`` after a failure the policy tolerates (logged; the caller
    waits its interval and polls again). A 401 drops the client (``reset``) and reads once more at once; a failure
    past the policy's tolerance (``give_up``) raises the ``OpenAIBatchAPIError``, however the caller waits.
    """
    while True:
        try:
            value = read()
        except OpenAIBatchAPIError as error:
            if _failed(failures, error, what, reset, logger):
                continue
            return None
        failures.succeeded()
        return value


async def aread_once(
    read: Callable[[], Awaitable[T]], failures: PollFailures, what: str, reset: Callable[[], None], logger: Any = log
) -> T | None:
    """``read_once`` for a trigger's event loop."""
    while True:
        try:
            value = await read()
        except OpenAIBatchAPIError as error:
            if _failed(failures, error, what, reset, logger):
                continue
            return None
        failures.succeeded()
        return value


def should_cancel_on_kill(cancel_on_kill: bool, state: str | None) -> tuple[bool, str]:
    """The kill policy (see the module docstring): whether to cancel, and why, given the task's state now."""
    if not cancel_on_kill:
        return False, "cancel_on_kill=False"
    if state == UNKNOWN_STATE:
        return False, "the task's state could not be read, so the user's intent is unknown; the batch is left running"
    if state in STOP_STATES:
        return True, f"the task was stopped ({state})"
    if state == "success":
        return False, "the task was marked successful; the batch runs on and its results can still be downloaded"
    return False, f"the task will run again (state {state or 'none'}) and wait for the same batch"


def _state_key(task_id: str, map_index: int) -> str:
    return task_id if map_index < 0 else f"{task_id}_{map_index}"


def task_instance_state(ti: Any) -> str | None:
    """
    The task instance's state as Airflow holds it now, through the Task SDK (worker and triggerer alike), or
    ``UNKNOWN_STATE``. Blocking: call it from a thread in a trigger.
    """
    if ti is None:
        return UNKNOWN_STATE
    try:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        map_index = int(getattr(ti, "map_index", -1) if getattr(ti, "map_index", None) is not None else -1)
        states = RuntimeTaskInstance.get_task_states(
            dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=map_index
        )
        value = states[ti.run_id][_state_key(ti.task_id, map_index)]
    except Exception as error:  # no supervisor channel (dag.test, tests), an older Airflow, an API error
        log.debug("Could not read the state of %s: %s", getattr(ti, "task_id", ti), error)
        return UNKNOWN_STATE
    return None if value is None else str(getattr(value, "value", value))


def backoff_delay(attempt: int, base: float, cap: float, jitter: float = 0.2) -> float:
    """
    Seconds to wait before attempt ``attempt + 1``: ``base`` doubling per attempt up to ``cap``, spread by
    ``jitter`` (a share either way) so that many waiters backing off together do not come back in lockstep.
    """
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay * random.uniform(1.0 - jitter, 1.0 + jitter) if jitter else delay
