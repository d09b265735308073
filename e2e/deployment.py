"""
A distributed Airflow 3.3 deployment on loopback, started and stopped by recorded pid.

PostgreSQL and Redis (Debian packages), ``db migrate``, an api-server (tasks reach the Execution API over HTTP),
a scheduler, a dag-processor, two triggerers and two Celery workers. Every service runs in its own process group
whose id is recorded in ``pids.json`` in the run folder, with its output in ``logs/<service>.log`` there; every
process carries ``E2E_RUN=<token>`` in its environment, so a last sweep can prove nothing of ours is left. A
safety net (atexit and SIGINT/SIGTERM/SIGHUP handlers) stops everything however the harness ends, short of a
kill -9 of the harness itself (then ``python -m e2e --cleanup RUN_FOLDER`` stops what ``pids.json`` lists).

The settings that matter for what survives what (see docs/production.md):
- ``[scheduler] task_instance_heartbeat_timeout`` (30 s here, 300 s by default): the only thing that notices a
  whole Celery worker killed; its tasks are retried after it.
- ``[triggerer] job_heartbeat_sec`` (3 s) and ``triggerer_health_check_threshold`` (20 s): how soon the other
  triggerer adopts the triggers of one that died.
- ``[triggerer] max_trigger_to_select_per_loop`` (5): small, so every triggerer holds some triggers.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKERS = ("worker-1", "worker-2")
TRIGGERERS = ("triggerer-1", "triggerer-2")
#: Stop order: the scheduler first (its executor still talks to the api-server), the databases last.
STOP_ORDER = ("scheduler", *WORKERS, *TRIGGERERS, "dag-processor", "api-server", "redis", "postgres")

SETTINGS: dict[str, str] = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    "AIRFLOW__CORE__PARALLELISM": "16",
    "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "e2e.hostname.service_name",
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "3",
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    # A whole worker killed: only the task-instance heartbeat notices (default 300 s).
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    # A triggerer killed: the other adopts its triggers once its heartbeat is older than the threshold.
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "3",
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "20",
    "AIRFLOW__TRIGGERER__MAX_TRIGGER_TO_SELECT_PER_LOOP": "5",
    "AIRFLOW__TRIGGERER__CAPACITY": "1000",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
    # The DAG files do not change during a run: parse each once, not every 30 s (CPU is what a 2-core box lacks).
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    "OPENAI_BATCH_EXAMPLE_POLL_SECONDS": "2",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
        except Exception as error:  # a service still starting: keep polling until the deadline
            value, last_error = None, error
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f" ({last_error})" if last_error else ""
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def processes_of_run(token: str, sessions: Iterable[int] = ()) -> list[int]:
    """
    Every live process this run started, and their children: in one of the services' sessions (each service
    starts one), or carrying ``E2E_RUN=token`` in its environment (a process that left its session). Celery and
    the task supervisor rename their processes over the memory /proc/PID/environ shows, hence both.
    """
    sessions = set(sessions)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[0] == "Z":
            continue
        if int(stat[3]) in sessions or _environ_of(int(entry.name)).get("E2E_RUN") == token:
            found.append(int(entry.name))
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def parent_of(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else int(stat[1])


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by ``pids`` (IPv4 and IPv6)."""
    by_inode: dict[str, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A":  # LISTEN
                    continue
                address, port = cols[1].split(":")
                by_inode[cols[9]] = (_decode_address(address, width), int(port, 16))
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inode = target[8:-1]
                        if inode in by_inode:
                            found.append((pid, *by_inode[inode]))
    return found


def _decode_address(hex_address: str, width: int) -> str:
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_address)[::-1])
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0


