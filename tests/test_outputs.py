"""
Typed per-row results: an output schema asked for, answered by the fake through the real SDK, joined into statuses.

Batches run on FakeOpenAIServer with the real ``openai`` client (strict response validation): upload, create, wait
(the fake's clock), download, then ``iter_joined`` / ``write_joined`` with ``output_schema``. Units cover the
strict-mode checker and the request's response format, which act before anything is sent.
"""

from __future__ import annotations

import array
import base64
import json
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, get_args

import msgspec
import openai
import pydantic
import pytest
from openai._types import omit
from openai.lib._parsing import parse_chat_completion, type_to_response_format_param
from openai.lib._parsing._responses import parse_response
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from openai.types.create_embedding_response import CreateEmbeddingResponse
from openai.types.moderation_create_response import ModerationCreateResponse
from openai.types.responses import Response

from airflow_provider_openai_batch.outputs import (
    ROW_STATUSES,
    Answer,
    OutputSchemaConflict,
    StrictSchemaError,
    answer_outcome,
    apply_output_schema,
    check_strict_schema,
    max_tokens_field,
    output_schema,
    plain_output,
    prompt_item,
    prompt_request,
    response_format,
    row_outcome,
    with_max_tokens,
)
from airflow_provider_openai_batch.results import iter_joined, iter_merged, write_joined
from airflow_provider_openai_batch.testing import FakeClock, FakeOpenAIServer, Timings, responses
from tests.conftest import jsonl, request_line


class Item(pydantic.BaseModel):
    name: str
    quantity: int


class Label(pydantic.BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    score: float
    tags: list[str]
    note: str | None
    items: list[Item]


#: Label as a JSON Schema dict, written by hand as a DAG author would (strict: all required, no extra fields).
LABEL_DICT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": ["string", "null"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "quantity": {"type": "integer"}},
                "required": ["name", "quantity"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["sentiment", "score", "tags", "note", "items"],
    "additionalProperties": False,
}

TEXT_ENDPOINTS = ("/v1/chat/completions", "/v1/responses")
T = TypeVar("T")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(clock: FakeClock):
    with FakeOpenAIServer(clock=clock, timings=Timings()) as fake:
        yield openai.OpenAI(
            base_url=fake.base_url, api_key=fake.api_key, _strict_response_validation=True, max_retries=0
        )


def run_batch(
    client: openai.OpenAI, clock: FakeClock, rows: list[dict], folder: Path, name: str, *, fate: str = "complete"
) -> tuple[Path, list[Path]]:
    """Upload, create, wait, download: the input file and the result files on disk."""
    endpoint = rows[0]["url"]
    uploaded = client.files.create(file=(f"{name}.jsonl", jsonl(rows)), purpose="batch")
    extra: dict[str, Any] = {"metadata": {"fake_scenario": fate}} if fate == "expire" else {}
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **extra)  # type: ignore[arg-type]
    if fate == "cancel":
        client.batches.cancel(batch.id)
    clock.advance(3600)
    batch = client.batches.retrieve(batch.id)
    assert batch.status == {"complete": "completed", "expire": "expired", "cancel": "cancelled"}[fate]
    inputs = folder / f"{name}-in.jsonl"
    inputs.write_bytes(jsonl(rows))
    results = []
    for kind, file_id in (("out", batch.output_file_id), ("err", batch.error_file_id)):
        if file_id:
            path = folder / f"{name}-{kind}.jsonl"
            path.write_bytes(client.files.content(file_id).read())
            results.append(path)
    return inputs, results


def structured(i: int, endpoint: str, schema: Any, **body: Any) -> dict:
    row = request_line(i, url=endpoint)
    row["body"] = apply_output_schema({**row["body"], **body}, endpoint, schema)
    return row


