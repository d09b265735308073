"""
Real Airflow services on loopback for checks that need them (``make ui-check``): start, wait, stop by pid.

The smallest real deployment: LocalExecutor on SQLite, an api-server, scheduler, dag-processor and triggerer,
each its own process with one configuration passed through the environment. What it does follows the facts
measured on this kind of machine (shared/deployment-notes.md):

- ``serve_logs`` binds every interface and cannot be told otherwise, so the scheduler and triggerer run with
  ``--skip-serve-logs``; the api-server reads the task logs from the shared ``AIRFLOW_HOME`` instead.
- The Execution API's first request takes longer than the Task SDK's 5 s timeout: ``warm()`` calls
  ``/execution/health`` once before anything is triggered.
- LocalExecutor forks ``[core] parallelism`` workers at start: kept small.
- Stop order: scheduler first (its executor still talks to the api-server), then triggerer, dag-processor,
  api-server. Every pid is recorded when started and only those are stopped.

Usable on its own: ``with AirflowServices(dags_folder=..., extra_env={...}) as airflow: airflow.url``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Start order; stopped in ``STOP_ORDER``.
SERVICES = ("api-server", "dag-processor", "scheduler", "triggerer")
STOP_ORDER = ("scheduler", "triggerer", "dag-processor", "api-server")
#: Seconds a service gets to stop on SIGTERM before SIGKILL (triggerers were seen to take ~12 s).
STOP_GRACE = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class AirflowServices:
    """
    Airflow 3 services on 127.0.0.1 in a fresh ``AIRFLOW_HOME``; a context manager that always stops them.

    :param dags_folder: The DAG folder every service reads.
    :param extra_env: More environment for every service (connections, knobs of the DAGs).
    :param home: ``AIRFLOW_HOME`` (default: a new temporary folder, kept for its logs).
    """

    dags_folder: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    home: Path | None = None
    port: int = 0
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- configuration -----------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        assert self.home is not None
        from cryptography.fernet import Fernet

        return {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }

    def _command(self, name: str) -> list[str]:
        airflow = [sys.executable, "-m", "airflow"]
        if name == "api-server":
            return [*airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        if name in ("scheduler", "triggerer"):
            return [*airflow, name, "--skip-serve-logs"]
        return [*airflow, name]

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> AirflowServices:
        self.home = self.home or Path(tempfile.mkdtemp(prefix="airflow-services-"))
        self.port = self.port or free_port()
        env = self.environment()
        (self.home / "environment.json").write_text(json.dumps({k: v for k, v in env.items() if "AIRFLOW" in k}))
        migrate = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}")
        for name in SERVICES:
            log = self.home / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    self._command(name), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.services[name] = Service(name, process, log)
            (self.home / f"{name}.pid").write_text(str(process.pid))
            if name == "api-server":
                self.wait_for(lambda: self._get("/api/v2/monitor/health") is not None, timeout, "the api-server")
        self.warm()
        return self

    def warm(self) -> None:
        """The Execution API's first answer is slow (lazy init); pay it here, not in a task's first call."""
        self._get("/execution/health", timeout=60)

    def stop(self) -> None:
        """Stop what this object started, by pid and in order; SIGKILL whatever outlives the grace period."""
        for name in STOP_ORDER:
            service = self.services.get(name)
            if service is None or service.process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGTERM)
            try:
                service.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait(10)
        # Children of a service (LocalExecutor workers, the triggerer's runner) share its process group.
        for service in self.services.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service.process.pid, signal.SIGKILL)

    def __enter__(self) -> AirflowServices:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- talking to it -----------------------------------------------------------------------------

    def check_alive(self) -> None:
        for service in self.services.values():
            if service.process.poll() is not None:
                tail = service.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{service.name} exited ({service.process.returncode}):\n{tail}")

    def wait_for(self, condition: Any, timeout: float, what: str, interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
            time.sleep(interval)

    def _get(self, path: str, timeout: float = 10) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """The public REST API (``/api/v2``); SimpleAuthManager with all-admins needs no credentials."""
        request = urllib.request.Request(
            f"{self.url}/api/v2{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token()}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def token(self) -> str:
        with urllib.request.urlopen(f"{self.url}/auth/token", timeout=30) as response:
            return str(json.loads(response.read())["access_token"])


@contextlib.contextmanager
def running(dags_folder: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[AirflowServices]:
    with AirflowServices(dags_folder=dags_folder, extra_env=dict(extra_env or {})) as services:
        yield services
