"""
Tokens of one Batch request: how many input tokens its body holds, and the most output it may produce.

Cost estimates, ``max_cost`` budgets and the enqueued-token planning of a job all start from these two numbers,
and a 1,000,000-request job's sharding pass asks for them once per line, so they are computed from the body dict
the caller has already decoded, with one tokenizer per encoding and process.

**Tokenizer.** Where the model's encoding is known (``o200k_base``: gpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, o1/o3/o4*;
``cl100k_base``: gpt-4, gpt-3.5, text-embedding-3*, text-embedding-ada-002, davinci-002, babbage-002; the
prefixes of tiktoken's ``model.py``), text is counted exactly with ``bpe-openai`` (a Rust BPE that ships both
encodings in its wheel and counts offline: "antidisestablishmentarianism" is 6 o200k tokens
``[493, 129901, 376, 160388, 21203, 2367]``, as in OpenAI's cookbook). Other models (a compatible server's own,
a new OpenAI family), or an environment without ``bpe-openai``, get :func:`heuristic_count`.

**Heuristic** (``HEURISTIC_RATIO``). ASCII text counts one token per 3.5 characters, any other character 1.2
tokens. Measured by ``python -m benchmarks.tokens`` against both encodings on Python's own documentation (English),
standard-library source (code), Airflow's JSON schemas (JSON) and Airflow's UI translations into 20 languages
(Latin with accents; Cyrillic, Greek, Arabic, Hebrew, Devanagari, Thai, CJK), 150 chunks of 100 to 3,000 characters
each, heuristic / true count: English 0.74-2.28, code 0.78-1.73, JSON 0.85-1.91, accented Latin 0.83-1.56, other
scripts 0.73-4.32 (o200k packs those 2-3 times tighter than cl100k; the heuristic keeps to the cl100k side). So it
undercounts by at most 27 % and otherwise overcounts, the safe side for a budget. Emoji were not measured.

**Chat framing** follows OpenAI's cookbook "How to count tokens with tiktoken" (``num_tokens_from_messages``):
3 tokens per message, 1 more for a ``name``, 3 to prime the reply; its function-tool formula (7 tokens per
function on o200k models, 10 on cl100k, 3 per property, 12 at the end). OpenAI's API returned the cookbook's
counts for its examples (129 and 124 prompt tokens for gpt-4 and gpt-4o; 105 and 101 with its weather tool); the
cookbook calls them "an estimate, not a timeless guarantee". The Responses API is counted the same way (each input
item and ``instructions`` a message): **undocumented**, an assumption. A JSON schema in ``response_format`` /
``text.format`` counts as its JSON text (an approximation). Images, audio, files, built-in tools and stored prompts
cannot be counted from the request: they are reported as ``uncounted_parts``, never guessed.

**Output.** ``max_completion_tokens`` (else ``max_tokens``) on chat, ``max_output_tokens`` on responses,
``max_tokens`` on completions (times prompts, times ``n`` / ``best_of``); ``None`` when the request sets no cap
(the SDK states no default). Embeddings and moderations produce no output tokens: 0.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgspec

log = logging.getLogger(__name__)

Tokenizer = Literal["o200k_base", "cl100k_base", "heuristic"]
Encoding = Literal["o200k_base", "cl100k_base"]

#: Longest prefix wins, after a fine-tune's ``ft:`` is removed and the name lower-cased.
MODEL_ENCODINGS: dict[str, Encoding] = {
    "gpt-4o": "o200k_base",
    "chatgpt-4o": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4.5": "o200k_base",
    "gpt-5": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5": "cl100k_base",
    "gpt-35": "cl100k_base",
    "text-embedding-3": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
    "davinci-002": "cl100k_base",
    "babbage-002": "cl100k_base",
}

#: The cookbook's framing: ``<|start|>{role}<|message|>{content}<|end|>`` per message, one more token for a name,
#: and ``<|start|>assistant<|message|>`` priming the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
#: The cookbook's ``num_tokens_for_tools`` constants: per function (by encoding), per property set, per property,
#: per enum set (negative: the cookbook's), per enum item, and once after the functions.
_FUNCTION_INIT: dict[Tokenizer, int] = {"o200k_base": 7, "cl100k_base": 10, "heuristic": 10}
_PROPERTIES_INIT = 3
_PROPERTY_KEY = 3
_ENUM_INIT = -3
_ENUM_ITEM = 3
_FUNCTIONS_END = 12

#: The heuristic's rates (see the module docstring for how they were measured).
ASCII_CHARS_PER_TOKEN = 3.5
NON_ASCII_TOKENS_PER_CHAR = 1.2
#: Heuristic count / true count on the measured corpus, lowest and highest (``python -m benchmarks.tokens``): it
#: undercounts by at most 27 %, and overcounts up to 4.3x only on non-Latin scripts that o200k packs tightly.
HEURISTIC_RATIO: tuple[float, float] = (0.73, 4.32)

CHAT_ENDPOINT = "/v1/chat/completions"
RESPONSES_ENDPOINT = "/v1/responses"
COMPLETIONS_ENDPOINT = "/v1/completions"
EMBEDDINGS_ENDPOINT = "/v1/embeddings"
MODERATIONS_ENDPOINT = "/v1/moderations"
_PROMPT_ENDPOINTS = frozenset({"/v1/images/generations", "/v1/images/edits", "/v1/videos"})
_NO_OUTPUT_ENDPOINTS = frozenset({EMBEDDINGS_ENDPOINT, MODERATIONS_ENDPOINT})


@dataclass(frozen=True)
class TextCounter:
    """Counts the tokens of a text with one tokenizer; get one with :func:`counter_for_model`."""

    tokenizer: Tokenizer
    count: Callable[[str], int]
    #: ``count`` / the true count on text, lowest and highest: ``(1.0, 1.0)`` for a real tokenizer,
    #: ``HEURISTIC_RATIO`` for the heuristic. The true count lies within ``count / high`` .. ``count / low``.
    ratio: tuple[float, float]


class RequestTokens(NamedTuple):
    input_tokens: int
    #: The most output tokens the request may produce; ``None`` when it sets no cap.
    max_output_tokens: int | None
    #: Inputs whose tokens cannot be known from the request: images, audio, files, built-in tools, stored prompts.
    uncounted_parts: int


def heuristic_count(text: str) -> int:
    """Tokens of ``text`` without a tokenizer: one per 3.5 ASCII characters, 1.2 per other character, at least 1."""
    if not text:
        return 0
    if text.isascii():
        return max(1, math.ceil(len(text) / ASCII_CHARS_PER_TOKEN))
    ascii_chars = len(text.encode("ascii", "ignore"))
    other = len(text) - ascii_chars
    return max(1, math.ceil(ascii_chars / ASCII_CHARS_PER_TOKEN + other * NON_ASCII_TOKENS_PER_CHAR))


HEURISTIC = TextCounter("heuristic", heuristic_count, HEURISTIC_RATIO)


def encoding_for_model(model: str | None) -> Encoding | None:
    """The encoding of an OpenAI model (``"o200k_base"``, ``"cl100k_base"``), or ``None`` when it is not known."""
    if not model:
        return None
    name = model.lower().removeprefix("ft:")
    best = max((prefix for prefix in MODEL_ENCODINGS if name.startswith(prefix)), key=len, default=None)
    return MODEL_ENCODINGS[best] if best is not None else None


def _bindings() -> Any:
    """
    ``bpe_openai``'s compiled tokenizer module, loaded without running the package's ``__init__``.

    The package's ``__init__`` decodes all three of its vocabularies into Python dicts at import (1.1 s and 71 MB
    here) for a tiktoken-style API this module does not use; the compiled module carries its own copies. It is
    registered under its usual name, so a later ``import bpe_openai`` elsewhere in the process reuses it.
    """
    name = "bpe_openai._bindings"
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("bpe_openai")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_bindings" + suffix)
            if not os.path.isfile(path):
                continue
            loader = importlib.machinery.ExtensionFileLoader(name, path)
            module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
            if module_spec is None:  # pragma: no cover - a file location always gives a spec
                break
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
    return importlib.import_module(name)  # a layout this loader does not know: the ordinary (slower) import


@functools.cache
def _exact_counter(encoding: Encoding) -> TextCounter | None:
    try:
        tokenizer = _bindings().tokenizer_for_encoding(encoding)
        native_count = tokenizer.count
    except Exception as error:  # bpe-openai missing, or a platform without its wheel: fall back, say so once
        log.warning("No %s tokenizer (%s); token counts use the byte heuristic instead", encoding, error)
        return None

    def count(text: str) -> int:
        if not text:
            return 0
        try:
            return int(native_count(text))
        except UnicodeEncodeError:  # lone surrogates (JSON "\ud800"): counted as the replacement character
            return int(native_count(text.encode("utf-8", "replace").decode("utf-8")))

    return TextCounter(encoding, count, (1.0, 1.0))


@functools.lru_cache(maxsize=256)
def counter_for_model(model: str | None) -> TextCounter:
    """The counter for ``model``: its real tokenizer when its encoding is known and available, else the heuristic."""
    encoding = encoding_for_model(model)
    if encoding is None:
        return HEURISTIC
    return _exact_counter(encoding) or HEURISTIC


# --- input tokens, per endpoint ----------------------------------------------------------------------


class _Tally:
    __slots__ = ("count", "tokens", "uncounted")

    def __init__(self, count: Callable[[str], int]) -> None:
        self.count = count
        self.tokens = 0
        self.uncounted = 0

    def text(self, value: Any) -> None:
        if isinstance(value, str):
            self.tokens += self.count(value)

    def json(self, value: Any) -> None:
        if value is not None:
            self.tokens += self.count(value if isinstance(value, str) else json.dumps(value, separators=(",", ":")))


def _is_token_array(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def _prompt_like(tally: _Tally, value: Any) -> int:
    """A string, a list of strings, a token array (its length) or a list of token arrays; returns how many inputs."""
    if isinstance(value, str):
        tally.text(value)
        return 1
    if isinstance(value, list):
        if _is_token_array(value):
            tally.tokens += len(value)
            return 1
        for item in value:
            if isinstance(item, list):
                tally.tokens += len(item)
            else:
                tally.text(item)
        return len(value)
    return 0


def _content(tally: _Tally, content: Any) -> None:
    """A message's ``content``: a string, or parts (text counted; images, audio, files reported as uncounted)."""
    if isinstance(content, str):
        tally.text(content)
        return
    if not isinstance(content, list):
        return
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            tally.text(part.get("text"))
        elif kind == "refusal":
            tally.text(part.get("refusal"))
        else:  # image_url, input_image, input_audio, file, input_file, ...
            tally.uncounted += 1


