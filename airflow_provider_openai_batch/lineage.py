"""
OpenLineage datasets for what the operators read and write: local or object-storage files, and OpenAI files.

The OpenLineage provider is optional: it is imported only when Airflow asks an operator for its facets, and
with it absent the operators simply report none.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit


def _dataset(namespace: str, name: str) -> Any:
    from airflow.providers.common.compat.openlineage.facet import Dataset

    return Dataset(namespace=namespace, name=name)


def storage_dataset(location: Any) -> Any:
    """
    ``s3://bucket/key`` → (``s3://bucket``, ``key``); a local path → (``file``, absolute path). A password in
    the URI (``ftp://user:pass@host/…``) is left out of the namespace.
    """
    text = str(location)
    parts = urlsplit(text)
    if parts.scheme and parts.scheme != "file":
        return _dataset(f"{parts.scheme}://{_without_password(parts.netloc)}", parts.path.lstrip("/"))
    return _dataset("file", os.path.abspath(parts.path if parts.scheme == "file" else text))


def _without_password(netloc: str) -> str:
    """``user:pass@host`` → ``host``; an ``@`` without a password is kept (``abfs://container@account…``)."""
    userinfo, at, host = netloc.rpartition("@")  # userinfo ends at the last "@"; a host cannot hold one
    return host if at and ":" in userinfo else netloc


def _host(base_url: str) -> str:
    """The host (and port) of a URL without its credentials: ``https://user:pass@gw:8443/v1`` → ``gw:8443``."""
    return urlsplit(base_url).netloc.rpartition("@")[2] or "api.openai.com"


def openai_dataset(base_url: str, kind: str, identifier: str) -> Any:
    """
    An OpenAI file or batch, namespaced by the API host (``openai://api.openai.com``); credentials in the base
    URL (``user:pass@``) stay out of it, since lineage events are stored and shown to anyone who reads lineage.
    """
    return _dataset(f"openai://{_host(base_url)}", f"{kind}/{identifier}")


def operator_lineage(inputs: list[Any], outputs: list[Any]) -> Any | None:
    """``OperatorLineage`` when the OpenLineage provider is installed, else ``None``."""
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    return OperatorLineage(inputs=inputs, outputs=outputs)


def available() -> bool:
    try:
        import airflow.providers.openlineage  # noqa: F401
    except ImportError:
        return False
    return True
