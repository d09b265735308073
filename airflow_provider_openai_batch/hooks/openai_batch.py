"""
OpenAIBatchHook: the only module that builds ``openai`` clients or calls the SDK (with ``poll_request``, which sends a
trigger's repeated status read again as the SDK sent it).

Everything else (operators, sensor, trigger) goes through here, so connection mapping, error translation,
secret masking and streaming are decided once. HTTP, retries (429 with Retry-After, 5xx, dropped connections)
and pagination are the SDK's; this hook adds what the SDK leaves to callers: streamed atomic downloads that
survive a stream cut mid-file, and errors that carry status, request id and message but never the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import httpx2
import openai
from airflow.providers.common.compat.sdk import BaseHook
from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI
from openai.types import Batch, FileDeleted, FileObject

from airflow_provider_openai_batch.batch_status import (
    BatchSummary,
    format_progress,
    is_terminal,
    progress_key,
    summarize,
    summarize_json,
)
from airflow_provider_openai_batch.exceptions import BatchTimeoutError, OpenAIBatchAPIError, OpenAIBatchError
from airflow_provider_openai_batch.get_provider_info import DEFAULT_BASE_URL
from airflow_provider_openai_batch.hooks.poll_request import PollHttpClient, RepeatedPolls
from airflow_provider_openai_batch.links.openai_batch import BATCH_LINK_CHOICES
from airflow_provider_openai_batch.polling import (
    DEFAULT_MAX_POLL_FAILURES,
    DEFAULT_POLL_INTERVAL,
    PollFailures,
    PollPolicy,
    backoff_delay,
    read_once,
)
from airflow_provider_openai_batch.storage import (
    Destination,
    Source,
    VerifiedRead,
    as_io,
    atomic_writer,
    copy_chunks,
    describe,
    open_source,
    read_check,
    source_name,
    to_storage_path,
)

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection


#: The SDK's transport (openai 3.x sends through httpx2) logs one INFO line per request,
#: ``HTTP Request: GET …/v1/batches/… "HTTP/1.1 200 OK"``: a poll every minute for a day buries a task log.
#: (Airflow itself already holds the older ``httpx`` at WARNING.)
REQUEST_LOGGERS = ("httpx2",)
_quieted_loggers: set[str] = set()
#: Downloads gather the transport's pieces (64 KB reads) into writes of this size where a write pays per call
#: (fsspec / object-store files); a local file takes the pieces as they come, one os.writev per this many bytes.
DOWNLOAD_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class Downloaded:
    """What a finished download wrote: bytes and JSONL lines, counted on the way through (no second read)."""

    bytes: int
    lines: int


class _EmptyFile(Exception):
    """Aborts the atomic write of a zero-byte download that the caller does not want kept."""


#: Client arguments, headers and query parameters whose values are credentials, whatever else their names say
#: (``api_key``, ``webhook_secret``, ``azure_ad_token``, ``subscription-key``, ``X-Auth-Token``, ...).
_SECRET_NAME = re.compile(r"key|token|secret|passw|auth|credential|signature|cookie", re.IGNORECASE)
#: An ``Authorization``-style value (``Bearer …``, ``Basic …``): the credential after the scheme is masked on its own
#: too. Only known schemes: splitting any value at a space would mask ordinary words of ordinary headers.
_AUTH_SCHEME = re.compile(
    r"^(?:bearer|basic|token|digest|apikey|api-key|key|sharedkey|ssws|negotiate|hawk|aws4-hmac-sha256)\s+"
    r"(?P<credential>\S.*)$",
    re.IGNORECASE,
)
#: Airflow's masker skips (with a warning) values shorter than its ``min_length_masked_secret`` (5 by default): a
#: header such as ``X-Debug: 1`` is no secret, and is left out instead of causing that warning in every task log.
_SHORTEST_HEADER_SECRET = 5


def _mask(secret: Any) -> None:
    """
    Register a secret with Airflow's masker by its value: a string, or every string inside a mapping or list.

    (Given a mapping, the masker itself hides only the values under names it knows as secret, which leaves e.g.
    ``Ocp-Apim-Subscription-Key`` shown.) ``Bearer sk-…`` is registered whole and as its credential alone.
    """
    if isinstance(secret, Mapping):
        for value in secret.values():
            _mask(value)
        return
    if isinstance(secret, (list, tuple, set, frozenset)):
        for value in secret:
            _mask(value)
        return
    if not isinstance(secret, str) or not secret:
        return
    try:  # its home moved across Airflow 3.x releases
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - exercised on older Airflow 3
        from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]
    mask_secret(secret)
    scheme = _AUTH_SCHEME.match(secret)
    if scheme:
        mask_secret(scheme.group("credential"))


def _client_secrets(kwargs: Mapping[str, Any]) -> list[Any]:
    """
    Every credential in SDK client arguments: the key, every ``default_headers`` value (a gateway's key or an
    ``Authorization`` travels there), any argument or query parameter named like a secret, and the password in a
    base URL (``https://user:pass@host``).
    """
    found: list[Any] = [kwargs.get("api_key")]
    headers = kwargs.get("default_headers")
    if isinstance(headers, Mapping):
        found += [
            value
            for header, value in headers.items()
            if _SECRET_NAME.search(str(header)) or len(str(value)) >= _SHORTEST_HEADER_SECRET
        ]
    for name, value in kwargs.items():
        if name in ("api_key", "default_headers"):
            continue
        if _SECRET_NAME.search(name):
            found.append(value)
        elif isinstance(value, Mapping):  # default_query and the like: {"subscription-key": "..."}
            found += [inner for key, inner in value.items() if _SECRET_NAME.search(str(key))]
        elif name in ("base_url", "azure_endpoint", "websocket_base_url") and value:
            with contextlib.suppress(ValueError):
                found.append(urlsplit(str(value)).password)
    return found


def quiet_request_logs() -> None:
    """
    Keep the transport's per-request lines out of task logs unless debug logging is on.

    Called whenever a client is built, so it follows the level of the process it runs in (a worker, the
    triggerer, ``dag.test``): with ``[logging] logging_level = DEBUG`` the lines come back. A logger someone
    configured (its level set, not by us) is left as they set it. The SDK's own ``openai`` logger is not
    touched: at INFO it says only "Retrying request in …", which a person wants to see.
    """
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    for name in REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level != logging.NOTSET and name not in _quieted_loggers:
            continue
        if debug:
            logger.setLevel(logging.NOTSET)
            _quieted_loggers.discard(name)
        else:
            logger.setLevel(logging.WARNING)
            _quieted_loggers.add(name)


def _extras(conn: Connection) -> dict[str, Any]:
    extra = conn.extra_dejson or {}
    return dict(extra) if isinstance(extra, dict) else {}


def _headers(value: Any) -> dict[str, str] | None:
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:  # its position only: the text holds header values, which are secrets
            raise ValueError(
                f"connection extra 'default_headers' is not valid JSON (line {error.lineno}, column {error.colno})"
            ) from None
    if not isinstance(value, dict):
        raise ValueError("connection extra 'default_headers' must be a JSON object of header names to values")
    return {str(k): str(v) for k, v in value.items()}


def client_kwargs(conn: Connection) -> tuple[bool, dict[str, Any]]:
    """
    Map an Airflow connection to SDK client arguments: ``(is_azure, kwargs)``.

    Reads this provider's fields and the official OpenAI provider's ``openai_client_kwargs`` extra, so an
    existing ``openai`` connection works unchanged.
    """
    extra = _extras(conn)
    passthrough = dict(extra.get("openai_client_kwargs") or {})
    api_type = str(extra.get("api_type") or "openai").lower()
    if api_type not in ("openai", "azure"):
        raise ValueError(f"connection extra 'api_type' must be 'openai' or 'azure', got {api_type!r}")
    if str(extra.get("batch_link") or "auto").lower() not in BATCH_LINK_CHOICES:
        raise ValueError(f"connection extra 'batch_link' must be one of {', '.join(BATCH_LINK_CHOICES)}")
    base_url = passthrough.pop("base_url", None) or conn.host or None
    kwargs: dict[str, Any] = {"api_key": conn.password or passthrough.pop("api_key", None)}
    for name in ("organization", "project"):
        if extra.get(name):
            kwargs[name] = str(extra[name])
    if extra.get("timeout") not in (None, ""):
        kwargs["timeout"] = float(extra["timeout"])
    if extra.get("max_retries") not in (None, ""):
        kwargs["max_retries"] = int(extra["max_retries"])
    headers = _headers(extra.get("default_headers"))
    if headers:
        kwargs["default_headers"] = headers
    if api_type == "azure":
        if not extra.get("api_version"):
            raise ValueError("an Azure connection (api_type='azure') needs the extra 'api_version'")
        if not base_url:
            raise ValueError("an Azure connection needs host = https://RESOURCE.openai.azure.com")
        kwargs["api_version"] = str(extra["api_version"])
        kwargs["azure_endpoint"] = str(base_url).rstrip("/")
    else:
        kwargs["base_url"] = str(base_url).rstrip("/") if base_url else DEFAULT_BASE_URL
    kwargs.update(passthrough)
    return api_type == "azure", kwargs


@contextlib.contextmanager
def api_errors(operation: str) -> Iterator[None]:
    """
    Re-raise SDK and transport errors as ``OpenAIBatchAPIError``: status, request id, message, never the key.

    ``from None`` on purpose: the SDK exception holds the request, whose headers hold the bearer key, and a
    chained traceback is one careless ``repr`` away from a log line.
    """
    try:
        yield
    except OpenAIBatchAPIError:
        raise
    except openai.APIStatusError as error:
        body = error.body if isinstance(error.body, dict) else {}
        message = str(body.get("message") or error.message)
        raise OpenAIBatchAPIError(
            operation,
            message,
            status_code=error.status_code,
            request_id=error.request_id,
            code=str(body["code"]) if body.get("code") else None,
        ) from None
    except openai.APIConnectionError as error:
        cause = error.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause else error.message
        raise OpenAIBatchAPIError(operation, f"could not reach the API ({detail})") from None
    except openai.APIResponseValidationError as error:
        raise OpenAIBatchAPIError(
            operation,
            f"the API answered with data the SDK could not read: {error.message}",
            status_code=error.status_code,
        ) from None
    except httpx2.HTTPError as error:
        raise OpenAIBatchAPIError(operation, f"transport error ({type(error).__name__}: {error})") from None


class _LoopBoundClients:
    """
    One ``AsyncOpenAI`` per connection per event loop, shared by every trigger in a triggerer.

    A client per trigger would mean a connection pool and a TLS handshake per wait; a thread per poll would
    bound 1,000 waits by a small thread pool. A client is tied to its loop, so a new loop (``dag.test`` runs
    each trigger in its own) gets a new client and the old one is dropped with it.
    """

    def __init__(self) -> None:
        self._clients: dict[str, tuple[weakref.ref[asyncio.AbstractEventLoop], AsyncOpenAI, PollHttpClient]] = {}

    def get(self, key: str) -> tuple[AsyncOpenAI, PollHttpClient] | None:
        """The client for ``key`` on the running loop, with the HTTP client it sends through."""
        entry = self._clients.get(key)
        if entry is None:
            return None
        loop_ref, client, http = entry
        if loop_ref() is not asyncio.get_running_loop():
            del self._clients[key]
            return None
        return client, http

    def put(self, key: str, client: AsyncOpenAI, http: PollHttpClient) -> None:
        self._clients[key] = (weakref.ref(asyncio.get_running_loop()), client, http)

    def drop(self, key: str) -> None:
        self._clients.pop(key, None)


class OpenAIBatchHook(BaseHook):
    """
    Every OpenAI Files and Batches call the provider makes.

    Connection: password = API key, host = base URL (default ``https://api.openai.com/v1``, or any
    OpenAI-compatible server), extra: ``organization``, ``project``, ``timeout``, ``max_retries``,
    ``default_headers``, ``api_type`` (``openai`` | ``azure``), ``api_version`` (Azure's classic endpoint),
    ``batch_link`` (``auto`` | ``openai`` | ``none``: the extra link), and the official OpenAI provider's
    ``openai_client_kwargs`` (passed to the SDK client as they are).

    :param conn_id: Airflow connection id (``openai_default``).
    :param max_retries: Override the connection's retry bound for this hook's calls.
    :param strict_response_validation: Validate every answer against the SDK's types (used by the tests to
        prove the fake server speaks OpenAI's exact shapes).
    """

    conn_name_attr = "conn_id"
    default_conn_name = "openai_default"
    conn_type = "openai_batch"
    hook_name = "OpenAI Batch"
    _async_clients: ClassVar[_LoopBoundClients] = _LoopBoundClients()

    def __init__(
        self,
        conn_id: str = default_conn_name,
        *,
        max_retries: int | None = None,
        strict_response_validation: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.max_retries = max_retries
        self.strict_response_validation = strict_response_validation

    # --- clients ------------------------------------------------------------------------------

    def _build_kwargs(self, conn: Connection) -> tuple[bool, dict[str, Any]]:
        azure, kwargs = client_kwargs(conn)
        _mask(_client_secrets(kwargs))
        quiet_request_logs()
        if self.max_retries is not None:
            kwargs["max_retries"] = self.max_retries
        if self.strict_response_validation:
            kwargs["_strict_response_validation"] = True
        return azure, kwargs

    @cached_property
    def _repeated_polls(self) -> RepeatedPolls:
        return RepeatedPolls()

    @cached_property
    def _connection(self) -> Connection:
        return self.get_connection(self.conn_id)

    @cached_property
    def _client(self) -> OpenAI:
        azure, kwargs = self._build_kwargs(self._connection)
        return AzureOpenAI(**kwargs) if azure else OpenAI(**kwargs)

    def get_conn(self) -> OpenAI:
        """The sync SDK client for this connection (cached on the hook)."""
        return self._client

    @property
    def base_url(self) -> str:
        """Where this connection's requests go (OpenAI, an Azure resource or a compatible server)."""
        return str(self.get_conn().base_url)

    @property
    def is_azure(self) -> bool:
        """Whether the connection speaks Azure OpenAI's classic API (``api_type=azure``)."""
        return isinstance(self.get_conn(), AzureOpenAI)

    @property
    def batch_link(self) -> str | None:
        """The connection's ``batch_link`` extra: ``openai`` / ``none`` override the extra link's choice."""
        value = _extras(self._connection).get("batch_link")
        return str(value).lower() if value else None

    def _with_retries(self, max_retries: int | None) -> OpenAI:
        return self.get_conn() if max_retries is None else self.get_conn().with_options(max_retries=max_retries)

    @property
    def _async_key(self) -> str:
        return f"{self.conn_id}\x00{self.max_retries}\x00{self.strict_response_validation}"

    async def get_async_conn(self) -> AsyncOpenAI:
        """The process-wide async client for this connection on the running loop (created once, then shared)."""
        return (await self._async_conn())[0]

    async def _async_conn(self) -> tuple[AsyncOpenAI, PollHttpClient]:
        entry = self._async_clients.get(self._async_key)
        if entry is not None:
            return entry
        aget = getattr(BaseHook, "aget_connection", None)
        if aget is not None:
            conn = await aget(self.conn_id)
        else:  # pragma: no cover - Airflow < 3.1 has no async connection lookup
            conn = await asyncio.to_thread(self.get_connection, self.conn_id)
        azure, kwargs = self._build_kwargs(conn)
        entry = self._async_clients.get(self._async_key)  # another trigger may have won the race
        if entry is None:
            http = PollHttpClient()
            kwargs["http_client"] = http
            client = AsyncAzureOpenAI(**kwargs) if azure else AsyncOpenAI(**kwargs)
            entry = client, http
            self._async_clients.put(self._async_key, client, http)
        return entry

    def reset_client(self) -> None:
        """
        Forget the connection and the clients built from it: the next call reads the connection again and builds
        new ones (after a 401: the key may have just been rotated). The sync client and the connection it was
        built from are this hook's; the async client is this process's for the connection on its loop, so the
        other waits on it read the connection again too (they would meet the same refused key).
        """
        with contextlib.suppress(AttributeError):  # never built
            del self._client
        with contextlib.suppress(AttributeError):
            del self._connection
        self._async_clients.drop(self._async_key)

    # --- files ---------------------------------------------------------------------------------

    def upload_file(
        self,
        source: Source,
        purpose: str = "batch",
        filename: str | None = None,
        expires_after_seconds: int | None = None,
        *,
        max_retries: int | None = None,
        length: int | None = None,
        sha256: str | None = None,
    ) -> FileObject:
        """
        Upload from a path, URI, ``ObjectStoragePath``, bytes or binary stream, streamed (never read whole);
        ``length`` sends only the first that many bytes (validation leaves empty lines at the end out).

        With ``sha256`` (and ``length``), only the bytes validation hashed are sent: they are hashed as they are
        read, and if the source changed since, the request body is never completed (so no file is made) and
        ``BatchInputError`` names the source; a file the server made anyway is deleted before that error.
        """
        name = filename or source_name(source)
        extra: dict[str, Any] = {}
        if expires_after_seconds is not None:
            extra["expires_after"] = {"anchor": "created_at", "seconds": int(expires_after_seconds)}
        with open_source(source) as stream:
            body = as_io(stream, length, sha256=sha256, source=describe(source))
            check = read_check(body)
            try:
                with api_errors("files.create"):
                    client = self._with_retries(max_retries)
                    uploaded = client.files.create(
                        file=(name, body, "application/jsonl"),
                        purpose=purpose,  # type: ignore[arg-type]
                        **extra,
                    )
            except Exception:
                if check is not None and check.error is not None:  # however the transport reported the stop
                    raise check.error from None
                raise
        if check is not None:
            self._keep_only_checked(uploaded, check, length)
        return uploaded

    def _keep_only_checked(self, uploaded: FileObject, check: VerifiedRead, length: int | None) -> None:
        """
        An upload answered although the body was not sent whole as checked: a transport that went on past the
        reader's stop (the source changed: ``BatchInputError``), an answer before the end, or a server that kept
        fewer bytes than were sent (``OpenAIBatchAPIError``, retryable: nothing is left to be found). Its file holds
        something other than the validated bytes under their name, so it is deleted; one that cannot be is named
        in an ``OpenAIBatchError`` that nothing retries (a retry would find it by that name and reuse it).
        """
        stored = uploaded.bytes
        short = isinstance(stored, int) and stored > 0 and stored != length  # a compatible server may say 0
        if check.verified and not short:
            return
        try:
            self.delete_file(uploaded.id)
        except OpenAIBatchAPIError as error:
            if not error.not_found:
                raise OpenAIBatchError(
                    f"{check.source}: the upload {uploaded.id} ({uploaded.filename}) does not hold the validated "
                    f"bytes and could not be deleted ({error}); delete it before retrying, or a retry reuses it"
                ) from None
        if check.error is not None:
            raise check.error
        what = f"kept {stored:,} of the {length:,} bytes sent" if short else "answered before the file was sent whole"
        raise OpenAIBatchAPIError("files.create", f"the server {what}; the file it made ({uploaded.id}) was deleted")
        return uploaded

    def get_file(self, file_id: str) -> FileObject:
        with api_errors("files.retrieve"):
            return self.get_conn().files.retrieve(file_id)

    def list_files(self, purpose: str | None = None, *, order: str = "desc") -> Iterator[FileObject]:
        """Every file, all pages, fetched lazily as the caller iterates (newest first by default)."""
        params: dict[str, Any] = {"order": order}
        if purpose:
            params["purpose"] = purpose
        with api_errors("files.list"):
            yield from self.get_conn().files.list(**params)

    def delete_file(self, file_id: str) -> FileDeleted:
        with api_errors("files.delete"):
            return self.get_conn().files.delete(file_id)

    def download_file(
        self,
        file_id: str,
        destination: Destination,
        overwrite: bool = False,
        *,
        attempts: int | None = None,
        keep_empty: bool = True,
    ) -> Downloaded:
        """
        Stream a file's content to ``destination`` (path, URI or ``ObjectStoragePath``).

        The SDK does not retry a body cut off mid-stream, so this does: each attempt writes to a temporary
        name and moves it into place only when the bytes received match what the server announced.
        ``keep_empty=False`` writes nothing for a zero-byte file (``Downloaded.bytes == 0``), as some compatible
        servers send an empty error file when nothing failed.
        """
        tries = attempts if attempts is not None else 1 + (self.max_retries if self.max_retries is not None else 2)
        target = to_storage_path(destination)
        for attempt in range(1, tries + 1):
            try:
                return self._download_once(file_id, target, overwrite, keep_empty)
            except OpenAIBatchAPIError as error:
                if attempt >= tries or not error.retryable:
                    raise
                delay = backoff_delay(attempt, 0.5, 8.0)
                self.log.warning("Download of %s failed (%s); retrying in %.1fs", file_id, error, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _download_once(self, file_id: str, target: Any, overwrite: bool, keep_empty: bool) -> Downloaded:
        streaming = self.get_conn().files.with_streaming_response
        with contextlib.suppress(_EmptyFile), api_errors("files.content"), streaming.content(file_id) as response:
            # Content-Length counts the bytes on the wire: compressed ones when a proxy or server gzips the body,
            # which iter_bytes() then decodes. So the check compares what arrived, not what was written.
            expected = response.headers.get("content-length")
            written = lines = 0
            last = b"\n"
            with atomic_writer(target, overwrite=overwrite) as out:
                # The pieces as the transport delivers them (decoded, never re-chunked: a re-chunking copy costs
                # more than writing); copy_chunks gathers DOWNLOAD_CHUNK_SIZE writes only where a write pays per call.
                pieces = response.iter_bytes()
                for chunk in copy_chunks(pieces, out, block=DOWNLOAD_CHUNK_SIZE):
                    written += len(chunk)
                    lines += chunk.count(b"\n")
                    last = chunk[-1:] or last
                received = response.http_response.num_bytes_downloaded
                if expected is not None and received != int(expected):
                    raise OpenAIBatchAPIError(
                        "files.content", f"stream ended after {received} of {expected} bytes of {file_id}"
                    )
                if not written and not keep_empty:
                    raise _EmptyFile  # leaves the destination untouched: nothing to keep
            # A last line without a newline still counts; an empty file has no lines.
            return Downloaded(bytes=written, lines=lines + (1 if written and last != b"\n" else 0))
        return Downloaded(bytes=0, lines=0)

    # --- batches --------------------------------------------------------------------------------

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        output_expires_after_seconds: int | None = None,
        *,
        max_retries: int | None = None,
    ) -> Batch:
        """
        Create a batch. ``max_retries=0`` lets a caller that can find its own batch (by metadata) decide
        what a lost answer means, instead of the SDK blindly sending the create again.
        """
        extra: dict[str, Any] = {}
        if metadata:
            extra["metadata"] = metadata
        if output_expires_after_seconds is not None:
            extra["output_expires_after"] = {
                "anchor": "created_at",
                "seconds": int(output_expires_after_seconds),
            }
        client = self._with_retries(max_retries)
        with api_errors("batches.create"):
            return client.batches.create(
                input_file_id=input_file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=completion_window,  # type: ignore[arg-type]
                **extra,
            )

    def get_batch(self, batch_id: str) -> Batch:
        with api_errors("batches.retrieve"):
            return self.get_conn().batches.retrieve(batch_id)

    def cancel_batch(self, batch_id: str) -> Batch:
        with api_errors("batches.cancel"):
            return self.get_conn().batches.cancel(batch_id)

    def list_batches(self, *, page_size: int = 100) -> Iterator[Batch]:
        """Every batch, newest first, all pages, fetched lazily as the caller iterates."""
        with api_errors("batches.list"):
            yield from self.get_conn().batches.list(limit=page_size)

    def find_batch(self, metadata_key: str, value: str, created_after: float | None = None) -> Batch | None:
        """
        The newest batch whose ``metadata[metadata_key] == value``, scanning no further back than
        ``created_after`` (epoch seconds), so the scan costs a page or two, not the account's history.
        """
        for batch in self.list_batches():
            if created_after is not None and batch.created_at < created_after:
                return None
            if (batch.metadata or {}).get(metadata_key) == value:
                return batch
        return None

    def batches_reading(self, file_id: str, *, exclude: str | None = None) -> list[Batch]:
        """
        Batches other than ``exclude`` that read ``file_id`` as input and have not ended. The scan stops at the
        file's own creation: no batch can have read it before it existed.
        """
        created_at = self.get_file(file_id).created_at
        found = []
        for batch in self.list_batches():
            if batch.created_at < created_at:
                break
            if batch.input_file_id == file_id and batch.id != exclude and not is_terminal(batch.status):
                found.append(batch)
        return found

    def poll_batch(self, batch_id: str, failures: PollFailures, *, deadline: float | None = None) -> Batch:
        """
        One status read under the poll policy (``polling.read_once``): a failed read is retried ``poll_interval``
        apart until the policy gives up (then the last error is raised), a 401 after one fresh read of the
        connection; past ``deadline`` the last error is raised.
        """
        while True:
            batch = read_once(
                lambda: self.get_batch(batch_id), failures, f"batch {batch_id}", self.reset_client, self.log
            )
            if batch is not None:
                return batch
            if deadline is not None and time.time() >= deadline and failures.last is not None:
                raise failures.last
            pause = failures.policy.poll_interval
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.time())))

    def wait_for_batch(
        self,
        batch_id: str,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float | None = None,
        *,
        end_time: float | None = None,
        max_poll_interval: float | None = None,
        on_progress: Callable[[str], None] | None = None,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        on_poll: Callable[[Batch], Batch] | None = None,
    ) -> Batch:
        """
        Block until the batch ends (the non-deferrable path), logging progress when counts change.

        ``timeout`` counts from now; ``end_time`` is an absolute epoch deadline (the operators count it from the
        batch's creation). Past either, ``BatchTimeoutError`` carries the last summary. Cadence and failed polls
        follow ``polling.PollPolicy``, as in the trigger: the cadence relaxes as the batch ages (with
        ``max_poll_interval``), ``max_poll_failures`` transient failures in a row are tolerated, and a 401 is
        followed by one fresh read of the connection. ``on_poll`` sees each batch read and returns the batch to
        keep waiting for (the second look for a duplicate may switch the wait to the survivor).
        """
        policy = PollPolicy(poll_interval, max_poll_interval, max_poll_failures, jitter_first_poll=False)
        failures = PollFailures(policy)
        deadlines = [d for d in (end_time, None if timeout is None else time.time() + timeout) if d is not None]
        deadline = min(deadlines) if deadlines else None
        report = on_progress or self.log.info
        last: tuple[Any, ...] | None = None
        while True:
            batch = self.poll_batch(batch_id, failures, deadline=deadline)
            if on_poll is not None:
                batch = on_poll(batch)
                batch_id = batch.id
            summary = summarize(batch)
            if progress_key(summary) != last:
                last = progress_key(summary)
                report(format_progress(summary))
            if is_terminal(batch.status):
                return batch
            now = time.time()
            if deadline is not None and now >= deadline:
                raise BatchTimeoutError(f"Batch {batch_id} did not end before its deadline", summary)
            delay = policy.delay(now - batch.created_at)
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - now)))

    # --- async twins (what triggers use) --------------------------------------------------------

    async def _acall(self, operation: str, call: Callable[[AsyncOpenAI], Any]) -> Any:
        client = await self.get_async_conn()
        try:
            with api_errors(operation):
                return await call(client)
        except OpenAIBatchAPIError as error:
            if error.http_status == 401:
                self.reset_client()
            raise

    async def aget_batch(self, batch_id: str) -> Batch:
        result: Batch = await self._acall("batches.retrieve", lambda c: c.batches.retrieve(batch_id))
        return result

    async def aget_batch_summary(self, batch_id: str) -> BatchSummary:
        """
        ``summarize(await self.aget_batch(batch_id))`` at a fraction of the CPU: what the trigger calls per poll.

        The answer is read from its JSON with a small struct instead of the SDK's full model; an answer of a shape
        that struct does not know, and every answer under ``strict_response_validation``, is read by the SDK's
        model as before. After the first read of a batch through the SDK, this hook sends the request the SDK
        sent again, without the SDK's per-request work (``poll_request``); any answer but a clean 200 makes the
        read again through the SDK, so retries, status errors and the 401 re-read are those of every other call.
        """
        client, http = await self._async_conn()
        summary = await self._repeated_polls.read(batch_id, client)
        if summary is not None:
            return summary
        response = await self._acall("batches.retrieve", lambda c: c.batches.with_raw_response.retrieve(batch_id))
        summary = None if self.strict_response_validation else summarize_json(response.content)
        if summary is None:
            with api_errors("batches.retrieve"):
                summary = summarize(response.parse())
        elif summary["batch_id"] == batch_id:
            self._repeated_polls.keep(batch_id, client, http, response.http_request)
        return summary

    async def acancel_batch(self, batch_id: str) -> Batch:
        result: Batch = await self._acall("batches.cancel", lambda c: c.batches.cancel(batch_id))
        return result

    async def aget_file(self, file_id: str) -> FileObject:
        result: FileObject = await self._acall("files.retrieve", lambda c: c.files.retrieve(file_id))
        return result

    async def alist_batches(self, *, page_size: int = 100) -> AsyncIterator[Batch]:
        client = await self.get_async_conn()
        with api_errors("batches.list"):
            async for batch in client.batches.list(limit=page_size):
                yield batch

    # --- connection UI ----------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """One cheap call that needs Batch permissions, so a green test means batches will work."""
        try:
            with api_errors("batches.list"):
                self.get_conn().batches.list(limit=1)
        except OpenAIBatchAPIError as error:
            return False, str(error)
        except Exception as error:  # a bad extra, a missing key: say so in the UI instead of a stack trace
            return False, f"{type(error).__name__}: {error}"
        return True, "Connection works: the API key can list batches."