def _chat_messages(tally: _Tally, messages: Any) -> None:
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        tally.tokens += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                _content(tally, value)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    function = call.get("function") if isinstance(call, Mapping) else None
                    if isinstance(function, Mapping):
                        tally.text(function.get("name"))
                        tally.text(function.get("arguments"))
            elif key == "function_call" and isinstance(value, Mapping):
                tally.text(value.get("name"))
                tally.text(value.get("arguments"))
            else:
                tally.text(value)
                if key == "name":
                    tally.tokens += TOKENS_PER_NAME
    tally.tokens += REPLY_PRIMING


def _without_period(text: Any) -> str:
    text = text if isinstance(text, str) else ""
    return text[:-1] if text.endswith(".") else text


def _tools(tally: _Tally, tools: Any, tokenizer: Tokenizer) -> None:
    """Function tools by the cookbook's formula (chat's nested ``function`` or the Responses API's flat form)."""
    if not isinstance(tools, list) or not tools:
        return
    functions = 0
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        nested = tool.get("function")
        function: Mapping[str, Any] = nested if isinstance(nested, Mapping) else tool
        if tool.get("type") != "function" or not isinstance(function.get("name"), str):
            tally.uncounted += 1  # built-in tools (web_search, file_search, ...) add tokens OpenAI does not state
            continue
        functions += 1
        tally.tokens += _FUNCTION_INIT[tokenizer]
        tally.text(f"{function['name']}:{_without_period(function.get('description'))}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if isinstance(properties, Mapping) and properties:
            tally.tokens += _PROPERTIES_INIT
            for key, schema in properties.items():
                tally.tokens += _PROPERTY_KEY
                schema = schema if isinstance(schema, Mapping) else {}
                enum = schema.get("enum")
                if isinstance(enum, list):
                    tally.tokens += _ENUM_INIT
                    for item in enum:
                        tally.tokens += _ENUM_ITEM
                        tally.text(item if isinstance(item, str) else json.dumps(item))
                kind = schema.get("type")
                tally.text(
                    f"{key}:{kind if isinstance(kind, str) else ''}:{_without_period(schema.get('description'))}"
                )
    if functions:
        tally.tokens += _FUNCTIONS_END


def _schema_format(tally: _Tally, fmt: Any) -> None:
    """A structured-output format (``{"type": "json_schema", ...}``): its schema counted as JSON text."""
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        nested = fmt.get("json_schema")
        inner: Mapping[str, Any] = nested if isinstance(nested, Mapping) else fmt
        tally.json(inner.get("schema"))


def _responses_input(tally: _Tally, body: Mapping[str, Any]) -> None:
    framed = False
    instructions = body.get("instructions")
    if isinstance(instructions, str):  # "a system (or developer) message inserted into the model's context"
        tally.tokens += TOKENS_PER_MESSAGE
        tally.text("developer")
        tally.text(instructions)
        framed = True
    items = body.get("input")
    if isinstance(items, str):  # a text input: one user message
        tally.tokens += TOKENS_PER_MESSAGE
        tally.text("user")
        tally.text(items)
        framed = True
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, Mapping):
                continue
            kind = item.get("type", "message")
            if kind == "message" or "role" in item:
                tally.tokens += TOKENS_PER_MESSAGE
                tally.text(item.get("role"))
                _content(tally, item.get("content"))
            elif kind == "function_call":
                tally.tokens += TOKENS_PER_MESSAGE
                tally.text(item.get("name"))
                tally.text(item.get("arguments"))
            elif kind == "function_call_output":
                tally.tokens += TOKENS_PER_MESSAGE
                tally.text(item.get("output"))
            else:  # item_reference, reasoning, computer_call_output, ...: not countable from the request
                tally.uncounted += 1
                continue
            framed = True
    if framed:
        tally.tokens += REPLY_PRIMING
    for key in ("prompt", "previous_response_id", "conversation"):  # context stored at OpenAI, not in the request
        if body.get(key) is not None:
            tally.uncounted += 1
    text = body.get("text")
    if isinstance(text, Mapping):
        _schema_format(tally, text.get("format"))


