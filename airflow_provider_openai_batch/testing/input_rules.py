"""
How the fake server judges a batch input file: OpenAI's published rules, written apart from the provider's own
validator (``batch_file``) and its reading of the SDK (``endpoints``) on purpose.

If the fake reused the provider's rules, a wrong rule would be wrong on both sides and no test could catch it.
Here each rule is read from OpenAI's documentation and the installed ``openai`` SDK's own types (see
``CONTRACT.md``), with the standard library's JSON parser; where OpenAI is silent, the stricter reading is taken
and the provider has to cope with it. Nothing here imports the provider.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typing_extensions

#: ``BatchCreateParams.input_file_id``: "The file can contain up to 50,000 requests".
MAX_REQUESTS = 50_000
#: ``BatchCreateParams.endpoint``: "``/v1/embeddings`` batches are also restricted to a maximum of 50,000 embedding
#: inputs across all requests in the batch."
MAX_EMBEDDING_INPUTS = 50_000

#: CONTRACT.md V2: the SDK's request parameters of each batch endpoint (the body a batch line carries is that
#: endpoint's request). An endpoint not named here (one a newer SDK adds) requires nothing until it is added.
REQUEST_TYPES: dict[str, tuple[str, str]] = {
    "/v1/responses": ("openai.types.responses.response_create_params", "ResponseCreateParamsBase"),
    "/v1/chat/completions": ("openai.types.chat.completion_create_params", "CompletionCreateParamsBase"),
    "/v1/embeddings": ("openai.types.embedding_create_params", "EmbeddingCreateParams"),
    "/v1/completions": ("openai.types.completion_create_params", "CompletionCreateParamsBase"),
    "/v1/moderations": ("openai.types.moderation_create_params", "ModerationCreateParams"),
    "/v1/images/generations": ("openai.types.image_generate_params", "ImageGenerateParamsBase"),
    "/v1/images/edits": ("openai.types.image_edit_params", "ImageEditParamsBase"),
    "/v1/videos": ("openai.types.video_create_params", "VideoCreateParams"),
}


def _marked(hint: Any, qualifier: Any) -> bool:
    """Whether a TypedDict key's hint is ``qualifier[...]`` (``Required``, ``NotRequired``), also in ``Annotated``."""
    origin = typing_extensions.get_origin(hint)
    if origin is typing_extensions.Annotated:
        return _marked(typing_extensions.get_args(hint)[0], qualifier)
    return origin is qualifier


@functools.cache
def required_fields(endpoint: str) -> frozenset[str]:
    """
    The body fields ``endpoint``'s SDK request type requires (chat: ``messages`` and ``model``; responses: none).

    The SDK's files postpone their annotations, so the TypedDict's own ``__required_keys__`` sees only its
    totality (``total=False`` everywhere in the SDK today); the ``Required[...]`` / ``NotRequired[...]`` marks are
    read from the resolved hints. A type the SDK no longer has is an error here, not a lenient fake.
    """
    where = REQUEST_TYPES.get(endpoint)
    if where is None:
        return frozenset()
    params = getattr(importlib.import_module(where[0]), where[1])
    hints = typing_extensions.get_type_hints(params, include_extras=True)
    by_totality = {name for name in params.__required_keys__ if not _marked(hints[name], typing_extensions.NotRequired)}
    return frozenset(by_totality | {name for name, hint in hints.items() if _marked(hint, typing_extensions.Required)})


@dataclass
class InputReport:
    """What OpenAI learns about an input file while validating a batch: the requests, or why the batch fails."""

    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    model: str | None = None
    #: ``BatchError`` dicts (``code``, ``line``, ``message``, ``param``) for ``batch.errors.data``.
    errors: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, line: int | None, param: str | None, message: str, code: str) -> None:
        if len(self.errors) < 100:
            self.errors.append({"code": code, "line": line, "message": message, "param": param})


def _inputs(value: Any) -> int:
    """``EmbeddingCreateParams.input``: a string or one token array is one input, an array of either is many."""
    if isinstance(value, list):
        return 1 if value and all(isinstance(v, int) for v in value) else len(value)
    return 1


def check_input(source: Path | Iterable[bytes], endpoint: str) -> InputReport:
    """Judge the input file at ``source``, a path or the lines of a file already open in binary (read from where it
    stands): the server opens the file as the batch is created and judges it later, as OpenAI validates a batch
    after answering its create."""
    report = InputReport()
    seen: set[str] = set()
    embedding_inputs = 0
    required = required_fields(endpoint)
    number = 0
    opened = source.open("rb") if isinstance(source, Path) else nullcontext(source)
    with opened as handle:  # a line is what ends in "\n"; the newline ending the last line adds no line
        for number, raw in enumerate(handle, start=1):
            body = _check_line(report, number, raw, endpoint, required, seen)
            if body is not None and endpoint == "/v1/embeddings":
                embedding_inputs += _inputs(body.get("input"))
    if number == 0:
        report.fail(None, None, "The input file is empty.", "empty_file")
    if len(report.requests) > MAX_REQUESTS:
        report.fail(None, None, f"The input file holds more than {MAX_REQUESTS:,} requests.", "too_many_tasks")
    if embedding_inputs > MAX_EMBEDDING_INPUTS:
        report.fail(
            None,
            "body.input",
            f"An embeddings batch holds at most {MAX_EMBEDDING_INPUTS:,} inputs; this one has {embedding_inputs:,}.",
            "too_many_embedding_inputs",
        )
    return report


def _check_line(
    report: InputReport, number: int, raw: bytes, endpoint: str, required: frozenset[str], seen: set[str]
) -> dict[str, Any] | None:
    """Judge one line; its body when it holds one (kept for answering), else ``None``."""
    if not raw.strip():
        # OpenAI documents one request per line and says nothing of empty lines: the stricter reading.
        report.fail(number, None, "Line is empty; each line must be a JSON request.", "invalid_json_line")
        return None
    try:
        line = json.loads(raw)  # JSON allows a trailing "\r" as whitespace: CRLF files parse
    except ValueError:
        report.fail(number, None, "This line is not parseable as valid JSON.", "invalid_json_line")
        return None
    if not isinstance(line, dict):
        report.fail(number, None, "Each line must be a JSON object.", "invalid_json_line")
        return None
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        report.fail(number, "custom_id", "Missing required parameter: 'custom_id'.", "missing_required_parameter")
    elif custom_id in seen:
        report.fail(number, "custom_id", f"Duplicate custom_id {custom_id!r}.", "duplicate_custom_id")
    else:
        seen.add(custom_id)
    if line.get("method") != "POST":
        report.fail(number, "method", "Only POST requests are supported.", "invalid_method")
    if line.get("url") != endpoint:
        report.fail(number, "url", f"The url must match the batch endpoint {endpoint!r}.", "mismatched_endpoint")
    body = line.get("body")
    if not isinstance(body, dict):
        report.fail(number, "body", "Missing required parameter: 'body'.", "missing_required_parameter")
        return None
    for name in sorted(required - body.keys()):
        report.fail(number, f"body.{name}", f"Missing required parameter: '{name}'.", "missing_required_parameter")
    model = body.get("model")
    if model is not None:
        if report.model is None:
            report.model = str(model)
        elif model != report.model:
            report.fail(number, "body.model", "Each file may only hold requests to one model.", "mismatched_model")
    if isinstance(custom_id, str) and custom_id:
        report.requests.append((custom_id, body))
    return body
