"""
How the fake server counts the tokens a batch puts in its model's enqueued-token queue.

OpenAI limits the prompt tokens a model's batches may hold enqueued (the Batch guide's "Enqueued prompt tokens per
model") but does not say how it counts them. This module is the fake's answer, the stricter reading throughout
(``CONTRACT.md``, section "The account"): each request counts the tokens of its input as OpenAI's tokenizers cut
them, the message overheads of OpenAI's token-counting cookbook, and its output cap when it sets one.

It is written apart from the provider's own counter on purpose, like ``input_rules``: a rule that is wrong on both
sides at once could not be caught by a test.

Counting uses ``bpe-openai`` (OpenAI's ``o200k_base`` and ``cl100k_base`` encodings, shipped inside the wheel, no
network) when it is installed; otherwise a byte heuristic that counts high (``tokenizer_name()`` says which).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any, Final

#: OpenAI's token-counting cookbook ("How to count tokens with tiktoken"): every chat message costs 3 tokens on top of
#: its values, a ``name`` one more, and every reply is primed with 3.
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING: Final = 3
#: An image part: what a 1024x1024 high-detail image costs on gpt-4o (85 + 4 tiles x 170, OpenAI's vision guide),
#: whatever its URL or data says; OpenAI does not say what an image costs in the queue.
IMAGE_TOKENS: Final = 765
#: Longer texts are counted in pieces of at most this many characters (the tokenizer refuses very long inputs).
PIECE_CHARS: Final = 40_000
#: Without a tokenizer: one token per this many UTF-8 bytes, rounded up (English runs near four; code and other
#: scripts nearer three, so three counts high).
BYTES_PER_TOKEN: Final = 3

#: Model name prefixes and their encodings, longest first (as tiktoken maps them); any other model: ``o200k_base``.
_ENCODINGS: Final = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),
    ("gpt-4", "cl100k_base"),
    ("text-embedding-", "cl100k_base"),
    ("davinci-002", "cl100k_base"),
    ("babbage-002", "cl100k_base"),
)
_IMAGE_PART_TYPES: Final = frozenset({"image_url", "input_image", "image"})


def encoding_for(model: str | None) -> str:
    """The encoding OpenAI's tokenizer uses for ``model``: ``cl100k_base`` for the GPT-4 / 3.5 and embedding models,
    ``o200k_base`` for the rest (gpt-4o, gpt-4.1, gpt-5, the o-series, and any model this table does not know)."""
    name = (model or "").lower()
    for prefix, encoding in _ENCODINGS:
        if name.startswith(prefix):
            return encoding
    return "o200k_base"


@cache
def _encoder(encoding: str) -> Callable[[str], list[int]] | None:
    try:
        import bpe_openai
    except ImportError:
        return None
    return bpe_openai.get_encoding(encoding).encode_ordinary


def tokenizer_name() -> str:
    """Which counter is in use: ``"bpe-openai"``, or the byte heuristic when that package is not installed."""
    return "bpe-openai" if _encoder("o200k_base") is not None else f"utf-8 bytes / {BYTES_PER_TOKEN}"


def _by_bytes(text: str) -> int:
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def count_text(text: str, encoding: str = "o200k_base") -> int:
    """Tokens of ``text`` as plain text (special-token markers count as text, as in a request body)."""
    if not text:
        return 0
    encode = _encoder(encoding)
    if encode is None:
        return _by_bytes(text)
    total = start = 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            # Cut before a space, where the tokenizer would start a new token anyway: the sum stays exact.
            space = text.rfind(" ", start + PIECE_CHARS // 2, end)
            end = space if space > 0 else end
        piece = text[start:end]
        try:
            total += len(encode(piece))
        except ValueError:  # the tokenizer's own length guard, or text it cannot encode
            total += _by_bytes(piece)
        start = end
    return total


def _values(value: Any, encoding: str) -> int:
    """Tokens of every string anywhere in ``value`` (dict keys excluded); an image part counts ``IMAGE_TOKENS``."""
    if isinstance(value, str):
        return IMAGE_TOKENS if value.startswith("data:image/") else count_text(value, encoding)
    if isinstance(value, dict):
        if value.get("type") in _IMAGE_PART_TYPES:
            return IMAGE_TOKENS
        return sum(_values(item, encoding) for item in value.values())
    if isinstance(value, list):
        return sum(_values(item, encoding) for item in value)
    return 0


def _messages(messages: Any, encoding: str) -> int:
    if not isinstance(messages, list):
        return _values(messages, encoding)
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE + _values(message, encoding)
        if isinstance(message, dict) and "name" in message:
            total += TOKENS_PER_NAME
    return total


def _prompt(value: Any, encoding: str) -> int:
    """``prompt`` / embeddings ``input``: a string, strings, one token array (its length) or token arrays."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value)
    if isinstance(value, list):
        return sum(_prompt(v, encoding) for v in value)
    return _values(value, encoding)