def _strings(tally: _Tally, value: Any) -> None:
    if isinstance(value, str):
        tally.text(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key != "model":
                _strings(tally, item)
    elif isinstance(value, list):
        for item in value:
            _strings(tally, item)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def max_output_tokens(body: Mapping[str, Any], endpoint: str | None) -> int | None:
    """The most output tokens a request may produce (see the module docstring); ``None`` when it sets no cap."""
    if endpoint in _NO_OUTPUT_ENDPOINTS:
        return 0
    if endpoint == RESPONSES_ENDPOINT:
        return _int(body.get("max_output_tokens"))
    choices = _int(body.get("n")) or 1
    if endpoint == COMPLETIONS_ENDPOINT:
        cap = _int(body.get("max_tokens"))
        if cap is None:
            return None
        prompt = body.get("prompt")
        prompts = 1 if not isinstance(prompt, list) or _is_token_array(prompt) else max(1, len(prompt))
        return cap * prompts * max(choices, _int(body.get("best_of")) or 1)
    cap = _int(body.get("max_completion_tokens"))
    if cap is None:
        cap = _int(body.get("max_tokens"))
    if cap is None and endpoint != CHAT_ENDPOINT:
        cap = _int(body.get("max_output_tokens"))
    return None if cap is None else cap * choices


def request_tokens(body: Mapping[str, Any], endpoint: str | None, counter: TextCounter | None = None) -> RequestTokens:
    """
    Input tokens, output cap and uncounted parts of one request ``body`` (a line's decoded ``body``) sent to
    ``endpoint``; ``counter`` defaults to the one for the body's ``model``.
    """
    if counter is None:
        model = body.get("model")
        counter = counter_for_model(model if isinstance(model, str) else None)
    tally = _Tally(counter.count)
    if endpoint == CHAT_ENDPOINT:
        _chat_messages(tally, body.get("messages"))
        _tools(tally, body.get("tools"), counter.tokenizer)
        _schema_format(tally, body.get("response_format"))
    elif endpoint == RESPONSES_ENDPOINT:
        _responses_input(tally, body)
        _tools(tally, body.get("tools"), counter.tokenizer)
    elif endpoint == COMPLETIONS_ENDPOINT:
        _prompt_like(tally, body.get("prompt"))
        tally.text(body.get("suffix"))
    elif endpoint == EMBEDDINGS_ENDPOINT:
        _prompt_like(tally, body.get("input"))
    elif endpoint == MODERATIONS_ENDPOINT:
        value = body.get("input")
        if isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
            _content(tally, value)
        else:
            _prompt_like(tally, value)
    elif endpoint in _PROMPT_ENDPOINTS:
        tally.text(body.get("prompt"))
        if endpoint == "/v1/images/edits":
            tally.uncounted += 1  # the image being edited
    else:  # an endpoint of a compatible server: every string but the model name
        _strings(tally, body)
    return RequestTokens(tally.tokens, max_output_tokens(body, endpoint), tally.uncounted)


def input_tokens(body: Mapping[str, Any], endpoint: str | None, counter: TextCounter | None = None) -> int:
    """The input tokens of one request body (``request_tokens(...).input_tokens``)."""
    return request_tokens(body, endpoint, counter).input_tokens


class _Line(msgspec.Struct):
    body: dict[str, Any] = {}


_line_decoder = msgspec.json.Decoder(_Line)


def queue_load(counted: RequestTokens) -> int:
    """
    What one counted request holds in its model's enqueued-token queue: its input tokens plus its output cap when
    it sets one, at least 1. OpenAI does not say whether the cap counts; this takes the stricter reading (the job
    then never plans a batch the queue would refuse on that account).
    """
    return max(1, counted.input_tokens + (counted.max_output_tokens or 0))


def queue_tokens(raw: bytes, endpoint: str | None) -> int:
    """``queue_load`` of one request line (the job's sharder and scheduler count with it)."""
    return queue_load(request_tokens(_line_decoder.decode(raw).body, endpoint))