class Deployment:
    """
    ``with Deployment(run_dir, connections) as d:`` starts everything and stops everything on the way out.

    ``connections`` maps Airflow connection ids to connection JSON (``AIRFLOW_CONN_...``). ``kill(name)`` sends
    SIGKILL to a service's whole process group, ``kill_pid`` to one process; ``restart(name)`` starts it again.
    """

    def __init__(
        self,
        run_dir: Path,
        connections: Mapping[str, str],
        *,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pid_file = run_dir / "pids.json"
        self.token = secrets.token_hex(8)
        self.python = python
        self.airflow = str(Path(python).parent / "airflow")
        self.home = run_dir / "airflow_home"
        self.home.mkdir(exist_ok=True)
        self.dags = run_dir / "dags"
        self.dags.mkdir(exist_ok=True)
        for link, target in (("examples", REPO / "example_dags"), ("e2e", REPO / "e2e" / "dags")):
            if not (self.dags / link).exists():
                (self.dags / link).symlink_to(target, target_is_directory=True)
        # Only the DAGs the scenarios run (the other examples would cost parsing time on a small machine).
        (self.dags / ".airflowignore").write_text(
            "examples/example_openai_batch_embeddings.py\n"
            "examples/example_openai_batch_resubmit.py\n"
            "examples/example_openai_batch_taskflow.py\n"
            "examples/_settings.py\n"
            "examples/__init__.py\n"
        )
        self.pg_port, self.redis_port, self.api_port = free_port(), free_port(), free_port()
        self.pg_dir = Path(tempfile.mkdtemp(prefix="e2e-pg-"))
        self.db_url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/airflow"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.services: dict[str, Service] = {}
        self._stopping = False
        #: Every session a service was started in (a restarted service gets a new one).
        self._sessions: set[int] = set()
        self._safety_net_installed = False
        from cryptography.fernet import Fernet

        self.fernet_key = Fernet.generate_key().decode()
        self.env = {
            **os.environ,
            **SETTINGS,
            **{f"AIRFLOW_CONN_{conn_id.upper()}": value for conn_id, value in connections.items()},
            **(extra_env or {}),
            "E2E_RUN": self.token,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.db_url}",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
            self.env.pop(name, None)

    # --- services ------------------------------------------------------------------------------

    def _define(self) -> None:
        root = os.geteuid() == 0
        postgres_bin = _postgres_bin("postgres")
        self.services["postgres"] = Service(
            "postgres",
            [
                str(postgres_bin),
                "-D",
                str(self.pg_dir / "data"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.pg_port),
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=300",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            user="postgres" if root else None,
            stop_signal=signal.SIGINT,  # fast shutdown; SIGTERM waits for every client to leave
        )
        self.services["redis"] = Service(
            "redis",
            [
                shutil.which("redis-server") or "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
        )
        af = self.airflow
        self.services["api-server"] = Service(
            "api-server", [af, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        )
        self.services["scheduler"] = Service("scheduler", [af, "scheduler", "--skip-serve-logs"])
        self.services["dag-processor"] = Service("dag-processor", [af, "dag-processor"])
        for name in TRIGGERERS:
            self.services[name] = Service(name, [af, "triggerer", "--skip-serve-logs"])
        for name in WORKERS:
            self.services[name] = Service(
                name,
                [af, "celery", "worker", "--skip-serve-logs", "-H", f"{name}@localhost", "--without-mingle"],
            )
        for service in self.services.values():
            service.env["E2E_SERVICE"] = service.name

    def _spawn(self, service: Service) -> None:
        log = (self.logs / f"{service.name}.log").open("ab")
        log.write(f"\n=== e2e: starting {service.name} at {time.strftime('%H:%M:%S')} ===\n".encode())
        log.flush()
        service.process = subprocess.Popen(
            service.argv,
            env={**self.env, **service.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.run_dir),
            start_new_session=True,  # its own process group: stopping it stops its children too
            user=service.user,
        )
        log.close()
        service.starts += 1
        self._sessions.add(service.process.pid)
        self._record()

    def _record(self) -> None:
        pids = {name: s.process.pid for name, s in self.services.items() if s.process and s.process.poll() is None}
        record = {"token": self.token, "pg_dir": str(self.pg_dir), "pids": pids, "sessions": sorted(self._sessions)}
        self.pid_file.write_text(json.dumps(record, indent=1))

    def pid(self, name: str) -> int:
        process = self.services[name].process
        assert process is not None, f"{name} is not running"
        return process.pid

    def _run(self, *args: str, timeout: float = 600) -> str:
        completed = subprocess.run(
            [self.airflow, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.run_dir),
            check=False,
        )
        (self.logs / "cli.log").open("a").write(f"$ airflow {' '.join(args)}\n{completed.stdout}\n{completed.stderr}\n")
        if completed.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed: {completed.stderr[-2000:]}")
        return completed.stdout

    def start(self) -> None:
        self._install_safety_net()
        self._define()
        root = os.geteuid() == 0
        initdb = _postgres_bin("initdb")
        if root:
            shutil.chown(self.pg_dir, "postgres", "postgres")
        subprocess.run(
            [initdb, "-D", str(self.pg_dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            user="postgres" if root else None,
            env={"E2E_RUN": self.token, "PATH": os.environ.get("PATH", "")},
        )
        self._spawn(self.services["postgres"])
        self._spawn(self.services["redis"])
        wait_until("PostgreSQL", self._create_database, 60)
        wait_until("Redis", lambda: self._tcp_open(self.redis_port), 30)
        self._run("db", "migrate")
        self._spawn(self.services["api-server"])
        wait_until("the api-server", lambda: self._http_ok("/api/v2/monitor/health"), 300)
        # The first Execution API request initialises lazily (~6.5 s here) and the Task SDK gives up after 5 s.
        wait_until("the Execution API", lambda: self._http_ok("/execution/health"), 120)
        for name in ("dag-processor", *TRIGGERERS, *WORKERS):
            self._spawn(self.services[name])
        self._spawn(self.services["scheduler"])
        for name in WORKERS:
            self.wait_for_log(name, "ready.", 300)
        self.wait_for_jobs(300)

    def _create_database(self) -> bool:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = 'airflow'")
            if cur.fetchone() is None:
                cur.execute("CREATE DATABASE airflow")
        conn.close()
        return True

    @staticmethod
    def _tcp_open(port: int) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _http_ok(self, path: str) -> bool:
        with urllib.request.urlopen(self.api_url + path, timeout=30) as response:
            return bool(response.status == 200)

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        path = self.logs / f"{name}.log"
        service = self.services[name]
        start_marker = f"=== e2e: starting {name}"

        def seen() -> bool:
            if service.process is None or service.process.poll() is not None:
                raise RuntimeError(f"{name} exited; see {path}")
            content = path.read_text(errors="replace")
            return text in content[content.rfind(start_marker) :]

        wait_until(f"{name} to log {text!r}", seen, timeout)

    def wait_for_jobs(self, timeout: float) -> None:
        """Scheduler, dag-processor and both triggerers heartbeating in the metadata database."""
        wanted = {"SchedulerJob": {"scheduler"}, "DagProcessorJob": {"dag-processor"}, "TriggererJob": set(TRIGGERERS)}

        def alive() -> bool:
            rows = self.query(
                "SELECT job_type, hostname FROM job WHERE state = 'running' "
                "AND latest_heartbeat > now() - interval '30 seconds'"
            )
            have: dict[str, set[str]] = {}
            for job_type, hostname in rows:
                have.setdefault(job_type, set()).add(hostname)
            return all(names <= have.get(kind, set()) for kind, names in wanted.items())

        wait_until("scheduler, dag-processor and triggerers to heartbeat", alive, timeout)

    # --- the metadata database and the REST API ----------------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="airflow")
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params or None)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        token = json.loads(self._request("GET", "/auth/token", None, None))["access_token"]
        return json.loads(self._request(method, path, body, token))

    def _request(self, method: str, path: str, body: Any, token: str | None) -> str:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.api_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: {error.code} {error.read().decode()[:500]}") from error

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        """Start a DAG run once the dag-processor has parsed the DAG; returns its run id."""
        wait_until(f"DAG {dag_id} to be parsed", lambda: self.query("SELECT 1 FROM dag WHERE dag_id = %s", dag_id), 300)
        run = self.api(
            "POST",
            f"/api/v2/dags/{dag_id}/dagRuns",
            {"logical_date": None, "conf": dict(conf or {})},
        )
        return str(run["dag_run_id"])

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        def ended() -> str | None:
            rows = self.query("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", dag_id, run_id)
            return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

        return str(wait_until(f"run {dag_id}/{run_id} to end", ended, timeout, interval=1.0))

    # --- killing and restarting ----------------------------------------------------------------

    def kill(self, name: str) -> list[int]:
        """
        SIGKILL every process of a service, as if the machine it ran on were gone; returns the pids killed.
        That is its session, not its process group: the Task SDK puts each task process in a group of its own.
        """
        service = self.services[name]
        assert service.process is not None
        session = service.process.pid
        members = [pid for pid in self.our_processes() if (_stat(pid) or ["", "", "", ""])[3] == str(session)]
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        service.process.wait(timeout=30)
        self._record()
        return members

    def session_of(self, name: str) -> list[int]:
        process = self.services[name].process
        if process is None:
            return []
        return [pid for pid in self.our_processes() if (_stat(pid) or ["", "", "", ""])[3] == str(process.pid)]

    def dead_services(self) -> list[str]:
        return [name for name, s in self.services.items() if s.process is not None and s.process.poll() is not None]

    @staticmethod
    def kill_pid(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def restart(self, name: str) -> None:
        service = self.services[name]
        if service.process is not None and service.process.poll() is None:
            self._stop_one(service)
        self._spawn(service)

    # --- stopping ------------------------------------------------------------------------------

    def _stop_one(self, service: Service, timeout: float = 60) -> None:
        process = service.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, service.stop_signal)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        # Children that outlived their leader (same process group) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        self._record()

    def stop(self) -> list[int]:
        """Stop every service in order; returns pids of this run still alive afterwards (after a last SIGKILL)."""
        if self._stopping:
            return []
        self._stopping = True
        for name in STOP_ORDER:
            if name in self.services:
                self._stop_one(self.services[name])
        leftovers = self.our_processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._record()
        shutil.rmtree(self.pg_dir, ignore_errors=True)
        return leftovers

    def _install_safety_net(self) -> None:
        if self._safety_net_installed:
            return
        self._safety_net_installed = True
        atexit.register(self.stop)

        def on_signal(signum: int, frame: Any) -> None:
            self.stop()
            raise SystemExit(128 + signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def our_processes(self) -> list[int]:
        return processes_of_run(self.token, self._sessions)


def _postgres_bin(name: str) -> str:
    """Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/<version>/bin."""
    installed = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if installed:
        return str(installed[-1])
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: apt-get install -y postgresql")
    return found


def cleanup(run_dir: Path) -> list[int]:
    """Stop what a harness that died without its safety net left behind (``pids.json``, checked against /proc)."""
    record = json.loads((run_dir / "pids.json").read_text())
    stopped = []
    for pid in processes_of_run(record["token"], record.get("sessions", [])):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            stopped.append(pid)
    shutil.rmtree(record.get("pg_dir", ""), ignore_errors=True)
    return stopped


def iter_log_lines(path: Path, *needles: str) -> Iterator[str]:
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        if any(needle in line for needle in needles):
            yield line
