"""Shared by the benchmarks: a fake server in its own process, memory readings, and the result table."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

API_KEY = "sk-bench-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_fake/stats", timeout=10) as answer:
            return dict(json.load(answer))

    def connection(self, conn_type: str = "openai_batch") -> str:
        return json.dumps({"conn_type": conn_type, "host": self.base_url, "password": API_KEY})


@contextlib.contextmanager
def fake_server(*args: str) -> Iterator[ServerProcess]:
    """The fake server in its own process, so its work never counts against what is measured here."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_openai_batch.testing",
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = ServerProcess(port, process)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.stats()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the fake server did not start") from None
            time.sleep(0.1)
    try:
        yield server
    finally:
        process.terminate()
        process.wait(10)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def children_rss_bytes() -> int:
    """The resident set size of this process's live child processes (those its main thread started; Linux)."""
    total = 0
    with contextlib.suppress(OSError):
        with open(f"/proc/self/task/{os.getpid()}/children") as listed:
            pids = listed.read().split()
        for pid in pids:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (so peak RSS is its own) and read the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


MB = 1024 * 1024


@dataclass
class Row:
    figure: str
    value: str
    goal: str
    anchor: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return "-" if self.met is None else ("met" if self.met else "MISSED")


def spread(values: list[float], fmt: str) -> str:
    """``median (lowest-highest)`` of a few runs, e.g. ``1.9 (1.8-2.1)``; one run is shown alone."""
    ordered = sorted(values)
    middle = fmt.format(statistics.median(ordered))
    if len(ordered) < 2:
        return middle
    return f"{middle} ({fmt.format(ordered[0])}-{fmt.format(ordered[-1])})"


def table(rows: list[Row]) -> str:
    headers = ("figure", "measured", "goal", "anchor (same run)", "")
    cells = [headers, *[(r.figure, r.value, r.goal, r.anchor, r.verdict) for r in rows]]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(headers))]
    line = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [line.format(*headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line.format(*c) for c in cells[1:]]
    return "\n".join(out)


class PeakRss:
    """
    ``with PeakRss() as peak: ...`` then ``peak.extra``: the most RSS grew over its start, sampled every 5 ms.
    ``children=True``: each sample adds the RSS of the process's live child processes (the measured code may start
    one to work beside it).
    """

    def __init__(self, every: float = 0.005, *, children: bool = False) -> None:
        self.every = every
        self.children = children
        self.baseline = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        return rss_bytes() + (children_rss_bytes() if self.children else 0)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.every)

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline
