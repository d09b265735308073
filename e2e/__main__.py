"""
``python -m e2e [--scenarios 1,2,6]``: stand the deployment up, run the scenarios, tear everything down.

Exit status 0 only when every scenario run passed (a scenario reported SKIP is not a pass), nothing
of the run listened beyond 127.0.0.1, and nothing of the run was left running. The run folder
(``.e2e-runs/<time>/``) keeps each service's log, ``pids.json`` and each scenario's evidence.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from e2e.deployment import REPO, Deployment, cleanup, listening_sockets
from e2e.scenarios import SCENARIOS, Harness, Outcome


def _listening_beyond_loopback(deployment: Deployment) -> list[tuple[int, str, int]]:
    import os

    sockets = listening_sockets([*deployment.our_processes(), os.getpid()])
    return [s for s in sockets if s[1] != "127.0.0.1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", default=",".join(map(str, SCENARIOS)), help="e.g. 1,2,6")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--cleanup", type=Path, default=None, help="stop what a dead harness left (its run folder)")
    args = parser.parse_args(argv)
    if args.cleanup:
        print(f"stopped {cleanup(args.cleanup)}")
        return 0
    wanted = [int(n) for n in args.scenarios.split(",") if n.strip()]
    run_dir = args.run_dir or REPO / ".e2e-runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"e2e: run folder {run_dir}", flush=True)
    started = time.monotonic()
    harness = Harness(run_dir, sys.executable)
    deployment = harness.deployment
    outcomes: list[Outcome] = []
    problems: list[str] = []
    try:
        deployment.start()
        print(f"e2e: deployment up in {time.monotonic() - started:.0f}s", flush=True)
        beyond = _listening_beyond_loopback(deployment)
        if beyond:
            problems.append(f"listening beyond 127.0.0.1: {beyond}")
        for number in wanted:
            title, run = SCENARIOS[number]
            outcome = Outcome(number, title)
            print(f"e2e: scenario {number}: {title}", flush=True)
            begun = time.monotonic()
            try:
                run(harness, outcome)
                if outcome.status != "SKIP":
                    outcome.status = "PASS"
            except Exception as error:
                outcome.status = "FAIL"
                outcome.notes.append(f"{type(error).__name__}: {error}")
                (run_dir / f"scenario-{number}.traceback.txt").write_text(traceback.format_exc())
            outcome.seconds = time.monotonic() - begun
            restarted = harness.heal()
            if restarted and outcome.status == "FAIL":
                outcome.notes.append(f"restarted afterwards: {', '.join(restarted)}")
            harness.write_evidence(outcome)
            outcomes.append(outcome)
            print(outcome.line(), flush=True)
    except Exception as error:
        problems.append(f"deployment: {type(error).__name__}: {error}")
        traceback.print_exc()
    finally:
        stopping = time.monotonic()
        leftovers = deployment.stop()
        harness.stop_fakes()
        print(f"e2e: deployment stopped in {time.monotonic() - stopping:.0f}s", flush=True)
        if leftovers:
            problems.append(f"processes left after the ordered stop (then killed): {leftovers}")
        if deployment.our_processes():
            problems.append(f"processes still running: {deployment.our_processes()}")

    print("\n=== e2e summary ===")
    for outcome in outcomes:
        print(outcome.line())
    for problem in problems:
        print(f"PROBLEM: {problem}")
    passed = sum(o.status == "PASS" for o in outcomes)
    failed = sum(o.status == "FAIL" for o in outcomes) + len(problems)
    skipped = sum(o.status == "SKIP" for o in outcomes)
    print(f"e2e: {time.monotonic() - started:.0f}s in all; run folder {run_dir}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 and passed else 1


if __name__ == "__main__":
    sys.exit(main())