@pytest.mark.parametrize("schema", [Label, LABEL_DICT], ids=["pydantic-model", "json-schema-dict"])
@pytest.mark.parametrize("endpoint", TEXT_ENDPOINTS)
def test_every_status_through_the_fake_and_the_sdk(client, clock, tmp_path, endpoint, schema):
    fates: dict[int, dict[str, Any]] = {
        2: {"fake_output": "invalid"},
        3: {"fake_output": "refused"},
        4: {"fake_output": "truncated"},
        5: {"fake_error": {"status_code": 400, "code": "bad_request"}},
    }
    done = [structured(i, endpoint, schema, **fates.get(i, {})) for i in range(6)]
    inputs, results = run_batch(client, clock, done, tmp_path, "done")
    expired_in, expired_out = run_batch(
        client, clock, [structured(i, endpoint, schema) for i in range(10, 14)], tmp_path, "exp", fate="expire"
    )
    cancelled_in, cancelled_out = run_batch(
        client, clock, [structured(i, endpoint, schema) for i in range(20, 22)], tmp_path, "cxl", fate="cancel"
    )
    missing_in = tmp_path / "missing.jsonl"
    missing_in.write_bytes(jsonl([structured(30, endpoint, schema)]))

    rows = list(
        iter_joined(
            [inputs, expired_in, cancelled_in, missing_in],
            [*results, *expired_out, *cancelled_out],
            output_schema=schema,
        )
    )
    statuses = {row.custom_id: row.status for row in rows}
    assert [statuses[f"req-{i}"] for i in range(6)] == [
        "succeeded",
        "succeeded",
        "invalid_output",
        "refused",
        "truncated",
        "failed",
    ]
    assert [statuses[f"req-{i}"] for i in (10, 11, 12, 13)] == ["succeeded", "succeeded", "expired", "expired"]
    assert [statuses["req-20"], statuses["req-21"], statuses["req-30"]] == ["cancelled", "cancelled", "missing"]
    assert set(statuses.values()) == set(ROW_STATUSES)

    by_id = {row.custom_id: row for row in rows}
    first = by_id["req-0"].output
    Label.model_validate(first)  # the validated object, as the SDK's parse() would give it
    expected = responses.schema_value(output_schema(schema).schema, "req-0")
    assert {**first, "score": float(first["score"])} == {**expected, "score": float(expected["score"])}
    invalid = by_id["req-2"]
    assert invalid.output is None and invalid.error["code"] == "invalid_output"
    assert invalid.error["text"] == json.dumps({"fake_invalid_output": True})  # the raw text is kept
    # and the validation error names what is wrong (the model: a missing field; the schema: the unknown one)
    assert "sentiment" in invalid.error["message"] or "fake_invalid_output" in invalid.error["message"]
    assert by_id["req-3"].error == {"code": "refused", "message": responses.REFUSAL}
    truncated = by_id["req-4"]
    assert truncated.error["code"] == "truncated" and truncated.error["reason"] in ("length", "max_output_tokens")
    whole = json.dumps(responses.schema_value(output_schema(schema).schema, "req-4"), separators=(",", ":"))
    assert whole.startswith(truncated.error["text"]) and len(truncated.error["text"]) < len(whole)
    assert by_id["req-5"].error["code"] == "bad_request" and by_id["req-5"].output is None

    joined = tmp_path / "joined.jsonl"
    counts = write_joined(
        iter_joined([inputs, expired_in, cancelled_in, missing_in], [*results, *expired_out, *cancelled_out]),
        joined,
        output_schema=schema,
    )
    assert counts == {
        "succeeded": 4,
        "invalid_output": 1,
        "refused": 1,
        "truncated": 1,
        "failed": 1,
        "expired": 2,
        "cancelled": 2,
        "missing": 1,
    }
    lines = [json.loads(line) for line in joined.read_text().splitlines()]
    assert len(lines) == 13 and all("output" in line for line in lines)  # one object per row, with its output
    assert lines[0]["output"] == by_id["req-0"].output


