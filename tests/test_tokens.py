"""Token counts of request bodies: OpenAI's own published counts, each endpoint's input shapes, output caps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from airflow_provider_openai_batch import tokens
from airflow_provider_openai_batch.tokens import (
    HEURISTIC,
    counter_for_model,
    encoding_for_model,
    heuristic_count,
    max_output_tokens,
    request_tokens,
)

CHAT = "/v1/chat/completions"

#: OpenAI cookbook "How to count tokens with tiktoken", section 6: the API counted 129 prompt tokens for gpt-4 /
#: gpt-3.5-turbo and 124 for gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]

#: Section 7: with this tool the API counted 105 (gpt-4, gpt-3.5-turbo) and 101 (gpt-4o, gpt-4o-mini).
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)]
)
def test_chat_messages_match_the_counts_openai_returned(model: str, expected: int) -> None:
    body = {"model": model, "messages": COOKBOOK_MESSAGES}
    assert request_tokens(body, CHAT).input_tokens == expected


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)])
def test_function_tools_match_the_counts_openai_returned(model: str, expected: int) -> None:
    body = {"model": model, "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert request_tokens(body, CHAT).input_tokens == expected


@pytest.mark.parametrize(
    ("model", "text", "expected"),
    [
        # The cookbook's section 5 ("Comparing encodings").
        ("text-embedding-3-small", "antidisestablishmentarianism", 6),
        ("gpt-4o", "antidisestablishmentarianism", 6),
        ("text-embedding-3-small", "お誕生日おめでとう", 9),
        ("gpt-4o", "お誕生日おめでとう", 8),
        ("text-embedding-ada-002", "2 + 2 = 4", 7),
        ("gpt-4.1-mini", "tiktoken is great!", 6),
    ],
)
def test_text_is_counted_with_the_models_real_encoding(model: str, text: str, expected: int) -> None:
    assert counter_for_model(model).count(text) == expected


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini-2025-08-07", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc123", "o200k_base"),
        ("GPT-4O", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("llama-3.1-70b", None),
        ("omni-moderation-latest", None),
        ("", None),
        (None, None),
    ],
)
def test_model_names_map_to_their_encoding(model: str | None, encoding: str | None) -> None:
    assert encoding_for_model(model) == encoding
    assert counter_for_model(model).tokenizer == (encoding or "heuristic")


def test_a_model_without_a_known_encoding_is_counted_by_the_heuristic() -> None:
    body = {"model": "llama-3.1-70b", "messages": [{"role": "user", "content": "x" * 35}]}
    # 3 per message + "user" (4 ASCII chars: 2) + 35 chars / 3.5 (10) + 3 priming
    assert request_tokens(body, CHAT).input_tokens == 3 + 2 + 10 + 3
    assert counter_for_model("llama-3.1-70b").ratio == tokens.HEURISTIC_RATIO


def test_the_heuristic_counts_other_scripts_per_character() -> None:
    assert heuristic_count("") == 0
    assert heuristic_count("a") == 1
    assert heuristic_count("abcdefg") == 2
    assert heuristic_count("お誕生日") == 5  # 4 x 1.2, rounded up
    assert heuristic_count("ab日本") == 3  # 2 / 3.5 + 2 x 1.2 = 2.97


def test_content_parts_count_their_text_and_report_what_cannot_be_counted() -> None:
    text = "Describe these pictures."
    as_string = request_tokens({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}, CHAT)
    parts = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    as_parts = request_tokens({"model": "gpt-4o", "messages": [{"role": "user", "content": parts}]}, CHAT)
    assert as_parts.input_tokens == as_string.input_tokens
    assert (as_string.uncounted_parts, as_parts.uncounted_parts) == (0, 2)


def test_assistant_tool_calls_count_their_name_and_arguments() -> None:
    o200k = counter_for_model("gpt-4o")
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}
    plain = request_tokens({"model": "gpt-4o", "messages": [{"role": "assistant", "content": "ok"}]}, CHAT)
    with_call = request_tokens(
        {"model": "gpt-4o", "messages": [{"role": "assistant", "content": "ok", "tool_calls": [call]}]}, CHAT
    )
    assert with_call.input_tokens - plain.input_tokens == o200k.count("lookup") + o200k.count('{"city": "Paris"}')


def test_responses_input_is_framed_like_the_equivalent_chat_messages() -> None:
    instructions, question = "Answer in one word.", "What colour is the sky on a clear day?"
    chat = request_tokens(
        {
            "model": "gpt-4.1",
            "messages": [{"role": "developer", "content": instructions}, {"role": "user", "content": question}],
        },
        CHAT,
    )
    as_string = request_tokens({"model": "gpt-4.1", "instructions": instructions, "input": question}, "/v1/responses")
    as_items = request_tokens(
        {
            "model": "gpt-4.1",
            "instructions": instructions,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": question}]}],
        },
        "/v1/responses",
    )
    assert as_string.input_tokens == as_items.input_tokens == chat.input_tokens


def test_responses_context_stored_at_openai_is_reported_as_uncounted() -> None:
    body = {"model": "gpt-5", "prompt": {"id": "pmpt_1"}, "previous_response_id": "resp_1", "input": "hi"}
    assert request_tokens(body, "/v1/responses").uncounted_parts == 2


def test_embeddings_inputs_strings_and_token_arrays() -> None:
    cl100k = counter_for_model("text-embedding-3-small")
    model = "text-embedding-3-small"
    emb = "/v1/embeddings"
    assert request_tokens({"model": model, "input": "hello world"}, emb).input_tokens == cl100k.count("hello world")
    assert request_tokens({"model": model, "input": ["a b", "c"]}, emb).input_tokens == (
        cl100k.count("a b") + cl100k.count("c")
    )
    assert request_tokens({"model": model, "input": [15339, 1917, 0]}, emb).input_tokens == 3
    assert request_tokens({"model": model, "input": [[1, 2], [3, 4, 5]]}, emb).input_tokens == 5
    assert request_tokens({"model": model, "input": "x"}, emb).max_output_tokens == 0


def test_completions_prompts_and_their_output_cap() -> None:
    counter = counter_for_model("gpt-3.5-turbo-instruct")
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["Say one", "Say two"], "max_tokens": 10, "n": 2}
    counted = request_tokens(body, "/v1/completions")
    assert counted.input_tokens == counter.count("Say one") + counter.count("Say two")
    assert counted.max_output_tokens == 10 * 2 * 2  # per prompt, per choice
    assert max_output_tokens({"prompt": [1, 2, 3], "max_tokens": 5, "best_of": 3}, "/v1/completions") == 15
    assert max_output_tokens({"prompt": "x"}, "/v1/completions") is None


def test_moderations_count_text_inputs_and_report_images() -> None:
    body = {
        "model": "omni-moderation-latest",
        "input": [{"type": "text", "text": "abcdefg"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
    }
    counted = request_tokens(body, "/v1/moderations")
    assert counted == (2, 0, 1)
    assert request_tokens({"input": ["abcdefg", "abc"]}, "/v1/moderations").input_tokens == 3


@pytest.mark.parametrize(
    ("body", "endpoint", "expected"),
    [
        ({"max_completion_tokens": 300, "max_tokens": 100}, CHAT, 300),
        ({"max_tokens": 100}, CHAT, 100),
        ({"max_tokens": 100, "n": 3}, CHAT, 300),
        ({}, CHAT, None),
        ({"max_tokens": None}, CHAT, None),
        ({"max_tokens": True}, CHAT, None),
        ({"max_output_tokens": 64}, "/v1/responses", 64),
        ({"max_tokens": 64}, "/v1/responses", None),
        ({}, "/v1/responses", None),
        ({}, "/v1/embeddings", 0),
        ({}, "/v1/moderations", 0),
        ({"prompt": "a cat"}, "/v1/images/generations", None),
    ],
)
def test_max_output_tokens(body: dict, endpoint: str, expected: int | None) -> None:
    assert max_output_tokens(body, endpoint) == expected


def test_structured_output_schema_counts_as_its_json() -> None:
    o200k = counter_for_model("gpt-4o")
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    base = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with_schema = {**base, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    added = request_tokens(with_schema, CHAT).input_tokens - request_tokens(base, CHAT).input_tokens
    assert added == o200k.count(json.dumps(schema, separators=(",", ":")))


def test_an_endpoint_of_a_compatible_server_counts_every_string_but_the_model() -> None:
    body = {"model": "some-model-name-that-is-long", "query": "abcdefg", "documents": ["abc", {"text": "abcdefg"}]}
    assert request_tokens(body, "/v1/rerank", HEURISTIC).input_tokens == 2 + 1 + 2


def test_lone_surrogates_from_json_are_counted() -> None:
    body = json.loads('{"model": "gpt-4o", "input": "bad \\ud800 text"}')
    assert request_tokens(body, "/v1/embeddings").input_tokens > 0


def test_loading_the_tokenizer_leaves_bpe_openai_importable_as_usual() -> None:
    code = textwrap.dedent(
        """
        import sys
        from airflow_provider_openai_batch import tokens
        assert tokens.counter_for_model("gpt-4o").count("tiktoken is great!") == 6
        assert "bpe_openai" not in sys.modules  # its __init__ (vocabularies as Python dicts) was not run
        import bpe_openai
        print(len(bpe_openai.get_encoding("o200k_base").encode_ordinary("tiktoken is great!")))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "6"  # Airflow may log to stdout before


