"""
OpenAIBatchLink: the batch's page for a person, only where such a page exists.

Which page depends on where the connection sends requests, and only the task knows that, so the link works as
the amazon provider's ``BaseAwsLink`` does: the task *persists* what the link needs in the link's own XCom
(``persist``) the moment the batch id is known, and ``get_link`` only formats it. Airflow 3 renders links on
the worker after every run, deferrals included, so the link is there during a 24-hour wait.

- OpenAI's API (``api.openai.com``, also a data-residency host such as ``eu.api.openai.com``): the dashboard's
  page ``https://platform.openai.com/batches/<batch_id>``.
- Azure OpenAI (``api_type=azure``, or a ``*.azure.com`` host): no link. The Azure AI Foundry / portal page of a
  batch job is addressed by subscription, resource group and resource, and a connection holds only the
  endpoint; a guessed URL would lead nowhere.
- Any other OpenAI-compatible server (vLLM, a local fake, a gateway): no link, it has no batch page.
- The connection's ``batch_link`` extra overrides the guess: ``openai`` for a gateway that forwards to OpenAI
  (the batch ids are OpenAI's, so is the page), ``none`` for no link at all; ``auto`` (default) guesses as above.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict
from urllib.parse import urlsplit

from airflow.providers.common.compat.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskInstanceKey

#: The batch id itself, pushed under this key (with the link's own XCom) as soon as the task knows it, before any
#: wait: by the create, cancel and download operators and the sensor (again when a wait moves to an older
#: duplicate that survived, blocking or deferred); by the one-task job for the first batch of each wave it creates
#: (each push replaces the last, so the link names one batch of the latest wave). The upload operator has no
#: batch and pushes none.
BATCH_ID_XCOM_KEY = "batch_id"

Console = Literal["openai", "azure"]
#: The page of a batch, per console; a console without an entry gets no link.
CONSOLE_URLS: dict[str, str] = {"openai": "https://platform.openai.com/batches/{batch_id}"}
OPENAI_API_HOSTS = ("api.openai.com",)
AZURE_HOST_SUFFIXES = (".azure.com", ".azure.us", ".azure.cn")


class LinkInfo(TypedDict):
    """What ``persist`` stores: enough to format the link without reading the connection again."""

    batch_id: str
    console: Console | None


#: Values of the connection's ``batch_link`` extra.
BATCH_LINK_CHOICES = ("auto", "openai", "none")


def console_of(base_url: str | None, *, azure: bool = False, batch_link: str | None = None) -> Console | None:
    """Whose console the connection's requests go to: OpenAI's, Azure's, or nobody's (a compatible server)."""
    if batch_link == "openai":
        return "openai"
    if batch_link == "none":
        return None
    host = (urlsplit(base_url or "").hostname or "").lower()
    if azure or host.endswith(AZURE_HOST_SUFFIXES):
        return "azure"
    if any(host == known or host.endswith("." + known) for known in OPENAI_API_HOSTS):
        return "openai"
    return None


def batch_page_url(batch_id: str, console: str | None) -> str | None:
    """The batch's page, or ``None`` where no correct page can be named."""
    template = CONSOLE_URLS.get(console or "")
    return template.format(batch_id=batch_id) if template and batch_id else None


class OpenAIBatchLink(BaseOperatorLink):
    """The "OpenAI Batch" button: the batch's page on OpenAI's dashboard, absent where no such page exists."""

    name = "OpenAI Batch"
    #: The link's own XCom (what ``persist`` pushed); Airflow stores the formatted link under ``xcom_key``.
    key: ClassVar[str] = "openai_batch_link"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        from airflow.providers.common.compat.sdk import XCom

        info = XCom.get_value(ti_key=ti_key, key=self.key)
        if not isinstance(info, Mapping):
            return ""
        return batch_page_url(str(info.get("batch_id") or ""), info.get("console")) or ""

    @classmethod
    def persist(
        cls,
        context: Mapping[str, Any],
        operator: Any,
        *,
        batch_id: str,
        base_url: str | None,
        azure: bool,
        batch_link: str | None = None,
    ) -> None:
        """Store what the link needs, from the connection the task used (as ``BaseAwsLink.persist``)."""
        if not getattr(operator, "do_xcom_push", True):
            return
        console = console_of(base_url, azure=azure, batch_link=batch_link)
        info: LinkInfo = {"batch_id": batch_id, "console": console}
        context["ti"].xcom_push(key=cls.key, value=dict(info))
