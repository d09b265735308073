"""
``make ui-check``: what a user sees in the Airflow UI, checked in a real browser against real Airflow services.

Starts FakeOpenAIServer and Airflow 3 (api-server, scheduler, dag-processor, triggerer; LocalExecutor on
SQLite, all on 127.0.0.1, see scripts/airflow_services.py), then drives Debian's Chromium through Playwright:

1. the connection form for ``openai_batch``: its fields, labels, hints, and placeholders that fit their inputs;
2. the main example DAG, triggered through the REST API: the sensor deferred, with its "OpenAI Batch" link
   (the connection says ``batch_link=openai``, as for a gateway in front of OpenAI, so the target is OpenAI's
   batch page; the browser never follows it: only loopback is reachable);
3. the sensor's task log: progress lines, no per-request ``HTTP Request:`` lines, a short trigger-event line;
4. the results: the download task's ``output_uri`` / ``error_uri`` XComs and the Asset it updated.

Each step saves a screenshot into the output folder (default ``build/ui-check``) and asserts what it shows.
The fake server's clock is moved by hand, so the batch stays in progress exactly as long as the check needs.
Known Airflow 3.3.2 bug routed around: the connection list's Test button sends ``port: 0`` for a connection
without a port and gets 400, so the check never presses it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from airflow_services import AirflowServices  # noqa: E402  (scripts/, this script's own folder)

from airflow_provider_openai_batch.testing import FakeOpenAIServer  # noqa: E402
from airflow_provider_openai_batch.testing.state import FakeClock, Timings  # noqa: E402

DAG_ID = "example_openai_batch"
CHROMIUM = "/usr/bin/chromium"
REQUEST_LINE = "HTTP Request:"
#: The batch on the fake's clock: it moves only when this script advances it.
TIMINGS = Timings(validating=2.0, in_progress=20.0, finalizing=2.0)
#: Fields the form must show for this connection type, by their label: standard fields, then extra fields.
STANDARD_LABELS = ("Base URL", "API key")
EXTRA_LABELS = (
    "Organization",
    "Project",
    "API type",
    "API version",
    "Timeout (seconds)",
    "Max retries",
    "Batch page link",
    "Default headers (JSON)",
)
HINTS = {"Organization": "OpenAI-Organization header", "Project": "OpenAI-Project header"}
#: A trigger event's ``result`` in the log longer than this is the whole summary again.
MAX_EVENT_LINE = 200


class Check:
    """One browser, one output folder, and the services under test."""

    def __init__(self, airflow: AirflowServices, fake: FakeOpenAIServer, clock: FakeClock, out: Path, page: Any):
        self.airflow, self.fake, self.clock, self.out, self.page = airflow, fake, clock, out, page
        self.shots: list[Path] = []

    def shot(self, name: str, clip: Any = None) -> Path:
        """A screenshot of the viewport, or of the visible part of one element (``clip``)."""
        path = self.out / f"{name}.png"
        area = None
        if clip is not None:
            box = clip.bounding_box()
            viewport = self.page.viewport_size
            top, left = max(box["y"], 0), max(box["x"], 0)
            area = {
                "x": left,
                "y": top,
                "width": min(box["x"] + box["width"], viewport["width"]) - left,
                "height": min(box["y"] + box["height"], viewport["height"]) - top,
            }
        self.page.screenshot(path=str(path), clip=area)
        self.shots.append(path)
        print(f"  screenshot {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return path

    def goto(self, path: str) -> None:
        self.page.goto(self.airflow.url + path)

    # --- 1. the connection form ----------------------------------------------------------------------

    def connection_form(self) -> None:
        print("1. connection form")
        page = self.page
        self.goto("/connections")
        page.get_by_role("button", name="Add Connection").click()
        dialog = page.get_by_role("dialog")
        dialog.wait_for()
        dialog.get_by_role("combobox").first.click()
        page.keyboard.type("OpenAI Batch")
        page.keyboard.press("Enter")
        self._open_section(dialog, "Standard Fields", "Base URL")
        lines = dialog.inner_text().splitlines()
        missing = [label for label in STANDARD_LABELS if label not in lines]
        assert not missing, f"the connection form's standard fields lack {missing}"
        shown = [label for label in ("Login", "Port", "Schema", "Host", "Password") if label in lines]
        assert not shown, f"fields that should be hidden or relabelled: {shown}"
        host = dialog.get_by_placeholder("https://api.openai.com/v1")
        assert host.count() == 1, "the Base URL input has not got its placeholder"
        overflowing = page.evaluate(_PLACEHOLDER_OVERFLOW_JS)
        assert overflowing == [], f"placeholders cut off in their inputs: {overflowing}"
        self.shot("1-connection-form", clip=dialog)
        self._open_section(dialog, "Extra Fields", "Organization")
        text = dialog.inner_text()
        missing = [label for label in EXTRA_LABELS if label not in text.splitlines()]
        assert not missing, f"the connection form's extra fields lack {missing}"
        for label, hint in HINTS.items():
            assert hint in text, f"{label} has no hint ({hint!r})"
        self.shot("1b-connection-form-extra-fields", clip=dialog)
        page.keyboard.press("Escape")

    @staticmethod
    def _open_section(dialog: Any, section: str, label: str) -> None:
        """The form's field groups are accordion sections: open one unless its fields already show."""
        field = dialog.get_by_text(label, exact=True)
        if not field.is_visible():
            dialog.get_by_role("button", name=section).first.click()
        field.wait_for()
        field.scroll_into_view_if_needed()

    # --- 2. the deferred sensor and its link ---------------------------------------------------------

    def trigger(self) -> str:
        print("2. trigger the example; the sensor defers")
        self.airflow.wait_for(lambda: self._dag_ready(), 300, f"the DAG processor to load {DAG_ID}", interval=2)
        run = self.airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None})
        return str(run["dag_run_id"])

    def _dag_ready(self) -> bool:
        try:
            return bool(self.airflow.api("GET", f"/dags/{DAG_ID}"))
        except Exception:
            return False

    def ti(self, run_id: str, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.airflow.api(
            "GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/{task_id}"
        )
        return result

    def log_events(self, run_id: str, task_id: str) -> list[dict[str, Any]]:
        """The task's log as the UI gets it (the worker's and the trigger's records, merged)."""
        result = self.airflow.api(
            "GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/logs/1?full_content=true"
        )
        return [event if isinstance(event, dict) else {"event": event} for event in result.get("content") or []]

    def log_lines(self, run_id: str, task_id: str) -> list[str]:
        return [json.dumps(event) for event in self.log_events(run_id, task_id)]

    def deferred_sensor(self, run_id: str) -> str:
        self.airflow.wait_for(lambda: self.ti(run_id, "wait")["state"] == "deferred", 300, "the sensor to defer", 2)
        (batch,) = self.fake.state.batches.values()
        self.clock.advance(TIMINGS.validating + TIMINGS.in_progress / 2)  # half of the requests done
        self.airflow.wait_for(
            lambda: any("in_progress" in line and "done" in line for line in self.log_lines(run_id, "wait")),
            120,
            "the trigger to log progress",
            2,
        )
        page = self.page
        self.goto(f"/dags/{DAG_ID}/runs/{quote(run_id)}/tasks/wait")
        page.get_by_text("in_progress: 10/20 done").first.wait_for(timeout=120_000)
        self.shot("2-deferred-sensor-log")
        self.goto(f"/dags/{DAG_ID}/runs/{quote(run_id)}/tasks/wait/details")  # where Airflow 3.3 shows links
        link = page.get_by_role("link", name="OpenAI Batch")
        link.first.wait_for(timeout=120_000)
        href = link.first.get_attribute("href")
        expected = f"https://platform.openai.com/batches/{batch.id}"
        assert href == expected, f"the extra link points at {href!r}, expected {expected!r}"
        page.get_by_text("Deferred").first.wait_for()
        self.shot("2b-deferred-sensor-link")
        return batch.id

    # --- 3. the task log -----------------------------------------------------------------------------

    def task_log(self, run_id: str) -> None:
        print("3. the sensor's log")
        self.clock.advance(TIMINGS.in_progress + TIMINGS.finalizing + 1)
        self.airflow.wait_for(
            lambda: (
                self.airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}")["state"] in ("success", "failed")
            ),
            300,
            "the DAG run to end",
            2,
        )
        states = {
            ti["task_id"]: ti["state"]
            for ti in self.airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances")["task_instances"]
        }
        assert set(states.values()) == {"success"}, f"task states: {states}"
        lines = [line for task in ("upload", "create", "wait", "download") for line in self.log_lines(run_id, task)]
        noisy = [line for line in lines if REQUEST_LINE in line]
        assert not noisy, f"{len(noisy)} per-request HTTP lines in the task logs, e.g. {noisy[0][:200]}"
        fired = [
            str(e.get("result")) for e in self.log_events(run_id, "wait") if e.get("event") == "Trigger fired event"
        ]
        assert fired, "the sensor's log has no 'Trigger fired event' record"
        assert all(len(result) < MAX_EVENT_LINE for result in fired), f"a long trigger event line: {fired}"
        page = self.page
        self.goto(f"/dags/{DAG_ID}/runs/{quote(run_id)}/tasks/wait")
        page.get_by_text("completed: 20/20").first.wait_for(timeout=120_000)
        assert REQUEST_LINE not in page.inner_text("body")
        self.shot("3-task-log")

    # --- 4. the results ------------------------------------------------------------------------------

    def results(self, run_id: str) -> None:
        print("4. the results: XComs and the Asset")
        page = self.page
        xcom = {
            entry["key"]: entry
            for entry in self.airflow.api(
                "GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/download/xcomEntries"
            )["xcom_entries"]
        }
        # Every request of the example completes (20/20), so OpenAI writes no error file: ``error_uri`` has no key
        # of its own (a location is pushed only for a file that exists), ``output_uri`` does.
        assert {"output_uri", "return_value"} <= set(xcom), f"download XComs: {sorted(xcom)}"
        assert "error_uri" not in xcom, f"an error_uri XCom for a batch with no error file: {sorted(xcom)}"
        self.goto(f"/dags/{DAG_ID}/runs/{quote(run_id)}/tasks/download/xcom")
        page.get_by_text("output_uri").first.wait_for(timeout=120_000)
        page.get_by_text("output.jsonl").first.wait_for(timeout=120_000)
        self.shot("4-download-xcom")
        self.goto("/assets")
        page.get_by_text("example_openai_batch_results").first.wait_for(timeout=120_000)
        self.shot("5-assets")


