"""
What a batch status means (``batch_status.py``) on its own: which statuses end a wait, which batches a retry may
reuse or keep after a race, whether an ended batch or job is a success, how many result lines to expect, and the
progress line. Every operator, trigger and the job ask these, so each rule is pinned here once.
"""

from __future__ import annotations

from typing import Any, get_args

import pytest
from openai.types import Batch

from airflow_provider_openai_batch.batch_status import (
    BatchSummary,
    JobPolicy,
    LineRange,
    OutcomePolicy,
    can_survive_a_race,
    evaluate,
    evaluate_job,
    expected_result_lines,
    format_job_progress,
    format_progress,
    is_reusable,
    is_terminal,
    progress_key,
    reuse_verdict,
)

#: Every status the installed SDK's ``Batch.status`` lists, read from the SDK (a new one shows up here by itself).
SDK_STATUSES = frozenset(get_args(Batch.model_fields["status"].annotation))


def summary(
    status: str = "completed", total: int = 10, completed: int = 10, failed: int = 0, **extra: Any
) -> BatchSummary:
    value: dict[str, Any] = {
        "batch_id": "batch_1",
        "status": status,
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "input_file_id": "file-in",
        "output_file_id": "file-out",
        "error_file_id": None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "usage": None,
        "errors": [],
        **extra,
    }
    return value  # type: ignore[return-value]


# --- statuses ---------------------------------------------------------------------------------------------------


def test_the_sdk_lists_the_statuses_these_rules_are_written_for():
    assert {"validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"} <= (
        SDK_STATUSES
    )


@pytest.mark.parametrize(
    ("status", "terminal", "reusable", "survives"),
    [
        ("validating", False, True, True),
        ("in_progress", False, True, True),
        ("finalizing", False, True, True),
        ("completed", True, True, True),
        ("failed", True, False, False),
        ("expired", True, False, False),
        ("cancelling", False, False, False),  # dying: it ends cancelled whatever we do
        ("cancelled", True, False, False),
        ("paused", False, False, True),  # a status a later API adds: keep waiting, never reuse
    ],
)
def test_what_each_status_means(status, terminal, reusable, survives):
    assert is_terminal(status) is terminal
    assert is_reusable(status) is reusable
    assert can_survive_a_race(status) is survives


def test_every_sdk_status_is_either_active_or_terminal():
    assert {s for s in SDK_STATUSES if is_terminal(s)} == {"completed", "failed", "expired", "cancelled"}


# --- reuse ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing"])
@pytest.mark.parametrize("allow_completed", [True, False])
def test_a_working_batch_is_reused(status, allow_completed):
    verdict = reuse_verdict(summary(status, completed=0), OutcomePolicy(), allow_completed=allow_completed)
    assert verdict.reuse and f"still {status}" in verdict.reason


@pytest.mark.parametrize("status", ["cancelling", "cancelled", "failed", "expired", "paused"])
def test_a_dying_or_dead_batch_is_never_reused(status):
    verdict = reuse_verdict(summary(status, completed=0), OutcomePolicy(accept_expired=True), allow_completed=True)
    assert not verdict.reuse and "will not produce" in verdict.reason


def test_a_completed_batch_is_reused_only_when_allowed_and_it_passes_the_policy():
    good, poor = summary(completed=10), summary(completed=2, failed=8)
    assert reuse_verdict(good, OutcomePolicy(), allow_completed=True).reuse
    cleared = reuse_verdict(good, OutcomePolicy(), allow_completed=False)
    assert not cleared.reuse and "cleared" in cleared.reason
    strict = reuse_verdict(poor, OutcomePolicy(max_failed_requests=5), allow_completed=True)
    assert not strict.reuse and "fails this task's outcome policy" in strict.reason
    assert reuse_verdict(poor, OutcomePolicy(max_failed_requests=8), allow_completed=True).reuse


# --- the outcome of an ended batch ------------------------------------------------------------------------------


def test_completed_without_failures_succeeds():
    outcome = evaluate(summary(), OutcomePolicy())
    assert outcome.ok and not outcome.warning and "10/10 requests succeeded" in outcome.message


