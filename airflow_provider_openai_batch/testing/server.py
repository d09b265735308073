"""
FakeOpenAIServer: OpenAI's Files and Batches API over real HTTP on 127.0.0.1 (Starlette + uvicorn).

Tests, the demo and users' own DAG tests point the real ``openai`` SDK at it, so every byte goes through the
same client, retries and parsing as in production; only the far end is ours. It also answers on Azure's
classic paths (``/openai/...?api-version=``, ``api-key`` header).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import shutil
import socket
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from airflow_provider_openai_batch.endpoints import (
    MAX_EXPIRES_AFTER_SECONDS,
    MIN_EXPIRES_AFTER_SECONDS,
    batch_endpoints,
)
from airflow_provider_openai_batch.testing.faults import Fault, FaultPlan
from airflow_provider_openai_batch.testing.state import (
    QUEUE_ERROR_CODE,
    FakeClock,
    FakeState,
    QueueLimitExceeded,
    QueueRefusalMode,
    Timings,
)

Handler = Callable[[Request], Awaitable[Response]]
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
_CHUNK = 1 << 20
#: ``headers_seen`` keeps this many calls per route.
HEADERS_KEPT = 50
#: The only headers ``headers_seen`` keeps as sent: what the SDK and the transport say about the request itself,
#: and the organization and project ids. Every other value (``authorization``, Azure's ``api-key``, a gateway's
#: ``ocp-apim-subscription-key``, and any custom header, whatever its name: a gateway may take its key in any of
#: them) is kept only as ``redacted_header``.
_PLAIN_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "connection",
        "content-length",
        "content-type",
        "host",
        "openai-organization",
        "openai-project",
        "user-agent",
    }
)
_PLAIN_HEADER_PREFIXES = ("x-stainless-",)
#: ``redacted_header`` shows the last 4 characters only of values at least this long (as a dashboard shows a key).
_TAIL_SHOWN_FROM = 16


def redacted_header(value: str) -> str:
    """
    How ``headers_seen`` keeps a header that could be a credential: a short hash, and the last 4 characters of a
    long value, so a test can tell which value was sent (compare with ``redacted_header(expected)``) without the
    instrumentation holding it.
    """
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    tail = f"…{value[-4:]} " if len(value) >= _TAIL_SHOWN_FROM else ""
    return f"<redacted {tail}sha256:{digest}>"


def _plain(name: str) -> bool:
    lowered = name.lower()
    return lowered in _PLAIN_HEADERS or lowered.startswith(_PLAIN_HEADER_PREFIXES)


def _seen(headers: Any) -> dict[str, str]:
    return {name: value if _plain(name) else redacted_header(value) for name, value in headers.items()}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
    )


class _BrokenResponse(Response):
    """Sends the status line and a Content-Length, then part of the body (or none) and closes the connection."""

    def __init__(self, body: bytes, fraction: float) -> None:
        super().__init__(content=body, media_type="application/json")
        self.cut = int(len(body) * fraction)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self.cut:
            await send({"type": "http.response.body", "body": self.body[: self.cut], "more_body": True})
        raise ConnectionAbortedError("fault injected: connection dropped")


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    start = 0
    if after:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    data = items[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(items),
    }


class FakeOpenAIServer:
    """
    An embedded OpenAI Files + Batches API.

    ``with FakeOpenAIServer() as srv:`` then give the SDK ``base_url=srv.base_url, api_key=srv.api_key``.
    ``srv.faults`` injects failures, ``srv.calls`` counts requests per route (``"batches.create"``, …),
    ``srv.state`` holds the files and batches, and ``srv.clock`` (a ``FakeClock`` if you pass one) drives
    the status machine. A request whose body has ``"fake_error": {...}`` goes to the error file; batch
    metadata ``{"fake_scenario": "expire" | "fail" | "stall"}`` (or ``scenario=`` for every batch) picks
    the batch's fate. ``azure_quirks=True`` answers as Azure OpenAI does: empty-string file ids instead of
    null, null request counts while validating, and a zero-byte error file when nothing failed.
    ``compatible_quirks=True`` answers as some OpenAI-compatible servers do: result bodies as JSON strings,
    errors with a ``type`` and no ``code``, a zero-byte error file. ``compress_content=True`` gzips file
    downloads with the compressed Content-Length, as a compressing proxy in front of any server does.

    The account: ``queue_limits={"gpt-4o-mini": 2_000_000}`` limits the tokens a model's batches may hold enqueued
    (``request_queue_limits`` the requests, as for embeddings models). A batch that does not fit fails as its
    validation ends with ``token_limit_exceeded``, as OpenAI's do; with ``queue_refusal="at_create"`` (the default
    with ``azure_quirks``) ``batches.create`` answers 400 instead, as Azure's fail-fast does. ``srv.state`` tells
    ``peak_enqueued(model)``, ``enqueued(model)``, ``refusals()`` and ``queue_refusals``.
    Every behaviour and its source: ``CONTRACT.md`` beside this module.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "sk-fake-test-key",
        port: int = 0,
        host: str = "127.0.0.1",
        clock: FakeClock | Callable[[], float] | None = None,
        timings: Timings | None = None,
        latency: float = 0.0,
        scenario: str = "complete",
        allowed_endpoints: tuple[str, ...] | None = batch_endpoints(),
        completion_windows: tuple[str, ...] | None = ("24h",),
        storage_dir: str | os.PathLike[str] | None = None,
        page_limit_cap: int | None = None,
        azure_quirks: bool = False,
        compatible_quirks: bool = False,
        compress_content: bool = False,
        list_lag: float = 0.0,
        queue_limits: dict[str, int] | None = None,
        request_queue_limits: dict[str, int] | None = None,
        queue_refusal: QueueRefusalMode | None = None,
        count_output_cap: bool = True,
    ) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.clock = clock or time.time
        self.latency = latency
        self.page_limit_cap = page_limit_cap
        self.compress_content = compress_content
        #: Seconds (real time) a new batch stays out of ``GET /batches`` after its create answered: OpenAI does not
        #: say a new batch is listed at once (CONTRACT.md L13), so tests can make the listing lag.
        self.list_lag = list_lag
        self._listed_after: dict[str, float] = {}
        self.state = FakeState(
            clock=self.clock,
            timings=timings,
            storage_dir=storage_dir,
            allowed_endpoints=allowed_endpoints,
            completion_windows=completion_windows,
            scenario=scenario,
            azure_quirks=azure_quirks,
            compatible_quirks=compatible_quirks,
            queue_limits=queue_limits,
            request_queue_limits=request_queue_limits,
            queue_refusal=queue_refusal,
            count_output_cap=count_output_cap,
        )
        self.faults = FaultPlan()
        self.calls: Counter[str] = Counter()
        #: Calls per (route, SDK client class), e.g. ``("batches.retrieve", "AsyncOpenAI")``: shows which
        #: calls came from a trigger (async client) and which from a worker (sync client).
        self.clients: Counter[tuple[str, str]] = Counter()
        #: The headers of the last calls of each route (test instrumentation, not OpenAI behaviour): shows what
        #: a client sent, e.g. that a trigger's every poll carries the organization, project and custom headers.
        #: Every value but a few harmless ones (``_PLAIN_HEADERS``) is kept only as ``redacted_header``: a test run's
        #: output must not hold a key either.
        self.headers_seen: defaultdict[str, deque[dict[str, str]]] = defaultdict(lambda: deque(maxlen=HEADERS_KEPT))
        self._calls_lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def azure_v1_base_url(self) -> str:
        """Azure's v1 endpoint (``https://RESOURCE.openai.azure.com/openai/v1``), used with the plain client."""
        return f"http://{self.host}:{self.port}/openai/v1"

    @property
    def azure_endpoint(self) -> str:
        """Azure-style endpoint; the SDK's ``AzureOpenAI(azure_endpoint=...)`` appends ``/openai``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeOpenAIServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="critical",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            backlog=4096,
        )
        self._server = uvicorn.Server(config)
        server = self._server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-openai")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("FakeOpenAIServer did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None
        self.state.close()

    def serve_forever(self) -> None:
        """Run in the foreground until interrupted (``python -m airflow_provider_openai_batch.testing``)."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests look at ------------------------------------------------------------------

    def count(self, route: str) -> int:
        with self._calls_lock:
            return self.calls[route]

    @property
    def batches_created(self) -> int:
        """Batches that exist on the server (what a user would be billed for)."""
        return len(self.state.batches)

    def count_from(self, route: str, client: str) -> int:
        """Calls of ``route`` made by an SDK client class (``"OpenAI"``, ``"AsyncOpenAI"``, ``"AzureOpenAI"``...)."""
        with self._calls_lock:
            return self.clients[(route, client)]

    def script_batches(self, *scenarios: str) -> None:
        """The next batches created take these fates in order: ``"expire"``, ``"fail"``, ``"stall"``, ``"complete"``."""
        with self.state._lock:
            self.state.scripted_scenarios.extend(scenarios)

    def reset_counters(self) -> None:
        with self._calls_lock:
            self.calls.clear()
            self.clients.clear()
            self.headers_seen.clear()

    # --- the app -----------------------------------------------------------------------------

    def _build_app(self) -> Starlette:
        routes_spec: list[tuple[str, str, str, Handler]] = [
            ("/files", "POST", "files.create", self._files_create),
            ("/files", "GET", "files.list", self._files_list),
            ("/files/{file_id}", "GET", "files.retrieve", self._files_retrieve),
            ("/files/{file_id}", "DELETE", "files.delete", self._files_delete),
            ("/files/{file_id}/content", "GET", "files.content", self._files_content),
            ("/batches", "POST", "batches.create", self._batches_create),
            ("/batches", "GET", "batches.list", self._batches_list),
            ("/batches/{batch_id}", "GET", "batches.retrieve", self._batches_retrieve),
            ("/batches/{batch_id}/cancel", "POST", "batches.cancel", self._batches_cancel),
        ]
        routes: list[Route] = [Route("/_fake/stats", self._stats, methods=["GET"])]
        # OpenAI's paths, Azure's v1 endpoint (plain client) and Azure's classic one (api-version required).
        for prefix, azure in (("/v1", False), ("/openai/v1", False), ("/openai", True)):
            for path, method, name, handler in routes_spec:
                routes.append(Route(prefix + path, self._wrap(name, handler, azure), methods=[method]))
        return Starlette(routes=routes)

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        bearer = request.headers.get("authorization", "")
        return bearer == f"Bearer {self.api_key}" or request.headers.get("api-key") == self.api_key

    def _wrap(self, name: str, handler: Handler, azure: bool) -> Handler:
        async def endpoint(request: Request) -> Response:
            with self.state.gate.request():  # the fake's background work gives way meanwhile
                return await answer(request)

        async def answer(request: Request) -> Response:
            with self._calls_lock:
                self.calls[name] += 1
                self.clients[(name, request.headers.get("user-agent", "").split("/", 1)[0])] += 1
                self.headers_seen[name].append(_seen(request.headers))
            if self.latency:
                await asyncio.sleep(self.latency)
            if not self._authorized(request):
                return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
            if azure and not request.query_params.get("api-version"):
                return error_response(404, "Resource not found (Azure requires the api-version query parameter).")
            fault = self.faults.next_fault(name)
            if fault is not None and fault.kind not in ("drop_after", "truncate"):
                response = await self._fault_response(fault)
            else:
                response = await handler(request)
            response.headers["x-request-id"] = f"req_fake_{os.urandom(8).hex()}"
            if fault is not None and fault.kind not in ("drop_after", "truncate"):
                return response
            if fault is not None:
                return self._broken(response, fault)
            return response

        return endpoint

    async def _fault_response(self, fault: Fault) -> Response:
        if fault.kind == "429":
            response = error_response(429, "Rate limit reached (fault injected).", code="rate_limit_exceeded")
            response.headers["retry-after-ms"] = str(int(fault.retry_after * 1000))
            response.headers["retry-after"] = str(max(1, round(fault.retry_after)))
            return response
        if fault.kind.isdigit():
            return error_response(int(fault.kind), f"HTTP {fault.kind} (fault injected).")
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay)
            return error_response(504, "Gateway timeout after a slow answer (fault injected).")
        return _BrokenResponse(b'{"error": "dropped"}', 0.0)

    def _broken(self, response: Response, fault: Fault) -> Response:
        if isinstance(response, StreamingResponse):
            return self._truncated_stream(response)
        return _BrokenResponse(bytes(response.body), 0.5 if fault.kind == "truncate" else 0.0)

    @staticmethod
    def _truncated_stream(response: StreamingResponse) -> StreamingResponse:
        total = int(response.headers.get("content-length", "0"))
        source = response.body_iterator

        async def half() -> AsyncIterator[bytes]:
            sent = 0
            async for chunk in source:
                chunk_bytes = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                if sent + len(chunk_bytes) >= total // 2:
                    yield chunk_bytes[: max(0, total // 2 - sent)]
                    raise ConnectionAbortedError("fault injected: stream truncated")
                sent += len(chunk_bytes)
                yield chunk_bytes

        return StreamingResponse(half(), headers={"content-length": str(total)}, media_type=response.media_type)

    def _limit(self, request: Request, default: int, maximum: int) -> int:
        limit = int(request.query_params.get("limit", default))
        limit = max(1, min(limit, maximum))
        if self.page_limit_cap:
            limit = min(limit, self.page_limit_cap)
        return limit

    async def _stats(self, request: Request) -> Response:
        """Call counters for a server in another process (``python -m ...testing``), e.g. for benchmarks."""
        with self._calls_lock:
            calls = dict(self.calls)
        stats: dict[str, Any] = {"calls": calls, "batches": len(self.state.batches), "files": len(self.state.files)}
        if self.state.models_account:
            stats["queue_refusals"] = self.state.refusals()
            models = {batch.model for batch in self.state.batches.values() if batch.model}
            stats["peak_enqueued"] = {model: self.state.peak_enqueued(model) for model in sorted(models)}
        return JSONResponse(stats)

    # --- files -------------------------------------------------------------------------------

    async def _files_create(self, request: Request) -> Response:
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        purpose = str(form.get("purpose") or "")
        if upload is None or isinstance(upload, str):
            return error_response(400, "Missing required parameter: 'file'.", param="file")
        if purpose not in (
            "batch",
            "batch_output",
            "fine-tune",
            "assistants",
            "vision",
            "user_data",
            "evals",
        ):
            return error_response(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
        seconds = form.get("expires_after[seconds]")
        problem = _expiry_problem(seconds, "expires_after")
        if problem:
            return error_response(400, problem, param="expires_after.seconds")
        filename = upload.filename or "upload"
        source = upload.file
        size = source.seek(0, 2)
        source.seek(0)
        if purpose == "batch" and size > MAX_BATCH_FILE_BYTES:
            return error_response(400, f"File is too large ({size} bytes); the limit is 200 MB.", param="file")

        def write(out: Any) -> None:
            shutil.copyfileobj(source, out, _CHUNK)

        stored = await run_in_threadpool(
            self.state.add_file, filename, purpose, write, int(str(seconds)) if seconds else None
        )
        await upload.close()
        return JSONResponse(stored.to_json())

    async def _files_list(self, request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        order = request.query_params.get("order", "desc")
        files = self.state.list_files(purpose)
        # Newest first (or oldest with order=asc); objects made in the same second keep the order they were made in.
        files = sorted(files, key=lambda f: f.created_at) if order != "desc" else _newest_first(files)
        limit = self._limit(request, 10_000, 10_000)
        return JSONResponse(_page([f.to_json() for f in files], request.query_params.get("after"), limit))

    async def _files_retrieve(self, request: Request) -> Response:
        stored = self.state.files.get(request.path_params["file_id"])
        if stored is None:
            return error_response(404, f"No such File object: {request.path_params['file_id']}", param="id")
        return JSONResponse(stored.to_json())

    async def _files_delete(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not self.state.delete_file(file_id):
            return error_response(404, f"No such File object: {file_id}", param="id")
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def _files_content(self, request: Request) -> Response:
        stored = self.state.files.get(request.path_params["file_id"])
        if stored is None:
            return error_response(404, f"No such File object: {request.path_params['file_id']}", param="id")
        path: Path = stored.path
        if self.compress_content and "gzip" in request.headers.get("accept-encoding", ""):
            # A compressing proxy: the whole body gzipped, Content-Length counting the compressed bytes.
            packed = await run_in_threadpool(lambda: gzip.compress(path.read_bytes(), compresslevel=1))
            return Response(
                packed,
                media_type="application/octet-stream",
                headers={"content-encoding": "gzip", "content-length": str(len(packed))},
            )

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as handle:
                while chunk := await run_in_threadpool(handle.read, _CHUNK):
                    yield chunk

        return StreamingResponse(
            chunks(), media_type="application/octet-stream", headers={"content-length": str(stored.bytes)}
        )

    # --- batches -----------------------------------------------------------------------------

    async def _batches_create(self, request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            return error_response(400, "The request body is not valid JSON.")
        input_file_id = payload.get("input_file_id")
        endpoint = payload.get("endpoint")
        window = payload.get("completion_window")
        metadata = payload.get("metadata")
        expires = payload.get("output_expires_after")
        if expires is not None:
            problem = _expiry_problem((expires or {}).get("seconds") if isinstance(expires, dict) else expires, "")
            if problem or not isinstance(expires, dict) or expires.get("anchor") != "created_at":
                return error_response(
                    400, problem or "output_expires_after needs anchor 'created_at'.", param="output_expires_after"
                )
        for name, value in (
            ("input_file_id", input_file_id),
            ("endpoint", endpoint),
            ("completion_window", window),
        ):
            if not value:
                return error_response(400, f"Missing required parameter: '{name}'.", param=name)
        allowed = self.state.allowed_endpoints
        if allowed is not None and endpoint not in allowed:
            return error_response(400, f"Invalid value for 'endpoint': {endpoint!r}.", param="endpoint")
        windows = self.state.completion_windows
        if windows is not None and window not in windows:
            return error_response(400, f"Invalid value for 'completion_window': {window!r}.", param="completion_window")
        if metadata is not None:
            problem = _metadata_problem(metadata)
            if problem:
                return error_response(400, problem, param="metadata")
        stored = self.state.files.get(input_file_id)
        if stored is None:
            return error_response(404, f"No such File object: {input_file_id}", param="input_file_id")
        if stored.purpose != "batch":
            return error_response(400, f"File {input_file_id} has purpose {stored.purpose!r}, not 'batch'.")
        try:
            batch = await run_in_threadpool(self.state.create_batch, input_file_id, endpoint, window, metadata)
        except QueueLimitExceeded as refused:
            return error_response(400, refused.refusal.message, code=QUEUE_ERROR_CODE)
        if self.list_lag:
            self._listed_after[batch.id] = time.monotonic() + self.list_lag
        return JSONResponse(self.state.batch_json(batch))

    async def _batches_list(self, request: Request) -> Response:
        now = time.monotonic()
        batches = _newest_first([b for b in self.state.batches.values() if self._listed_after.get(b.id, 0.0) <= now])
        limit = self._limit(request, 20, 100)
        items = [self.state.batch_json(b) for b in batches]
        return JSONResponse(_page(items, request.query_params.get("after"), limit))

    async def _batches_retrieve(self, request: Request) -> Response:
        batch = self.state.batches.get(request.path_params["batch_id"])
        if batch is None:
            return error_response(404, f"No such Batch object: {request.path_params['batch_id']}", param="id")
        return JSONResponse(self.state.batch_json(batch))

    async def _batches_cancel(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        if batch_id not in self.state.batches:
            return error_response(404, f"No such Batch object: {batch_id}", param="id")
        batch = self.state.cancel(batch_id)
        status = self.state.status(batch)
        if status in ("completed", "failed", "expired"):
            return error_response(409, f"Cannot cancel a batch with status {status!r}.")
        return JSONResponse(self.state.batch_json(batch))


def _newest_first(items: list[Any]) -> list[Any]:
    """Items in creation order, listed newest first (a stable sort: same-second objects keep their order)."""
    return sorted(reversed(items), key=lambda item: item.created_at, reverse=True)


def _expiry_problem(seconds: Any, name: str) -> str | None:
    """``expires_after.seconds`` / ``output_expires_after.seconds``: "between 3600 (1 hour) and 2592000 (30 days)"."""
    if seconds is None:
        return None
    try:
        value = int(str(seconds))
    except ValueError:
        return f"Invalid value for '{name or 'output_expires_after'}.seconds': {seconds!r}."
    if not MIN_EXPIRES_AFTER_SECONDS <= value <= MAX_EXPIRES_AFTER_SECONDS:
        return (
            f"Invalid '{name or 'output_expires_after'}.seconds': {value}; expected a value between "
            f"{MIN_EXPIRES_AFTER_SECONDS} and {MAX_EXPIRES_AFTER_SECONDS}."
        )
    return None


def _metadata_problem(metadata: Any) -> str | None:
    if not isinstance(metadata, dict):
        return "metadata must be an object of string keys and values."
    if len(metadata) > 16:
        return f"metadata holds {len(metadata)} keys; at most 16 are allowed."
    for key, value in metadata.items():
        if not isinstance(value, str):
            return f"metadata value for {key!r} must be a string."
        if len(key) > 64:
            return f"metadata key {key[:20]!r}... is longer than 64 characters."
        if len(value) > 512:
            return f"metadata value for {key!r} is longer than 512 characters."
    return None