@pytest.mark.parametrize("endpoint", TEXT_ENDPOINTS)
def test_the_sdk_reads_the_fakes_answers_as_the_join_does(endpoint):
    """The SDK's own parse() helpers on the fake's answers: the same parsed object, refusal and truncation."""
    body = {**request_line(0, url=endpoint)["body"], **response_format(Label, endpoint)}
    for fate in (None, "invalid", "refused", "truncated"):
        asked = {**body, **({"fake_output": fate} if fate else {})}
        answer = responses.response_body(endpoint, asked, "req-0", 1)
        ours = row_outcome(answer, Label)
        if endpoint == "/v1/chat/completions":
            completion = ChatCompletion.model_validate(answer)
            if fate == "truncated":
                with pytest.raises(openai.LengthFinishReasonError):
                    parse_chat_completion(response_format=Label, input_tools=omit, chat_completion=completion)
                assert ours.status == "truncated"
                continue
            if fate == "invalid":
                with pytest.raises(pydantic.ValidationError):
                    parse_chat_completion(response_format=Label, input_tools=omit, chat_completion=completion)
                assert ours.status == "invalid_output"
                continue
            message = parse_chat_completion(response_format=Label, input_tools=omit, chat_completion=completion)
            parsed, refusal = message.choices[0].message.parsed, message.choices[0].message.refusal
        else:
            response = Response.model_validate(answer)
            assert response.text is not None and response.text.format.name == "Label"  # type: ignore[union-attr]
            if fate in ("invalid", "truncated"):
                with pytest.raises(pydantic.ValidationError):
                    parse_response(text_format=Label, input_tools=omit, response=response)
                assert ours.status == {"invalid": "invalid_output", "truncated": "truncated"}[fate]
                assert (response.status == "incomplete") == (fate == "truncated")
                continue
            parsed_response = parse_response(text_format=Label, input_tools=omit, response=response)
            parsed = parsed_response.output_parsed
            refusal = next((c.refusal for o in response.output for c in o.content if c.type == "refusal"), None)  # type: ignore[union-attr]
        if fate == "refused":
            assert parsed is None and refusal == responses.REFUSAL and ours.status == "refused"
        else:
            assert parsed is not None and ours.status == "succeeded" and parsed.model_dump() == ours.output


@pytest.mark.parametrize("schema", [Label, LABEL_DICT], ids=["pydantic-model", "json-schema-dict"])
def test_a_plain_answers_output_read_without_its_outcome_is_the_outcomes(schema):
    """
    ``plain_output`` (a typed join's shortcut) gives the output ``answer_outcome`` gives a plain success, and
    declines everything else: refused, truncated, cut by a content filter, invalid, no text, another endpoint.
    """
    checked = output_schema(schema)
    decode = msgspec.json.Decoder(Answer).decode
    body = {**request_line(0)["body"], **response_format(schema, "/v1/chat/completions")}
    answers = [
        responses.response_body("/v1/chat/completions", {**body, **({"fake_output": f} if f else {})}, f"r{i}", 1)
        for i, f in enumerate((None, None, "invalid", "refused", "truncated"))
    ]
    filtered = json.loads(json.dumps(answers[0]))
    filtered["choices"][0]["finish_reason"] = "content_filter"
    no_text = json.loads(json.dumps(answers[0]))
    no_text["choices"][0]["message"]["content"] = None
    responses_api = responses.response_body("/v1/responses", request_line(0, url="/v1/responses")["body"], "r", 1)
    taken = 0
    for answer in [*answers, filtered, no_text, responses_api]:
        parsed = decode(json.dumps(answer))
        got, outcome = plain_output(parsed, checked), answer_outcome(parsed, checked)
        if got is not None:
            taken += 1
            assert outcome.status == "succeeded" and bytes(outcome.output) == got
        else:
            assert outcome.status != "succeeded" or answer is responses_api
    assert taken == 2


def test_completions_answers_that_stop_early():
    body = request_line(0, url="/v1/completions")["body"]
    for fate, status, reason in (("truncated", "truncated", "length"), ("refused", "refused", "content_filter")):
        answer = responses.response_body("/v1/completions", {**body, "fake_output": fate}, "req-0", 1)
        assert Completion.model_validate(answer).choices[0].finish_reason == reason
        got = row_outcome(answer)
        assert (got.status, got.output, got.error["reason"]) == (status, None, reason)
    assert row_outcome(responses.response_body("/v1/completions", body, "req-0", 1)).status == "succeeded"