def _json(value: Any, encoding: str) -> int:
    return count_text(json.dumps(value, sort_keys=True), encoding) if value else 0


def input_tokens(endpoint: str, body: dict[str, Any], model: str | None = None) -> int:
    """The input tokens of one request body (``model`` when the body names none, e.g. a stored prompt)."""
    encoding = encoding_for(body.get("model") if isinstance(body.get("model"), str) else model)
    if endpoint.endswith("/chat/completions"):
        tools = _json(body.get("tools"), encoding) + _json(body.get("functions"), encoding)
        return _messages(body.get("messages"), encoding) + tools + _json(body.get("response_format"), encoding)
    if endpoint.endswith("/responses"):
        given = body.get("input")  # a string is one user message
        items = _messages(given if isinstance(given, list) else [{"role": "user", "content": given}], encoding)
        items = items if given else 0
        extras = _values(body.get("instructions"), encoding) + _json(body.get("tools"), encoding)
        return items + extras + _json(body.get("text"), encoding)
    if endpoint.endswith("/completions") or endpoint.endswith("/embeddings"):
        return _prompt(body.get("prompt") if endpoint.endswith("/completions") else body.get("input"), encoding)
    if endpoint.endswith("/moderations"):
        return _values(body.get("input"), encoding)
    if "/images/" in endpoint or endpoint.endswith("/videos"):
        return _values(body.get("prompt"), encoding)
    # A compatible server's own endpoint: the whole body as text.
    return _json({k: v for k, v in body.items() if not k.startswith("fake_")}, encoding)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def output_cap(endpoint: str, body: dict[str, Any]) -> int:
    """The most output tokens the request allows itself, when it sets a cap: ``max_completion_tokens`` /
    ``max_tokens`` (chat, completions) or ``max_output_tokens`` (responses), times the choices asked for."""
    if endpoint.endswith("/responses"):
        return _int(body.get("max_output_tokens"))
    if endpoint.endswith("/chat/completions") or endpoint.endswith("/completions"):
        cap = max(_int(body.get("max_completion_tokens")), _int(body.get("max_tokens")))
        return cap * max(1, _int(body.get("n")), _int(body.get("best_of")))
    return 0


def request_tokens(endpoint: str, body: dict[str, Any], *, model: str | None = None, with_cap: bool = True) -> int:
    """What one request adds to its model's queue: its input tokens, plus its output cap when ``with_cap``."""
    return input_tokens(endpoint, body, model) + (output_cap(endpoint, body) if with_cap else 0)


def batch_tokens(
    endpoint: str, bodies: Iterable[dict[str, Any]], *, model: str | None = None, with_cap: bool = True
) -> int:
    """What a batch adds to its model's queue: the sum over its requests."""
    return sum(request_tokens(endpoint, body, model=model, with_cap=with_cap) for body in bodies)
