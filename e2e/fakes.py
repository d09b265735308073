"""
One FakeOpenAIServer per scenario, held in the harness process, with the few controls a scenario needs.

The fake models OpenAI; these controls model the conditions around it that a scenario sets up: batches that stay
in progress until the harness has done its damage (``hold_batches`` / ``release_batches``), a create call that
is slow to reach OpenAI (``hold_next_create``: the request waits before the API acts on it, then succeeds), a
slow network under a file download (``download_delay``), and a moment frozen for a kill (``pause_at``: the n-th
call of a route waits, before the API acts on it or with its answer held, until the harness has killed the worker
that made it). They wrap the fake's ASGI app; the fake is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_provider_openai_batch.idempotency import IDEMPOTENCY_METADATA_KEY
from airflow_provider_openai_batch.testing import FakeOpenAIServer, Timings

#: Longest a held create waits for its release before going through anyway.
HOLD_LIMIT = 600.0

#: The fake's route names (as ``FakeOpenAIServer.calls`` counts them) of the calls a pause can stop at.
_ROUTES = (
    ("POST", re.compile(r"/files$"), "files.create"),
    ("GET", re.compile(r"/files/[^/]+/content$"), "files.content"),
    ("POST", re.compile(r"/batches$"), "batches.create"),
    ("GET", re.compile(r"/batches$"), "batches.list"),
    ("GET", re.compile(r"/batches/[^/]+$"), "batches.retrieve"),
)


def route_of(method: str, path: str) -> str | None:
    return next((name for m, pattern, name in _ROUTES if m == method and pattern.search(path)), None)


@dataclass(frozen=True)
class Pause:
    """
    Stop at the ``number``-th call of ``route`` (counted from ``pause_at``; only calls from the SDK client class
    ``client``, e.g. ``"OpenAI"`` for a worker's, when given). ``acted=False``: the call waits before the API acts
    on it and, once released, is answered 503 without effect (its caller is dead by then: the worker died before
    its request reached OpenAI). ``acted=True``: the API acts, and its answer waits (the worker died before the
    answer reached it).
    """

    route: str
    number: int
    acted: bool
    client: str | None = None


class Controls:
    """ASGI wrapper around the fake's app: holds creates and slows downloads on request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._creates_to_hold = 0
        self.create_held = threading.Event()
        self.release_create = threading.Event()
        self.download_delay = 0.0
        self.downloads_started = 0
        self._pause: Pause | None = None
        self._pause_seen = 0
        self.paused = threading.Event()
        self.resume = threading.Event()

    def hold_next_create(self) -> None:
        with self._lock:
            self._creates_to_hold += 1

    def _take_hold(self) -> bool:
        with self._lock:
            if self._creates_to_hold:
                self._creates_to_hold -= 1
                return True
            return False

    def pause_at(self, pause: Pause) -> None:
        with self._lock:
            self._pause, self._pause_seen = pause, 0
            self.paused.clear()
            self.resume.clear()

    def _take_pause(self, scope: Scope) -> Pause | None:
        pause = self._pause
        if pause is None or route_of(scope["method"], scope["path"]) != pause.route:
            return None
        if pause.client is not None:
            agent = dict(scope["headers"]).get(b"user-agent", b"").decode(errors="replace")
            if agent.split("/", 1)[0] != pause.client:
                return None
        with self._lock:
            self._pause_seen += 1
            if self._pause_seen != pause.number:
                return None
            self._pause = None
            return pause

    async def _paused(self, pause: Pause, scope: Scope, receive: Receive, send: Send) -> None:
        held: list[Message] = []
        if pause.acted:

            async def keep(message: Message) -> None:
                held.append(message)

            await self.app(scope, receive, keep)
        self.paused.set()
        await asyncio.to_thread(self.resume.wait, HOLD_LIMIT)
        with contextlib.suppress(Exception):  # the caller was killed meanwhile: nobody reads the answer
            if pause.acted:
                for message in held:
                    await send(message)
            else:
                gone = JSONResponse({"error": {"message": "The caller went away (e2e pause)."}}, status_code=503)
                await gone(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            pause = self._take_pause(scope)
            if pause is not None:
                await self._paused(pause, scope, receive, send)
                return
            if method == "POST" and path.endswith("/batches") and self._take_hold():
                self.create_held.set()
                await asyncio.to_thread(self.release_create.wait, HOLD_LIMIT)
            if path.endswith("/content") and self.download_delay:
                self.downloads_started += 1
                delay = self.download_delay

                async def slow_send(message: Message) -> None:
                    if message["type"] == "http.response.body" and message.get("body"):
                        await asyncio.sleep(delay)
                    await send(message)

                await self.app(scope, receive, slow_send)
                return
        await self.app(scope, receive, send)


class ScenarioServer:
    """A fake OpenAI for one scenario: its connection JSON, its controls, and what it holds."""

    def __init__(self, name: str, conn_id: str, **options: Any) -> None:
        self.name = name
        self.conn_id = conn_id
        timings = Timings(validating=0.5, in_progress=3.0, finalizing=0.5, cancelling=0.5)
        self.server = FakeOpenAIServer(timings=timings, **options)
        self.controls = Controls(self.server.app)
        self.server.app = self.controls  # type: ignore[assignment]

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def connection(self) -> str:
        return json.dumps(
            {
                "conn_type": "openai_batch",
                "host": self.server.base_url,
                "password": self.server.api_key,
                "extra": {"max_retries": 3, "timeout": 600},
            }
        )

    def hold_batches(self) -> None:
        """Batches stay in progress until ``release_batches`` (the fake computes status from these timings)."""
        self.server.state.timings.in_progress = 1e7

    def release_batches(self) -> None:
        self.server.state.timings.in_progress = 1.0

    def batches(self) -> list[dict[str, Any]]:
        """Every batch at this fake: id, key, status, created_at, cancel time."""
        state = self.server.state
        return [
            {
                "id": batch.id,
                "key": (batch.metadata or {}).get(IDEMPOTENCY_METADATA_KEY),
                "status": state.status(batch),
                "created_at": int(batch.created_at),  # as the API shows it: whole seconds
                "cancel_requested_at": batch.cancel_requested_at,
            }
            for batch in list(state.batches.values())
        ]

    def uploads(self) -> dict[str, str]:
        """Every batch input file at this fake: id → file name."""
        return {f.id: f.filename for f in self.server.state.list_files("batch")}

    def batches_per_key(self) -> Counter[str]:
        return Counter(str(b["key"]) for b in self.batches())

    def key_of(self, batch_id: str) -> str | None:
        batch = self.server.state.batches.get(batch_id)
        return None if batch is None else (batch.metadata or {}).get(IDEMPOTENCY_METADATA_KEY)

    def trigger_polls(self) -> int:
        """Batch polls made by the async client, i.e. by triggers running in a triggerer."""
        return self.server.count_from("batches.retrieve", "AsyncOpenAI")