def test_each_endpoints_value_without_a_schema(client, clock, tmp_path):
    cases = {
        "/v1/chat/completions": (ChatCompletion, lambda i, body: responses.answer_text(body)),
        "/v1/responses": (Response, lambda i, body: responses.answer_text(body)),
        "/v1/completions": (Completion, lambda i, body: responses.answer_text(body)),
        "/v1/embeddings": (CreateEmbeddingResponse, lambda i, body: responses.embedding_vector(f"text {i}")),
        "/v1/moderations": (
            ModerationCreateResponse,
            lambda i, body: {"flagged": i == 1, "categories": ["harassment"] if i == 1 else []},
        ),
    }
    for endpoint, (body_type, expected) in cases.items():
        rows = [request_line(i, url=endpoint) for i in range(3)]
        if endpoint == "/v1/moderations":
            rows[1]["body"]["input"] = "please flag this"
        inputs, results = run_batch(client, clock, rows, tmp_path, endpoint.rsplit("/", 1)[1])
        for line in (json.loads(raw) for raw in results[0].read_text().splitlines()):
            body_type.model_validate(line["response"]["body"])
        joined = list(iter_joined(inputs, results, extract=True))
        assert [row.status for row in joined] == ["succeeded"] * 3, endpoint
        assert [row.output for row in joined] == [expected(i, row["body"]) for i, row in enumerate(rows)], endpoint


def test_without_extraction_rows_are_as_before(client, clock, tmp_path):
    rows = [request_line(i, fake_output="refused" if i == 1 else None) for i in range(3)]
    inputs, results = run_batch(client, clock, rows, tmp_path, "plain")
    joined = tmp_path / "plain.jsonl"
    assert write_joined(iter_joined(inputs, results), joined) == {"succeeded": 3}  # a refusal is an answer
    assert all("output" not in json.loads(line) for line in joined.read_text().splitlines())
    # The job's merge of a joined file, extracted when it is written: the refusal shows.
    again = tmp_path / "again.jsonl"
    assert write_joined(iter_merged([joined]), again, extract=True) == {"succeeded": 2, "refused": 1}
    assert json.loads(again.read_text().splitlines()[0])["output"] == "echo: question 0"


def test_a_model_validator_decides_what_the_schema_alone_would_not():
    class Strict(pydantic.BaseModel):
        quantity: int

        @pydantic.field_validator("quantity")
        @classmethod
        def positive(cls, value: int) -> int:
            if value <= 0:
                raise ValueError("quantity must be positive")
            return value

    class Plain(pydantic.BaseModel):
        quantity: int

    def chat(content: str) -> dict:
        return {"choices": [{"message": {"content": content, "refusal": None}, "finish_reason": "stop"}]}

    refused = row_outcome(chat('{"quantity": -1}'), Strict)
    assert refused.status == "invalid_output" and "quantity must be positive" in refused.error["message"]
    assert row_outcome(chat('{"quantity": 2}'), Strict).output == {"quantity": 2}
    # What Pydantic accepts beyond the JSON Schema (a number in a string) is accepted, as the SDK's parse() does.
    assert row_outcome(chat('{"quantity": "3"}'), Plain).output == {"quantity": 3}
    assert row_outcome(chat('{"quantity": "three"}'), Plain).status == "invalid_output"
    # Pretty-printed JSON is fine, and the row's line stays one line.
    assert row_outcome(chat('{\n  "quantity": 4\n}'), Plain).output == {"quantity": 4}