def test_completed_with_some_failures_warns_by_default():
    outcome = evaluate(summary(completed=7, failed=3), OutcomePolicy())
    assert outcome.ok and outcome.warning and "3 of 10 requests failed (30.0 %)" in outcome.message


def test_completed_with_every_request_failed_fails_by_default():
    outcome = evaluate(summary(completed=0, failed=10), OutcomePolicy())
    assert not outcome.ok and "every request failed" in outcome.message


@pytest.mark.parametrize(
    ("policy", "ok"),
    [
        (OutcomePolicy(max_failed_requests=3), True),  # at the limit
        (OutcomePolicy(max_failed_requests=2), False),  # past it
        (OutcomePolicy(max_failed_ratio=0.3), True),
        (OutcomePolicy(max_failed_ratio=0.29), False),
        (OutcomePolicy(max_failed_requests=5, max_failed_ratio=0.1), False),  # either one exceeded is enough
        (OutcomePolicy(max_failed_requests=0), False),
    ],
)
def test_failure_limits(policy, ok):
    outcome = evaluate(summary(completed=7, failed=3), policy)
    assert outcome.ok is ok
    assert ("within the allowed failures" in outcome.message) is ok


def test_with_a_limit_every_request_failing_is_judged_by_the_limit():
    assert evaluate(summary(completed=0, failed=10), OutcomePolicy(max_failed_ratio=1.0)).ok


def test_a_failed_batch_fails_and_names_its_errors():
    errors = [{"code": "invalid_method", "line": 2, "message": "Only POST", "param": "method"}] * 12
    outcome = evaluate(summary("failed", completed=0, errors=errors), OutcomePolicy())
    assert not outcome.ok
    assert "line 2, field 'method': [invalid_method] Only POST" in outcome.message
    assert "... and 2 more" in outcome.message  # the first ten, then how many more
    assert "no error details" in evaluate(summary("failed", completed=0), OutcomePolicy()).message


@pytest.mark.parametrize(("status", "flag"), [("expired", "accept_expired"), ("cancelled", "accept_cancelled")])
def test_expired_and_cancelled_fail_unless_accepted(status, flag):
    ended = summary(status, total=10, completed=4)
    refused = evaluate(ended, OutcomePolicy())
    assert not refused.ok and f"Set {flag}=True" in refused.message and "4 of 10" in refused.message
    accepted = evaluate(ended, OutcomePolicy(**{flag: True}))
    assert accepted.ok and accepted.warning
    other = "accept_cancelled" if flag == "accept_expired" else "accept_expired"
    assert not evaluate(ended, OutcomePolicy(**{other: True})).ok  # each flag accepts its own status only


@pytest.mark.parametrize("status", ["in_progress", "cancelling", "paused"])
def test_a_batch_that_has_not_ended_is_not_a_success(status):
    outcome = evaluate(summary(status), OutcomePolicy())
    assert not outcome.ok and "not finished" in outcome.message


@pytest.mark.parametrize("kwargs", [{"max_failed_ratio": 1.5}, {"max_failed_ratio": -0.1}, {"max_failed_requests": -1}])
def test_impossible_limits_are_refused(kwargs):
    with pytest.raises(ValueError, match="max_failed"):
        OutcomePolicy(**kwargs)
    with pytest.raises(ValueError, match="max_failed"):
        JobPolicy(**kwargs)


# --- the outcome of a job ---------------------------------------------------------------------------------------


def test_a_job_where_every_request_succeeded_succeeds():
    outcome = evaluate_job({"succeeded": 5, "failed": 0, "expired": 0}, JobPolicy())
    assert outcome.ok and not outcome.warning and outcome.message == "All 5 requests succeeded."


def test_a_job_with_some_unsucceeded_requests_warns_and_names_them():
    counts = {"succeeded": 6, "failed": 1, "expired": 2, "missing": 1, "cancelled": 0}
    outcome = evaluate_job(counts, JobPolicy(max_unrun_requests=3))
    assert outcome.ok and outcome.warning
    assert "4 of 10 requests did not succeed (40.0 %: 1 failed, 2 expired, 1 missing)" in outcome.message


def test_a_job_where_no_request_succeeded_fails_by_default():
    outcome = evaluate_job({"succeeded": 0, "failed": 3, "expired": 1}, JobPolicy())
    assert not outcome.ok and "no request succeeded" in outcome.message


