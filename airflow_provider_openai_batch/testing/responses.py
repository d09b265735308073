"""
Deterministic answers for each Batch endpoint, in OpenAI's output and error line shapes.

Every answer is a pure function of the request, so a test can compute what it expects and a retried batch
yields byte-identical results.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

Body = dict[str, Any]


MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _tokens(text: str) -> int:
    """A stable, plausible token count: about one token per four characters."""
    return max(1, (len(text) + 3) // 4)


def _prompt_text(body: Body) -> str:
    """The text a model would answer, found where each endpoint keeps it."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        content = messages[-1].get("content") if isinstance(messages[-1], dict) else messages[-1]
        if isinstance(content, list):
            return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return str(content)
    for key in ("input", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return " ".join(v if isinstance(v, str) else json.dumps(v, sort_keys=True) for v in value)
    return json.dumps(body, sort_keys=True)


def answer_text(body: Body) -> str:
    """The completion text every text endpoint returns: an echo the tests can predict."""
    return f"echo: {_prompt_text(body)}"


def _usage_chat(prompt: int, completion: int) -> Body:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def embedding_vector(text: str, dimensions: int = 8) -> list[float]:
    raw = hashlib.sha256(text.encode()).digest()
    return [round((raw[i % len(raw)] - 128) / 128.0, 6) for i in range(dimensions)]


def response_body(url: str, body: Body, custom_id: str, created: int) -> Body:
    """The 200 response body OpenAI would give for one request to ``url``."""
    model = str(body.get("model", ""))
    ident = _digest(custom_id, url, json.dumps(body, sort_keys=True))[:24]
    prompt = _prompt_text(body)
    text = answer_text(body)
    p_tokens, c_tokens = _tokens(prompt), _tokens(text)
    if url.endswith("/chat/completions"):
        return {
            "id": f"chatcmpl-{ident}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage_chat(p_tokens, c_tokens),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
    if url.endswith("/responses"):
        return {
            "id": f"resp_{ident}",
            "object": "response",
            "created_at": created,
            "status": "completed",
            "model": model,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{ident}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": p_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": c_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": p_tokens + c_tokens,
            },
        }
    if url.endswith("/embeddings"):
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        dims = int(body.get("dimensions", 8) or 8)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": embedding_vector(str(item), dims)}
                for i, item in enumerate(items)
            ],
            "model": model,
            "usage": {"prompt_tokens": p_tokens, "total_tokens": p_tokens},
        }
    if url.endswith("/completions"):
        return {
            "id": f"cmpl-{ident}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage_chat(p_tokens, c_tokens),
        }
    if url.endswith("/moderations"):
        flagged = "flag" in prompt.lower()
        return {
            "id": f"modr-{ident}",
            "model": model,
            "results": [
                {
                    "flagged": flagged,
                    "categories": {c: flagged and c == "harassment" for c in MODERATION_CATEGORIES},
                    "category_scores": {
                        c: (0.9 if flagged and c == "harassment" else 0.001) for c in MODERATION_CATEGORIES
                    },
                    "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
                }
            ],
        }
    if url.endswith("/images/generations") or url.endswith("/images/edits"):
        # ``ImagesResponse``: GPT image models return base64 data (``Image.b64_json``) and token usage.
        count = int(body.get("n", 1) or 1)
        return {
            "created": created,
            "data": [{"b64_json": base64.b64encode(_digest(ident, str(i)).encode()).decode()} for i in range(count)],
            "usage": {
                "input_tokens": p_tokens,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": p_tokens},
                "output_tokens": 272 * count,
                "total_tokens": p_tokens + 272 * count,
            },
        }
    if url.endswith("/videos"):
        # ``Video``: the job object, as ``POST /v1/videos`` answers it.
        return {
            "id": f"video_{ident}",
            "object": "video",
            "model": model or "sora-2",
            "status": "queued",
            "progress": 0,
            "created_at": created,
            "prompt": prompt,
            "seconds": str(body.get("seconds", "4")),
            "size": str(body.get("size", "720x1280")),
        }
    # A compatible server's own endpoint: echo back, so users of other endpoints can still test.
    return {"id": f"fake-{ident}", "object": "fake.response", "model": model, "output": text}


def usage_of(url: str, body: Body) -> tuple[int, int]:
    """(input tokens, output tokens) of one successful answer, for the batch's ``usage`` totals."""
    if url.endswith("/moderations") or url.endswith("/videos"):
        return 0, 0
    if "/images/" in url:
        count = int(body.get("n", 1) or 1)
        return _tokens(_prompt_text(body)), 272 * count
    prompt = _tokens(_prompt_text(body))
    if url.endswith("/embeddings"):
        return prompt, 0
    return prompt, _tokens(answer_text(body))


def output_line(custom_id: str, url: str, body: Body, created: int, quirks: bool = False) -> Body:
    ident = _digest("line", custom_id)[:24]
    answer: Any = response_body(url, body, custom_id, created)
    return {
        "id": f"batch_req_{ident}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": f"req_{ident}",
            # Compatible servers seen in the wild send the body JSON-encoded as a string.
            "body": json.dumps(answer) if quirks else answer,
        },
        "error": None,
    }


def failed_request_line(custom_id: str, spec: Any, quirks: bool = False) -> Body:
    """
    A request marked with ``fake_error`` in its body: goes to the error file. ``{"status_code": 400, ...}``: the
    model endpoint answered with an error (``response.status_code`` and ``response.body.error``).
    ``{"error_code": "request_timeout"}``: the request did not run to an answer (``response`` null, ``error`` set).
    """
    spec = spec if isinstance(spec, dict) else {}
    ident = _digest("line", custom_id)[:24]
    if "error_code" in spec:
        return {
            "id": f"batch_req_{ident}",
            "custom_id": custom_id,
            "response": None,
            "error": _error(str(spec["error_code"]), str(spec.get("message", "The request timed out.")), quirks),
        }
    status = int(spec.get("status_code", 400))
    error: Body = {
        "message": str(spec.get("message", "The request was rejected by the fake model.")),
        "type": str(spec.get("type", "invalid_request_error")),
        "param": spec.get("param"),
        "code": spec.get("code", "fake_error"),
    }
    if quirks:
        error.pop("code")
    return {
        "id": f"batch_req_{ident}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{ident}", "body": {"error": error}},
        "error": None,
    }


def _error(code: str, message: str, quirks: bool) -> Body:
    """A result line's ``error``; compatible servers seen in the wild send an error ``type`` and no ``code``."""
    return {"type": code, "message": message} if quirks else {"code": code, "message": message}


def unprocessed_line(custom_id: str, reason: str, quirks: bool = False) -> Body:
    """A request that never ran: ``batch_expired`` or ``batch_cancelled`` (OpenAI's Batch guide)."""
    messages = {
        "batch_expired": "This request could not be executed before the completion window expired.",
        "batch_cancelled": "This request was not executed because the batch was cancelled.",
    }
    ident = _digest("line", custom_id)[:24]
    return {
        "id": f"batch_req_{ident}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": reason, "message": messages[reason]},
    }