def test_without_bpe_openai_counts_fall_back_to_the_heuristic_and_say_so() -> None:
    code = textwrap.dedent(
        """
        import logging, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "bpe_openai":
                    raise ImportError("bpe_openai blocked for this test")
        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from airflow_provider_openai_batch import tokens
        counter = tokens.counter_for_model("gpt-4o")
        print(counter.tokenizer, counter.count("abcdefg"))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["heuristic", "2"]
    assert "No o200k_base tokenizer" in done.stdout + done.stderr


def test_a_request_holds_its_input_and_its_output_cap_in_the_queue() -> None:
    """``queue_load``: what the job's sharder, scheduler and the estimate count a request as under a token budget."""
    from airflow_provider_openai_batch.tokens import queue_load, queue_tokens

    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Summarize the ticket."}]}
    counted = tokens.request_tokens(body, tokens.CHAT_ENDPOINT)
    capped = {**body, "max_completion_tokens": 40, "n": 2}
    assert queue_load(counted) == counted.input_tokens  # no cap: the input alone
    assert queue_load(tokens.request_tokens(capped, tokens.CHAT_ENDPOINT)) == counted.input_tokens + 80
    raw = json.dumps({"custom_id": "a", "method": "POST", "url": tokens.CHAT_ENDPOINT, "body": capped}).encode()
    assert queue_tokens(raw, tokens.CHAT_ENDPOINT) == counted.input_tokens + 80
    assert queue_load(tokens.RequestTokens(0, None, 1)) == 1  # an image alone still holds a place