def test_requests_that_never_ran_fail_a_job_by_default():
    outcome = evaluate_job({"succeeded": 9, "failed": 0, "missing": 1}, JobPolicy())
    assert not outcome.ok and "1 request(s) never ran" in outcome.message and "max_unrun_requests" in outcome.message


@pytest.mark.parametrize(
    ("policy", "ok"),
    [
        (JobPolicy(max_failed_requests=1, max_unrun_requests=3), True),
        (JobPolicy(max_failed_requests=0, max_unrun_requests=3), False),
        (JobPolicy(max_failed_requests=1, max_unrun_requests=2), False),
        (JobPolicy(max_failed_ratio=0.1, max_unrun_requests=None, max_unrun_ratio=0.3), True),
        (JobPolicy(max_failed_ratio=0.1, max_unrun_requests=None, max_unrun_ratio=0.29), False),
    ],
)
def test_job_limits_count_failed_and_unrun_requests_apart(policy, ok):
    # failed requests ran and failed; expired, cancelled and missing ones never ran: each has its own limit
    assert evaluate_job({"succeeded": 6, "failed": 1, "expired": 1, "cancelled": 1, "missing": 1}, policy).ok is ok


# --- expected result lines --------------------------------------------------------------------------------------


def test_a_completed_batch_has_one_output_line_per_success_and_one_error_line_per_failure():
    assert expected_result_lines(summary(total=10, completed=7, failed=3)) == {
        "output": LineRange(7, 7),
        "error": LineRange(3, 3),
    }


@pytest.mark.parametrize("status", ["expired", "cancelled"])
def test_unrun_requests_may_be_in_the_error_file_without_counting_as_failed(status):
    # a real expired batch: total 10, completed 1, failed 0, one output line and nine error lines
    lines = expected_result_lines(summary(status, total=10, completed=1, failed=0))
    assert lines == {"output": LineRange(1, 1), "error": LineRange(0, 9)}
    assert lines["error"].holds(9) and lines["error"].holds(0) and not lines["error"].holds(10)
    # a server that counts unrun requests as failed lands in the same range
    assert expected_result_lines(summary(status, total=10, completed=1, failed=9))["error"] == LineRange(9, 9)


@pytest.mark.parametrize("status", ["failed", "in_progress", "cancelling", "validating"])
def test_no_line_counts_for_a_batch_without_result_files(status):
    assert expected_result_lines(summary(status, completed=0)) is None


def test_no_line_counts_when_the_server_reports_none():
    assert expected_result_lines(summary(total=0, completed=0, failed=0)) is None


def test_a_line_range_reads_as_a_count_or_a_range():
    assert str(LineRange(1234, 1234)) == "1,234"
    assert str(LineRange(0, 9)) == "0 to 9"


# --- progress ---------------------------------------------------------------------------------------------------


def test_the_progress_line():
    line = format_progress(summary("in_progress", total=50_000, completed=12_333, failed=12))
    assert line == "batch batch_1 in_progress: 12,345/50,000 done (24.7 %), 12 failed"
    assert (
        format_progress(summary("validating", total=0, completed=0)) == "batch batch_1 validating: 0/0 done, 0 failed"
    )


def test_the_job_progress_line():
    summaries = [
        summary("completed", total=50_000, completed=50_000),
        summary("in_progress", total=50_000, completed=20_000, failed=12),
        summary("expired", total=20_000, completed=0),
    ]
    assert format_job_progress(summaries, "round 1") == (
        "round 1: 2/3 batches ended, 70,012/120,000 requests done (58.3 %), 12 failed"
    )
    assert format_job_progress([]) == "0/0 batches ended, 0/0 requests done, 0 failed"


def test_progress_is_worth_a_line_only_when_status_or_counts_change():
    before = summary("in_progress", completed=3)
    assert progress_key(before) == progress_key(summary("in_progress", completed=3, usage={"total_tokens": 5}))
    assert progress_key(before) != progress_key(summary("in_progress", completed=4))
    assert progress_key(before) != progress_key(summary("finalizing", completed=3))
    assert progress_key(before) != progress_key(summary("in_progress", completed=3, failed=1))
    assert progress_key(before) != progress_key(summary("in_progress", total=11, completed=3))
