"""
The poll and kill policies (``polling.py``) on their own: cadence, first-poll jitter, failed polls in a row, and
whether stopping a task cancels its batch. Every way of waiting asks these, so each rule is pinned here once.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from airflow_provider_openai_batch.exceptions import OpenAIBatchAPIError
from airflow_provider_openai_batch.polling import (
    DEFAULT_MAX_POLL_FAILURES,
    DEFER_BACKSTOP,
    STOP_STATES,
    UNKNOWN_STATE,
    PollFailures,
    PollPolicy,
    aread_once,
    backoff_delay,
    defer_timeout,
    read_once,
    should_cancel_on_kill,
    task_instance_state,
)

HOUR = 3600.0


def _polls_until(policy: PollPolicy, ended_at: float) -> tuple[int, float]:
    """Polls a wait makes for a batch that ends ``ended_at`` seconds after creation, and how late it notices."""
    now, polls = 0.0, 0
    while True:
        now += policy.delay(now)
        polls += 1
        if now >= ended_at:
            return polls, now - ended_at


# --- cadence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_poll_interval", [None, 60.0, 30.0])
def test_the_cadence_is_fixed_without_a_larger_max_poll_interval(max_poll_interval):
    policy = PollPolicy(poll_interval=60.0, max_poll_interval=max_poll_interval)
    assert {policy.delay(age) for age in (0.0, 59.0, 600.0, 5 * HOUR, 30 * HOUR)} == {60.0}


@pytest.mark.parametrize(
    ("age", "delay"),
    [
        (0.0, 60.0),  # young: the poll interval
        (599.0, 60.0),  # a tenth of the age is still below the interval
        (1200.0, 120.0),  # a tenth of the age
        (3000.0, 300.0),
        (6000.0, 600.0),  # reaches the cap
        (24 * HOUR, 600.0),  # and stays there
    ],
)
def test_the_cadence_relaxes_to_a_tenth_of_the_age_up_to_the_cap(age, delay):
    assert PollPolicy(poll_interval=60.0, max_poll_interval=600.0).delay(age) == pytest.approx(delay)


def test_a_relaxed_wait_polls_far_less_and_notices_the_end_within_a_tenth_of_the_wait():
    relaxed = PollPolicy(poll_interval=60.0, max_poll_interval=600.0)
    assert _polls_until(PollPolicy(poll_interval=60.0), HOUR)[0] == 60
    assert _polls_until(relaxed, HOUR)[0] == 29  # the docstring's "about 29 polls instead of 60"
    # 24 hours: 169 polls under the default 10-minute cap (instead of 1,440), 63 with no cap at all.
    assert _polls_until(relaxed, 24 * HOUR)[0] == 169
    assert _polls_until(PollPolicy(poll_interval=60.0, max_poll_interval=1e12), 24 * HOUR)[0] == 63
    for ended_at in (30.0, 90.0, 700.0, 1800.0, HOUR, 5 * HOUR, 24 * HOUR):
        _, late = _polls_until(relaxed, ended_at)
        assert late <= max(60.0, min(600.0, ended_at / 10.0)) + 1e-6, (ended_at, late)


# --- the first poll ---------------------------------------------------------------------------------------------


def test_without_jitter_the_first_poll_is_at_once():
    assert PollPolicy(poll_interval=60.0, jitter_first_poll=False).first_delay(remaining=HOUR) == 0.0


def test_the_first_poll_is_spread_over_the_interval():
    random.seed(7)
    policy = PollPolicy(poll_interval=60.0)
    delays = [policy.first_delay(remaining=HOUR) for _ in range(1000)]
    assert all(0.0 <= d <= 60.0 for d in delays)
    # 1,000 waits loaded at once by a restarted triggerer do not poll in lockstep: they spread over the interval.
    assert min(delays) < 6.0 and max(delays) > 54.0
    assert len({round(d, 3) for d in delays}) > 900


@pytest.mark.parametrize(("remaining", "most"), [(10.0, 10.0), (0.0, 0.0), (-5.0, 0.0)])
def test_the_first_poll_never_waits_past_the_deadline(remaining, most):
    random.seed(3)
    policy = PollPolicy(poll_interval=60.0)
    assert all(0.0 <= policy.first_delay(remaining=remaining) <= most for _ in range(200))


# --- failed polls -----------------------------------------------------------------------------------------------


def _error(status: int | None) -> OpenAIBatchAPIError:
    return OpenAIBatchAPIError("batches.retrieve", "boom", status_code=status)


@pytest.mark.parametrize("status", [None, 408, 409, 429, 500, 502, 503])
def test_transient_failures_are_tolerated_up_to_max_poll_failures_in_a_row(status):
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=3))
    assert [failures.failed(_error(status)) for _ in range(4)] == ["retry_later"] * 3 + ["give_up"]


def test_a_successful_poll_starts_the_count_again():
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=2))
    for _ in range(5):  # two failures, a success, two failures ...: never more than two in a row
        assert failures.failed(_error(503)) == "retry_later"
        assert failures.failed(_error(503)) == "retry_later"
        failures.succeeded()
    assert failures.failed(_error(503)) == "retry_later"
    assert failures.failed(_error(503)) == "retry_later"
    assert failures.failed(_error(503)) == "give_up"


def test_the_default_tolerates_ten_failed_polls():
    failures = PollFailures(PollPolicy(poll_interval=1.0))
    steps = [failures.failed(_error(500)) for _ in range(DEFAULT_MAX_POLL_FAILURES + 1)]
    assert DEFAULT_MAX_POLL_FAILURES == 10
    assert steps == ["retry_later"] * 10 + ["give_up"]


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_a_refusal_ends_the_wait_at_once(status):
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=10))
    assert failures.failed(_error(status)) == "give_up"


def test_a_401_reads_the_connection_once_more_then_gives_up():
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=10))
    assert failures.failed(_error(401)) == "retry_now"  # the key may just have been rotated
    assert failures.failed(_error(401)) == "give_up"  # still refused with the fresh key


def test_after_a_success_a_new_401_gets_its_own_fresh_read():
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=10))
    assert failures.failed(_error(401)) == "retry_now"
    failures.succeeded()  # the fresh key worked
    assert failures.failed(_error(401)) == "retry_now"  # rotated again hours later


def test_a_401_fresh_read_does_not_count_as_a_failed_poll():
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=1))
    assert failures.failed(_error(401)) == "retry_now"
    assert failures.count == 0
    assert failures.failed(_error(503)) == "retry_later"  # the one transient failure allowed is still there
    assert failures.failed(_error(503)) == "give_up"


# --- one poll under the policy (read_once / aread_once): what every way of waiting calls -------------------------


class Reads:
    """A status read that answers from a script: an error to raise, or a value to return."""

    def __init__(self, *answers: Any) -> None:
        self.answers, self.calls, self.resets = list(answers), 0, 0

    def read(self) -> Any:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def aread(self) -> Any:
        return self.read()

    def reset(self) -> None:
        self.resets += 1


def _sync_once(reads: Reads, failures: PollFailures) -> Any:
    return read_once(reads.read, failures, "batch b", reads.reset)


def _async_once(reads: Reads, failures: PollFailures) -> Any:
    return asyncio.run(aread_once(reads.aread, failures, "batch b", reads.reset))


ONE_POLL = pytest.mark.parametrize("once", [_sync_once, _async_once], ids=["read_once", "aread_once"])
Once = Callable[[Reads, PollFailures], Any]


def _api_error(status: int, request_id: str = "req_abc123") -> OpenAIBatchAPIError:
    return OpenAIBatchAPIError("batches.retrieve", "boom", status_code=status, request_id=request_id)


@ONE_POLL
def test_a_tolerated_failure_is_no_answer_and_the_wait_goes_on(once: Once):
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=2))
    reads = Reads(_api_error(503), _api_error(500), "batch")
    assert once(reads, failures) is None  # the caller waits its interval and polls again
    assert once(reads, failures) is None
    assert failures.count == 2 and failures.last is not None and failures.last.http_status == 500
    assert once(reads, failures) == "batch"
    assert failures.count == 0 and reads.calls == 3 and reads.resets == 0


@ONE_POLL
def test_giving_up_raises_the_api_error_with_its_status_and_request_id(once: Once):
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=1))
    reads = Reads(_api_error(503, "req_first"), _api_error(502, "req_last"))
    assert once(reads, failures) is None
    with pytest.raises(OpenAIBatchAPIError) as raised:
        once(reads, failures)
    assert raised.value.http_status == 502 and raised.value.request_id == "req_last"
    assert "HTTP 502" in str(raised.value) and "req_last" in str(raised.value)


@ONE_POLL
def test_a_refusal_raises_at_the_first_failure(once: Once):
    reads = Reads(_api_error(403, "req_denied"))
    with pytest.raises(OpenAIBatchAPIError) as raised:
        once(reads, PollFailures(PollPolicy(poll_interval=1.0)))
    assert raised.value.http_status == 403 and raised.value.request_id == "req_denied" and reads.calls == 1


@ONE_POLL
def test_a_401_drops_the_client_once_and_reads_again_at_once(once: Once):
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=10))
    reads = Reads(_api_error(401), "batch")
    assert once(reads, failures) == "batch"  # in the same poll: no interval waited for the fresh key
    assert reads.resets == 1 and reads.calls == 2 and failures.count == 0


@ONE_POLL
def test_a_401_with_the_fresh_key_too_raises_after_one_reset(once: Once):
    failures = PollFailures(PollPolicy(poll_interval=1.0, max_poll_failures=10))
    reads = Reads(_api_error(401, "req_old_key"), _api_error(401, "req_new_key"), "never read")
    with pytest.raises(OpenAIBatchAPIError) as raised:
        once(reads, failures)
    assert raised.value.http_status == 401 and raised.value.request_id == "req_new_key"
    assert reads.resets == 1 and reads.calls == 2


# --- the deferral's own timeout -----------------------------------------------------------------------------------


def test_a_deferral_times_out_after_its_deadline_two_intervals_and_the_backstop():
    before = time.time()
    timeout = defer_timeout(before + 3600.0, poll_interval=60.0)
    after = time.time()
    assert timedelta(seconds=3600.0 - (after - before) + 120.0) + DEFER_BACKSTOP <= timeout
    assert timeout <= timedelta(seconds=3600.0 + 120.0) + DEFER_BACKSTOP


def test_a_deferral_past_its_deadline_still_gets_the_intervals_and_the_backstop():
    assert defer_timeout(time.time() - 3600.0, poll_interval=30.0) == timedelta(seconds=60.0) + DEFER_BACKSTOP


# --- backoff between retries of a call (downloads and the like) ------------------------------------------------


def test_the_backoff_doubles_from_the_base_up_to_the_cap_without_jitter():
    delays = [backoff_delay(attempt, base=0.5, cap=8.0, jitter=0.0) for attempt in range(0, 9)]
    assert delays == [0.5, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize(("attempt", "middle"), [(1, 0.5), (3, 2.0), (5, 8.0), (40, 8.0)])
def test_a_jittered_backoff_stays_within_its_share_of_the_delay(attempt, middle):
    random.seed(11)
    delays = [backoff_delay(attempt, base=0.5, cap=8.0) for _ in range(2000)]
    assert all(middle * 0.8 <= delay <= middle * 1.2 for delay in delays)  # the default jitter: 20 % either way


def test_waiters_backing_off_together_do_not_come_back_in_lockstep():
    random.seed(5)
    delays = [backoff_delay(3, base=0.5, cap=8.0) for _ in range(2000)]
    # Spread over the band (2 s +- 20 %), not one moment: the draws differ and fill it from end to end.
    assert len({round(delay, 6) for delay in delays}) > 1900
    assert min(delays) < 1.65 and max(delays) > 2.35
    assert statistics.pstdev(delays) > 0.2  # a uniform spread over 1.6..2.4 has 0.23


# --- the kill policy --------------------------------------------------------------------------------------------


def _task_instance_states() -> list[str]:
    from airflow.utils.state import TaskInstanceState

    return [state.value for state in TaskInstanceState]


def test_the_stop_states_are_airflows_own():
    assert STOP_STATES.issubset(_task_instance_states())


@pytest.mark.parametrize("state", [*_task_instance_states(), None, UNKNOWN_STATE])
def test_only_a_user_stopping_the_work_cancels_the_batch(state):
    cancel, reason = should_cancel_on_kill(True, state)
    # mark failed (Airflow 3's kill), skipped, upstream failed, removed: the work is to stop.
    assert cancel is (state in {"failed", "skipped", "upstream_failed", "removed"})
    assert reason


@pytest.mark.parametrize("state", ["failed", "skipped", "upstream_failed", "removed", "success", None, UNKNOWN_STATE])
def test_cancel_on_kill_false_never_cancels(state):
    assert should_cancel_on_kill(False, state) == (False, "cancel_on_kill=False")


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ("failed", "stopped (failed)"),
        ("success", "marked successful"),
        (None, "run again (state none)"),
        ("up_for_retry", "run again (state up_for_retry)"),
        ("scheduled", "run again (state scheduled)"),
        (UNKNOWN_STATE, "could not be read"),
    ],
)
def test_the_kill_decision_says_why(state, says):
    assert says in should_cancel_on_kill(True, state)[1]


def test_a_state_that_cannot_be_read_is_unknown_and_keeps_the_batch():
    class TaskInstance:  # outside a task process there is no Task SDK channel to ask Airflow through
        dag_id, task_id, run_id, map_index = "d", "t", "r", -1

    assert task_instance_state(None) == UNKNOWN_STATE
    assert task_instance_state(TaskInstance()) == UNKNOWN_STATE
    assert should_cancel_on_kill(True, task_instance_state(TaskInstance()))[0] is False
