"""
What OpenAI's Batch API accepts, read from the installed ``openai`` SDK's own types rather than written down here.

A new SDK release that adds a batch endpoint (as ``/v1/images/generations``, ``/v1/images/edits`` and
``/v1/videos`` were added) works without a release of this provider, and a field that becomes optional upstream
(``model`` on ``/v1/responses``, which a stored ``prompt`` can supply) stops being rejected here. The limits the
SDK only states in prose (embedding inputs per batch, expiry bounds) are constants with the docstring they come from.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import typing_extensions

#: Used only when the SDK's ``BatchCreateParams`` cannot be read (an SDK that moved the type): openai 3.57's list.
_FALLBACK_ENDPOINTS: tuple[str, ...] = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)

#: The SDK's request parameters for each endpoint: their ``Required[...]`` keys are what a batch line's body needs.
_BODY_PARAMS: dict[str, tuple[str, str]] = {
    "/v1/responses": ("openai.types.responses.response_create_params", "ResponseCreateParamsBase"),
    "/v1/chat/completions": ("openai.types.chat.completion_create_params", "CompletionCreateParamsBase"),
    "/v1/embeddings": ("openai.types.embedding_create_params", "EmbeddingCreateParams"),
    "/v1/completions": ("openai.types.completion_create_params", "CompletionCreateParamsBase"),
    "/v1/moderations": ("openai.types.moderation_create_params", "ModerationCreateParams"),
    "/v1/images/generations": ("openai.types.image_generate_params", "ImageGenerateParamsBase"),
    "/v1/images/edits": ("openai.types.image_edit_params", "ImageEditParamsBase"),
    "/v1/videos": ("openai.types.video_create_params", "VideoCreateParams"),
}

EMBEDDINGS_ENDPOINT = "/v1/embeddings"
#: ``BatchCreateParams.endpoint``: "``/v1/embeddings`` batches are also restricted to a maximum of 50,000 embedding
#: inputs across all requests in the batch."
MAX_EMBEDDING_INPUTS = 50_000
#: ``BatchCreateParams.output_expires_after.seconds`` and ``FileCreateParams.expires_after.seconds``:
#: "Must be between 3600 (1 hour) and 2592000 (30 days)."
MIN_EXPIRES_AFTER_SECONDS = 3_600
MAX_EXPIRES_AFTER_SECONDS = 2_592_000


def _literal_strings(hint: Any) -> list[str]:
    """The string values inside ``Required[Literal[...]]`` (or any nesting of such wrappers)."""
    args = typing_extensions.get_args(hint)
    if not args:
        return [hint] if isinstance(hint, str) else []
    return [value for arg in args for value in _literal_strings(arg)]


@functools.cache
def batch_endpoints() -> tuple[str, ...]:
    """Every endpoint the installed SDK's ``BatchCreateParams.endpoint`` lists, in its order."""
    try:
        from openai.types.batch_create_params import BatchCreateParams

        hints = typing_extensions.get_type_hints(BatchCreateParams, include_extras=True)
        endpoints = tuple(_literal_strings(hints["endpoint"]))
    except Exception:  # pragma: no cover - only an SDK that moved the type gets here
        return _FALLBACK_ENDPOINTS
    return endpoints or _FALLBACK_ENDPOINTS


@functools.cache
def required_body_fields(endpoint: str | None) -> frozenset[str]:
    """
    The body fields the SDK marks ``Required`` for ``endpoint`` (chat: ``messages``, ``model``; moderations: ``input``;
    responses: none). An endpoint the SDK does not describe (a compatible server's own) requires nothing here.
    """
    where = _BODY_PARAMS.get(endpoint or "")
    if where is None:
        return frozenset()
    try:
        params = getattr(importlib.import_module(where[0]), where[1])
        hints = typing_extensions.get_type_hints(params, include_extras=True)
    except Exception:  # pragma: no cover - an SDK without this type: be lenient rather than reject good input
        return frozenset()
    required = typing_extensions.Required
    return frozenset(name for name, hint in hints.items() if typing_extensions.get_origin(hint) is required)


def count_embedding_inputs(value: Any) -> int:
    """
    How many embedding inputs one request's ``input`` holds (``EmbeddingCreateParams.input``): a string or one token
    array is one input; an array of strings or of token arrays is one input per element.
    """
    if isinstance(value, list):
        if value and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return 1
        return len(value)
    return 1 if value is not None else 0


def expiry_problem(seconds: int | None) -> str | None:
    """Why an ``expires_after`` / ``output_expires_after`` value would be refused, or ``None`` when it is fine."""
    if seconds is None or MIN_EXPIRES_AFTER_SECONDS <= seconds <= MAX_EXPIRES_AFTER_SECONDS:
        return None
    return (
        f"{seconds:,} seconds; OpenAI accepts {MIN_EXPIRES_AFTER_SECONDS:,} (1 hour) to "
        f"{MAX_EXPIRES_AFTER_SECONDS:,} (30 days)"
    )