def test_a_dict_schema_beyond_simple_types_is_validated_too():
    tree = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["name", "children"],
        "additionalProperties": False,
    }
    either = {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"radius": {"type": "number"}},
                        "required": ["radius"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {"side": {"type": "integer", "minimum": 1}},
                        "required": ["side"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "required": ["shape"],
        "additionalProperties": False,
    }

    def text(content: Any) -> dict:
        return {"choices": [{"message": {"content": json.dumps(content)}, "finish_reason": "stop"}]}

    good_tree = {"name": "a", "children": [{"name": "b", "children": []}]}
    assert row_outcome(text(good_tree), tree).output == good_tree
    bad = row_outcome(text({"name": "a", "children": [{"name": 1, "children": []}]}), tree)
    assert bad.status == "invalid_output" and "$.children[0].name" in bad.error["message"]
    assert row_outcome(text({"shape": {"side": 2}}), either).status == "succeeded"
    assert row_outcome(text({"shape": {"side": 0}}), either).status == "invalid_output"
    assert row_outcome(text({"shape": {"side": 2.5}}), either).status == "invalid_output"  # integer means integer
    assert row_outcome(text({"shape": "round"}), either).status == "invalid_output"
    assert row_outcome(text(responses.schema_value(tree, "x")), tree).status == "succeeded"
    assert row_outcome(text(responses.schema_value(either, "x")), either).status == "succeeded"


def test_a_pydantic_model_becomes_the_sdks_strict_schema():
    ours = output_schema(Label)
    sdk: Any = type_to_response_format_param(Label)
    assert (ours.name, ours.schema) == (sdk["json_schema"]["name"], sdk["json_schema"]["schema"])
    assert response_format(Label, "/v1/chat/completions") == {"response_format": sdk}
    assert response_format(Label, "/v1/responses") == {
        "text": {
            "format": {"type": "json_schema", "name": "Label", "schema": sdk["json_schema"]["schema"], "strict": True}
        }
    }
    assert output_schema(LABEL_DICT, name="label").json_schema_param() == {
        "name": "label",
        "schema": LABEL_DICT,
        "strict": True,
    }
    wrapped = {"name": "label", "schema": LABEL_DICT, "strict": True, "description": "A review's label"}
    assert output_schema(wrapped).json_schema_param() == wrapped


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        **extra,
    }


