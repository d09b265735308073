"""
A batch's status read sent again as the SDK last sent it: what keeps a trigger's poll near the cost of a GET.

The SDK builds every request anew (an options model, headers merged, the URL joined and parsed twice, its retry and
response wrappers), which costs about as much CPU as the GET itself; at 1,000 waits on one triggerer that doubles
what a poll costs every other trigger in the deployment. A poll asks the same question every time, so the
first read of a batch goes through the SDK and the exact request it sent (URL, headers with the key, timeout) is
kept; the next reads send that request again through the same HTTP client, which httpx sends "as-is, unmodified".

Only a 200 whose body reads as a Batch of that id is taken. Anything else (another status, a transport error, a body
of another shape) drops the kept request and the read is made through the SDK, so status errors, retries with
backoff, ``Retry-After`` and the hook's 401 re-read of the connection are the SDK's and the hook's, as for every
other call. The price is one more request on an error answer, and only once: the next reads go through the SDK
until one succeeds. Requests the SDK signs or authenticates in the transport (``custom_auth``) are never kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import openai

from airflow_provider_openai_batch.batch_status import BatchSummary, summarize_json

if TYPE_CHECKING:
    import httpx2
    from openai import AsyncOpenAI


_closing: set[asyncio.Task[None]] = set()


class PollHttpClient(openai.DefaultAsyncHttpxClient):
    """
    The async clients' HTTP client, created by the hook (not the SDK) so a kept request is sent through it.

    ``openai.DefaultAsyncHttpxClient`` has the SDK's own defaults (timeouts, connection limits, redirects); like the
    client the SDK would make itself, it closes on garbage collection when its loop is still running. Dropped while
    another loop runs (``dag.test`` runs each trigger in a loop of its own), it is not closed there: its connections
    belong to a closed loop, and closing them in another ends in an error that loop logs.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        try:
            self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = weakref.ref(asyncio.get_running_loop())
        except RuntimeError:
            self._loop = None

    def __del__(self) -> None:
        if self.is_closed:
            return
        with contextlib.suppress(Exception):  # no running loop: the sockets close with their objects
            loop = asyncio.get_running_loop()
            if self._loop is not None and self._loop() is loop:
                closing = loop.create_task(self.aclose())
                _closing.add(closing)  # held until done: the loop keeps only a weak reference to a task
                closing.add_done_callback(_closing.discard)


class RepeatedPolls:
    """The request the SDK last sent to read each batch, per hook (a trigger's hook lives as long as its wait)."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[AsyncOpenAI, PollHttpClient, httpx2.Request]] = {}

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._kept

    def keep(self, batch_id: str, client: AsyncOpenAI, http: PollHttpClient, request: httpx2.Request) -> None:
        """
        Keep what the SDK sent for ``batch_id`` through ``client``, unless the SDK authenticates in transport.

        Only a first try is kept: a retry's request tells OpenAI so (``X-Stainless-Retry-Count``), which a poll
        sent again is not; the next read through the SDK is then kept instead.
        """
        retry = request.headers.get("x-stainless-retry-count", "0")
        if request.method == "GET" and client.custom_auth is None and retry == "0":
            self._kept[batch_id] = (client, http, request)

    async def read(self, batch_id: str, client: AsyncOpenAI) -> BatchSummary | None:
        """The batch's summary from the kept request, or ``None``: the caller then reads it through the SDK."""
        kept = self._kept.get(batch_id)
        if kept is None:
            return None
        if kept[0] is not client:  # the hook made a new client (a 401, another loop): its key may differ
            self._kept.pop(batch_id, None)
            return None
        try:
            response = await kept[1].send(kept[2])
        except Exception:  # any failure is the SDK's to retry and report, as for every other call
            response = None
        summary = summarize_json(response.content) if response is not None and response.status_code == 200 else None
        if summary is None or summary["batch_id"] != batch_id:
            self._kept.pop(batch_id, None)
            return None
        return summary