_PLACEHOLDER_OVERFLOW_JS = """
() => {
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d");
  const cut = [];
  const inputs = document.querySelectorAll("[role=dialog] input[placeholder], [role=dialog] textarea[placeholder]");
  for (const input of inputs) {
    if (!input.placeholder || input.offsetParent === null) continue;
    const style = getComputedStyle(input);
    ctx.font = style.font;
    const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    if (ctx.measureText(input.placeholder).width > room) cut.push(input.placeholder);
  }
  return cut;
}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "ui-check", help="folder for the screenshots")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), *out.glob("failure.html")]:
        old.unlink()
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    clock = FakeClock()
    with FakeOpenAIServer(clock=clock, timings=TIMINGS) as fake:
        connection = {
            "conn_type": "openai_batch",
            "host": fake.base_url,
            "password": fake.api_key,
            "extra": {"batch_link": "openai"},
        }
        env = {
            "PYTHONPATH": str(ROOT),
            "OPENAI_BATCH_EXAMPLE_POLL_SECONDS": "2",
            "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(connection),
        }
        print("starting Airflow services on 127.0.0.1 ...")
        with AirflowServices(dags_folder=ROOT / "example_dags", extra_env=env) as airflow:
            print(f"  up in {time.monotonic() - started:.0f} s at {airflow.url} (AIRFLOW_HOME={airflow.home})")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
                )
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                # Generous: on a shared 2-core machine the first page load compiles and fetches a lot.
                page.set_default_timeout(120_000)
                page.set_default_navigation_timeout(180_000)
                check = Check(airflow, fake, clock, out, page)
                try:
                    check.connection_form()
                    run_id = check.trigger()
                    check.deferred_sensor(run_id)
                    check.task_log(run_id)
                    check.results(run_id)
                except Exception:
                    traceback.print_exc()
                    page.screenshot(path=str(out / "failure.png"), full_page=True)
                    (out / "failure.html").write_text(page.content())
                    print(f"FAILED: see {out / 'failure.png'} and {airflow.home} (service logs)", file=sys.stderr)
                    return 1
                finally:
                    browser.close()
    print(f"ui-check passed in {time.monotonic() - started:.0f} s; screenshots in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
