"""
Deterministic answers for each Batch endpoint, in OpenAI's output and error line shapes.

Every answer is a pure function of the request, so a test can compute what it expects and a retried batch
yields byte-identical results. A request that asks for structured output (chat's ``response_format``, responses'
``text.format`` of type ``json_schema``) is answered with JSON valid for its schema, generated from the schema and
the ``custom_id``; ``fake_output`` in a body makes the answer a refusal, a truncated one or one that breaks the
schema (see :func:`output_fate`). An answer never holds more tokens than the request's output cap
(:func:`output_cap`): one that would is cut there and ends as OpenAI ends it at the limit (``finish_reason:
"length"``, a Responses ``status: "incomplete"``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from airflow_provider_openai_batch.testing import tokens as queue_tokens

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
    """A stable, plausible token count of an answer's text: about one token per four characters."""
    return max(1, (len(text) + 3) // 4)


def _prompt_tokens(url: str, body: Body) -> int:
    """
    A request's ``usage`` input tokens: its whole input as OpenAI's tokenizers cut it, with the message framing of
    OpenAI's token-counting cookbook (the fake's own counter, ``testing/tokens.py``, without the output cap).
    """
    return max(1, queue_tokens.input_tokens(url, body))


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


def output_cap(url: str, body: Body) -> int | None:
    """
    The most tokens the request lets the model generate: chat ``max_completion_tokens`` (else the deprecated
    ``max_tokens``), responses ``max_output_tokens``, completions ``max_tokens``; ``None`` when it sets none.
    """
    if url.endswith("/chat/completions"):
        keys: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    elif url.endswith("/responses"):
        keys = ("max_output_tokens",)
    elif url.endswith("/completions"):
        keys = ("max_tokens",)
    else:
        return None
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(1, value)
    return None


def _generated(url: str, body: Body) -> tuple[int, int | None]:
    """
    (output tokens, the cap the answer was cut at or ``None``): the echo's tokens, at most the request's cap. The
    count follows the echo for every text answer (a structured one too), so ``usage_of`` needs no ``custom_id``.
    """
    natural = _tokens(answer_text(body))
    cap = output_cap(url, body)
    if cap is not None and natural > cap:
        return cap, cap
    return natural, None


def _cut(text: str, cap: int) -> str:
    """The first ``cap`` tokens of ``text`` (four characters each, as ``_tokens`` counts them)."""
    return text[: cap * 4]


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
    # Usage follows the echo for every answer, so the batch's usage (``usage_of``) is the sum of its lines'.
    p_tokens, (c_tokens, cut_at) = _prompt_tokens(url, body), _generated(url, body)
    fate = output_fate(custom_id, body)
    schema = requested_schema(url, body)
    if schema is not None or fate is not None:
        text = _structured_text(schema, custom_id, fate, text)
    if cut_at is not None and fate != "refused":  # the model stops at the cap: a truncated answer
        text, fate = _cut(text, cut_at), "truncated"
    if url.endswith("/chat/completions"):
        message: Body = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        if fate == "refused":
            message.update(content=None, refusal=REFUSAL)
        return {
            "id": f"chatcmpl-{ident}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "length" if fate == "truncated" else "stop",
                }
            ],
            "usage": _usage_chat(p_tokens, c_tokens),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
    if url.endswith("/responses"):
        part: Body = {"type": "output_text", "text": text, "annotations": []}
        if fate == "refused":
            part = {"type": "refusal", "refusal": REFUSAL}
        answer: Body = {
            "id": f"resp_{ident}",
            "object": "response",
            "created_at": created,
            "status": "incomplete" if fate == "truncated" else "completed",
            "model": model,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{ident}",
                    "status": "incomplete" if fate == "truncated" else "completed",
                    "role": "assistant",
                    "content": [part],
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
        if fate == "truncated":
            answer["incomplete_details"] = {"reason": "max_output_tokens"}
        if isinstance(body.get("text"), dict):  # a Response repeats the request's text settings
            answer["text"] = body["text"]
        return answer
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
            "choices": [
                {
                    "text": "" if fate == "refused" else text,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": {"truncated": "length", "refused": "content_filter"}.get(fate or "", "stop"),
                }
            ],
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
    prompt = _prompt_tokens(url, body)
    if "/images/" in url:
        return prompt, 272 * int(body.get("n", 1) or 1)
    if url.endswith("/embeddings"):
        return prompt, 0
    return prompt, _generated(url, body)[0]


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


# --- structured outputs -----------------------------------------------------------------------------------

#: What the fake model says when ``fake_output`` makes it refuse (``message.refusal``, a ``refusal`` part).
REFUSAL = "I'm sorry, but I can't help with that request."
FATES = ("invalid", "refused", "truncated")


def output_fate(custom_id: str, body: Body) -> str | None:
    """
    What ``fake_output`` in a request body asks of its answer: ``"invalid"`` (JSON that breaks the schema, or text
    that is not JSON), ``"refused"`` or ``"truncated"``; or a share of each, ``{"invalid": 0.1, "refused": 0.05}``,
    drawn from the ``custom_id`` (the same request always draws the same). ``None``: a normal answer.
    """
    spec = body.get("fake_output")
    if isinstance(spec, str):
        return spec if spec in FATES else None
    if not isinstance(spec, dict):
        return None
    draw = int(_digest("fate", custom_id)[:8], 16) / 2**32
    for fate in FATES:
        share = spec.get(fate)
        if isinstance(share, (int, float)):
            if draw < share:
                return fate
            draw -= share
    return None


def requested_schema(url: str, body: Body) -> Body | None:
    """The JSON Schema a request asks its answer to follow (chat: ``response_format``; responses: ``text.format``)."""
    if url.endswith("/chat/completions"):
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            return schema if isinstance(schema, dict) else {}
    elif url.endswith("/responses"):
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            return fmt["schema"] if isinstance(fmt.get("schema"), dict) else {}
    return None


def _structured_text(schema: Body | None, custom_id: str, fate: str | None, echo: str) -> str:
    """The answer's text: JSON for the schema, or what ``fate`` makes of it."""
    full = echo if schema is None else json.dumps(schema_value(schema, custom_id), separators=(",", ":"))
    if fate == "truncated":
        return full[: max(1, len(full) // 2)]
    if fate == "invalid":
        return "This is not JSON." if schema is None else json.dumps({"fake_invalid_output": True})
    return full


def schema_value(schema: Body, seed: str) -> Any:
    """A value valid for ``schema`` (strict structured outputs' subset of JSON Schema), the same for the same seed."""
    return _value(schema, schema, seed, 0)


_FORMAT_EXAMPLES = {
    "date-time": "2026-01-02T03:04:05Z",
    "time": "03:04:05",
    "date": "2026-01-02",
    "duration": "P1DT2H",
    "email": "someone@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.7",
    "ipv6": "2001:db8::7",
}


def _pick(seed: str, count: int) -> int:
    return int(_digest("pick", seed)[:8], 16) % count


def _value(node: Any, root: Body, seed: str, depth: int) -> Any:
    if not isinstance(node, dict):
        return None
    if "$ref" in node:
        target: Any = root
        for part in str(node["$ref"]).lstrip("#").strip("/").split("/"):
            target = target.get(part, {}) if part and isinstance(target, dict) else target
        return _value(target, root, seed, depth + 1)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][_pick(seed, len(node["enum"]))]
    if "anyOf" in node:
        variants = node["anyOf"]
        if depth > 6:  # a recursive schema ends where it can
            simple = [v for v in variants if isinstance(v, dict) and v.get("type") == "null"]
            variants = simple or variants
        return _value(variants[_pick(seed, len(variants))], root, seed + "|", depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null" or depth > 6] or kind
        return _value({**node, "type": kinds[_pick(seed, len(kinds))]}, root, seed + "|", depth)
    if kind == "object" or "properties" in node:
        return {
            name: _value(child, root, f"{seed}/{name}", depth + 1) for name, child in node.get("properties", {}).items()
        }
    if kind == "array":
        low, high = int(node.get("minItems", 0)), node.get("maxItems")
        count = low if depth > 6 else max(low, 2)
        count = min(count, int(high)) if high is not None else count
        return [_value(node.get("items", {}), root, f"{seed}[{i}]", depth + 1) for i in range(count)]
    if kind == "integer" or kind == "number":
        return _number(node, seed, kind == "integer")
    if kind == "boolean":
        return _pick(seed, 2) == 0
    if kind == "null":
        return None
    return _string(node, seed)


def _number(node: Body, seed: str, integer: bool) -> int | float:
    low: Any = node.get("minimum", node.get("exclusiveMinimum", 0))
    high: Any = node.get("maximum", node.get("exclusiveMaximum", low + 100))
    step: Any = node.get("multipleOf", 1 if integer else 0.25)
    first = -(-low // step) * step  # the smallest multiple of step not below low
    if "exclusiveMinimum" in node and first <= node["exclusiveMinimum"]:
        first += step
    last = (high // step) * step
    if "exclusiveMaximum" in node and last >= node["exclusiveMaximum"]:
        last -= step
    steps = max(0, int((last - first) // step))
    value = first + step * _pick(seed, steps + 1)
    return int(value) if integer else float(value)


def _string(node: Body, seed: str) -> str:
    if node.get("format") == "uuid":
        digest = _digest("uuid", seed)
        return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"
    text = _FORMAT_EXAMPLES.get(str(node.get("format")), f"text {_digest('text', seed)[:8]}")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        candidates = [text, "abc", "ABC", "123", "a1", "A1", "abc123", "a", "A", "0", ""]
        candidates += list(_FORMAT_EXAMPLES.values())
        for candidate in candidates:
            if re.search(pattern, candidate):
                return candidate
    return text