@pytest.mark.parametrize(
    ("schema", "path", "words"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            "$.additionalProperties",
            "false",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": [], "additionalProperties": False},
            "$.required",
            "every property must be required",
        ),
        (_object({"a": {"type": "string", "minLength": 2}}), "$.properties.a.minLength", "not supported"),
        (_object({"a": {"type": "integer", "default": 3}}), "$.properties.a.default", "union with null"),
        (_object({"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}), "$.properties.a.oneOf", "not supported"),
        (_object({"a": {"allOf": [{"type": "string"}]}}), "$.properties.a.allOf", "not supported"),
        (_object({"a": {"type": "string", "format": "uri"}}), "$.properties.a.format", "uri"),
        (_object({"a": {"type": "date"}}), "$.properties.a.type", "unsupported type"),
        (_object({"a": {"$ref": "https://example.com/s.json"}}), "$.properties.a.$ref", "inside the schema"),
        (_object({"a": {"$ref": "#/$defs/Nope"}}), "$.properties.a.$ref", "points at nothing"),
        (
            _object(
                {"a": _object({"b": {"type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]}})}
            ),
            "$.properties.a.properties.b.additionalProperties",
            "false",
        ),
        ({"anyOf": [_object({}), _object({"a": {"type": "string"}})]}, "$", "anyOf"),
        ({"type": "array", "items": {"type": "string"}}, "$", "object"),
        (_object({"a": {"type": "string", "enum": []}}), "$.properties.a.enum", "non-empty"),
    ],
)
def test_a_schema_strict_mode_would_refuse_is_refused_with_its_path(schema, path, words):
    with pytest.raises(StrictSchemaError) as raised:
        output_schema(schema)
    assert raised.value.path == path
    assert words in str(raised.value) and path in str(raised.value)


def test_strict_modes_size_limits():
    deep: dict[str, Any] = _object({"leaf": {"type": "string"}})
    for _ in range(10):
        deep = _object({"next": deep})
    with pytest.raises(StrictSchemaError, match="nest at most 10"):
        check_strict_schema(deep)
    with pytest.raises(StrictSchemaError, match="object properties"):
        check_strict_schema(_object({f"p{i}": {"type": "string"} for i in range(5001)}))
    with pytest.raises(StrictSchemaError, match="enum values"):
        check_strict_schema(_object({"a": {"type": "string", "enum": [f"v{i}" for i in range(1001)]}}))
    check_strict_schema(_object({"a": {"type": "string", "enum": [f"v{i}" for i in range(1000)]}}))


def test_pydantic_models_strict_mode_would_refuse_are_refused():
    class WithDefault(pydantic.BaseModel):
        count: int = 3

    class Either(pydantic.BaseModel):
        value: int | str

    class Box(pydantic.BaseModel, Generic[T]):
        item: T

    with pytest.raises(StrictSchemaError, match=r"properties\.count\.default"):
        output_schema(WithDefault)
    output_schema(Either)  # a union is anyOf, which strict mode takes
    with pytest.raises(StrictSchemaError, match="name"):
        output_schema(Box[int])
    assert output_schema(Box[int], name="box").name == "box"
    with pytest.raises(TypeError):
        output_schema("Label")  # type: ignore[arg-type]


def test_the_response_format_goes_into_each_endpoints_body():
    chat = request_line(0)["body"]
    asked = apply_output_schema(chat, "/v1/chat/completions", Label)
    assert asked["response_format"]["json_schema"]["name"] == "Label" and "response_format" not in chat
    assert apply_output_schema(asked, "/v1/chat/completions", Label) == asked  # the same format: left as it is
    with pytest.raises(OutputSchemaConflict) as conflict:
        apply_output_schema({**chat, "response_format": {"type": "json_object"}}, "/v1/chat/completions", Label)
    assert conflict.value.field == "body.response_format" and "json_object" in str(conflict.value)

    responses_body = {"model": "gpt-4o-mini", "input": "hi", "text": {"verbosity": "low"}}
    asked = apply_output_schema(responses_body, "/v1/responses", LABEL_DICT)
    assert asked["text"]["verbosity"] == "low" and asked["text"]["format"]["strict"] is True
    other = {**responses_body, "text": {"format": {"type": "json_schema", "name": "Other", "schema": LABEL_DICT}}}
    with pytest.raises(OutputSchemaConflict) as conflict:
        apply_output_schema(other, "/v1/responses", LABEL_DICT)
    assert conflict.value.field == "body.text.format" and "Other" in str(conflict.value)
    with pytest.raises(ValueError, match="no structured output"):
        apply_output_schema({"model": "m", "input": "x"}, "/v1/embeddings", Label)


def test_the_fakes_answers_are_deterministic_by_custom_id_and_shares_are_drawn_from_it():
    body = {**request_line(0)["body"], **response_format(Label, "/v1/chat/completions")}
    first = responses.response_body("/v1/chat/completions", body, "req-7", 1)
    assert responses.response_body("/v1/chat/completions", body, "req-7", 1) == first
    assert responses.response_body("/v1/chat/completions", body, "req-8", 1) != first
    share = {"fake_output": {"refused": 0.2, "truncated": 0.1}}
    fates = [responses.output_fate(f"id-{i}", share) for i in range(2000)]
    assert fates == [responses.output_fate(f"id-{i}", share) for i in range(2000)]
    assert 300 < fates.count("refused") < 500 and 120 < fates.count("truncated") < 280
    assert fates.count("invalid") == 0 and fates.count(None) > 1000


def test_base64_embeddings_and_several_inputs():
    vector = array.array("f", [0.5, -1.0, 2.0])
    encoded = base64.b64encode(vector.tobytes()).decode()
    body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": encoded}]}
    assert row_outcome(body).output == [0.5, -1.0, 2.0]
    two = {"object": "list", "data": [{"embedding": [1.0]}, {"embedding": [2.0]}]}
    assert row_outcome(two).output == [[1.0], [2.0]]


def test_a_compatible_servers_string_bodies_are_read(tmp_path, clock):
    with FakeOpenAIServer(clock=clock, timings=Timings(), compatible_quirks=True) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        rows = [
            structured(i, "/v1/chat/completions", Label, **({"fake_output": "refused"} if i else {})) for i in range(2)
        ]
        inputs, results = run_batch(client, clock, rows, tmp_path, "compat")
    joined = list(iter_joined(inputs, results, output_schema=Label))
    assert [row.status for row in joined] == ["succeeded", "refused"]
    Label.model_validate(joined[0].output)


def test_a_prompt_becomes_a_request_line_asking_for_the_schema(client, clock, tmp_path):
    rows = [
        prompt_request(
            "a", "Label this review", endpoint="/v1/chat/completions", model="gpt-4o-mini", output_schema=Label
        ),
        prompt_request(
            "b",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Label that one"}],
            endpoint="/v1/chat/completions",
            model="gpt-4o-mini",
            output_schema=Label,
            temperature=0,
        ),
    ]
    assert rows[0]["body"]["messages"] == [{"role": "user", "content": "Label this review"}]
    assert rows[1]["body"]["temperature"] == 0 and len(rows[1]["body"]["messages"]) == 2
    inputs, results = run_batch(client, clock, rows, tmp_path, "prompts")
    assert [row.status for row in iter_joined(inputs, results, output_schema=Label)] == ["succeeded"] * 2
    responses_row = prompt_request(
        "c", "Label it", endpoint="/v1/responses", model="gpt-4o-mini", output_schema=LABEL_DICT
    )
    assert responses_row["body"]["input"] == "Label it" and responses_row["body"]["text"]["format"]["name"] == "output"
    with pytest.raises(ValueError, match="chat/completions or /v1/responses"):
        prompt_request("d", "x", endpoint="/v1/embeddings", model="m")


@pytest.mark.parametrize(
    ("endpoint", "field", "params"),
    [
        ("/v1/chat/completions", "max_completion_tokens", "openai.types.chat.CompletionCreateParams"),
        ("/v1/responses", "max_output_tokens", "openai.types.responses.ResponseCreateParams"),
        ("/v1/completions", "max_tokens", "openai.types.CompletionCreateParams"),
    ],
)
def test_max_tokens_goes_under_each_endpoints_own_field(endpoint, field, params):
    import importlib

    from airflow_provider_openai_batch.tokens import max_output_tokens

    assert max_tokens_field(endpoint) == field
    module, _, name = params.rpartition(".")
    sdk_params = getattr(importlib.import_module(module), name)  # the SDK's own create params (a union of two)
    assert get_args(sdk_params) and all(field in typed.__annotations__ for typed in get_args(sdk_params))
    if endpoint == "/v1/completions":
        return  # prompts go to chat completions and responses only
    params = with_max_tokens({"temperature": 0}, endpoint, 50)  # what a job adds to every prompt's request
    body = prompt_request("a", "Label it", endpoint=endpoint, model="gpt-4o-mini", output_schema=Label, **params)
    assert body["body"][field] == 50 and body["body"]["temperature"] == 0
    assert not ({"max_tokens", "max_completion_tokens", "max_output_tokens"} - {field}) & set(body["body"])
    assert max_output_tokens(body["body"], endpoint) == 50  # the queue estimate sees the cap
    assert with_max_tokens({field: 50}, endpoint, 50) == {field: 50}
    assert with_max_tokens({"top_p": 1}, endpoint, None) == {"top_p": 1}
    with pytest.raises(ValueError, match=f"sets max_tokens=20 and max_tokens=50 asks for {field}=50"):
        with_max_tokens({"max_tokens": 20}, endpoint, 50)
    with pytest.raises(ValueError, match="positive integer"):
        with_max_tokens({}, endpoint, 0)


def test_max_tokens_on_an_endpoint_without_answers_is_refused():
    with pytest.raises(ValueError, match="max_tokens applies to"):
        max_tokens_field("/v1/embeddings")


def test_prompt_items_of_every_shape():
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_item(7, "Label it") == ("prompt-000007", "Label it")
    assert prompt_item(0, ("r1", "Label it")) == ("r1", "Label it")
    assert prompt_item(0, ("r1", messages)) == ("r1", messages)
    assert prompt_item(0, ["r1", "Label it"]) == ("r1", "Label it")  # a pair after XCom
    assert prompt_item(0, [42, "Label it"]) == ("42", "Label it")  # an integer id column
    assert prompt_item(3, messages) == ("prompt-000003", messages)
    assert prompt_item(0, {"key": "r1", "prompt": "Label it"}) == ("r1", "Label it")
    assert prompt_item(5, {"prompt": "Label it"}) == ("prompt-000005", "Label it")
    assert prompt_item(0, {"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": {}}) is None
    with pytest.raises(ValueError, match=r"item 2: a prompt row has 'key' and 'prompt', not \['text'\]"):
        prompt_item(2, {"key": "r1", "prompt": "x", "text": "y"})
