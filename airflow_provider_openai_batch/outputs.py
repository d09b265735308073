"""
What a request asked the model to return, and what one result line means for it: the typed per-row outcome.

A batch answers every request with a body; whether that body is a usable answer is a second question the Batch API
does not ask. The model may refuse, stop at the token limit, or (on servers without strict structured outputs)
write JSON that does not fit the schema. This module turns an ``output_schema`` (a Pydantic model or a JSON Schema
dict) into the request fields that ask for it, checks a dict schema against the rules of strict mode when the DAG
is parsed, and reads a response body into a :class:`RowStatus` and an ``output``: the validated object, or without
a schema the useful value of each endpoint (the text, the embedding vector, the moderation verdict).

It decides; it does not read files (``results.py`` joins) nor write them (``parquet.py``). Response bodies are read
from their bytes with msgspec structs that name only the fields looked at, so a million rows stay cheap.
"""

from __future__ import annotations

import array
import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args

import msgspec

RowStatus = Literal["succeeded", "invalid_output", "refused", "truncated", "failed", "expired", "cancelled", "missing"]
"""
What became of one request. ``succeeded``: a usable answer (with a schema: one that validates).
``invalid_output``: answered, but the text does not parse or validate against the schema (the text and the
validation error are kept). ``refused``: the model refused (``message.refusal``, a Responses ``refusal`` part) or a
content filter stopped it. ``truncated``: the answer hit the token limit (``finish_reason: "length"``, a Responses
``status: "incomplete"``). ``failed``: the endpoint answered with an error, or the request did not run to an answer.
``expired`` / ``cancelled``: never ran (the batch expired or was cancelled). ``missing``: no result line at all.
"""
ROW_STATUSES: tuple[RowStatus, ...] = get_args(RowStatus)
#: The statuses only an extracting join gives (without one such rows are ``succeeded``).
OUTPUT_STATUSES: frozenset[str] = frozenset({"invalid_output", "refused", "truncated"})

OutputKind = Literal["text", "embedding", "moderation", "none"]
"""What an endpoint answers with: text (chat, responses, completions), vectors, a moderation verdict, or else."""

#: Endpoints that take an output schema, and the body field each puts it in.
SCHEMA_ENDPOINTS = {"/chat/completions": "response_format", "/responses": "text.format"}

#: OpenAI's Structured Outputs guide, the source of every strict-mode rule below.
STRUCTURED_OUTPUTS_GUIDE = "https://developers.openai.com/api/docs/guides/structured-outputs"


class StrictSchemaError(ValueError):
    """A JSON Schema that strict structured outputs would refuse; ``path`` is where (``$.properties.tags``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"output_schema at {path}: {message} (strict structured outputs, {STRUCTURED_OUTPUTS_GUIDE})")


class OutputSchemaConflict(ValueError):
    """A request body already asks for another output format; ``field`` is the body field (``body.response_format``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


# --- strict mode -----------------------------------------------------------------------------------

_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
#: Keywords strict mode takes (the guide's "Supported schemas": types, ``enum``, ``anyOf``, definitions and
#: recursion through ``$ref``, and the "Supported properties" of strings, numbers and arrays), plus the annotations
#: ``title`` and ``description``, which the SDK's own ``parse()`` helpers send from every Pydantic model.
SUPPORTED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "$defs",
        "definitions",
        "title",
        "description",
        "pattern",
        "format",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "minItems",
        "maxItems",
    }
)
#: The string formats strict mode supports.
SUPPORTED_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
#: The guide's size limits: object properties in all, levels of object nesting, enum values in all, characters of
#: every property name, definition name, enum and const value together, and of one enum's values past 250 of them.
MAX_PROPERTIES, MAX_DEPTH, MAX_ENUM_VALUES, MAX_STRING_CHARS = 5000, 10, 1000, 120_000
LARGE_ENUM, LARGE_ENUM_CHARS = 250, 15_000
#: ``json_schema.name``: "Must be a-z, A-Z, 0-9, or contain underscores and dashes, with a maximum length of 64"
#: (the SDK's ``ResponseFormatJSONSchema``).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_strict_schema(schema: Mapping[str, Any]) -> None:
    """
    Raise :class:`StrictSchemaError`, with the JSON path of the first problem, unless strict mode takes ``schema``.

    The rules are those of OpenAI's Structured Outputs guide (``STRUCTURED_OUTPUTS_GUIDE``, "Supported schemas"):
    the root is an object, not ``anyOf``; every object sets ``additionalProperties: false`` and lists every property
    in ``required`` (a field that may be absent is written as a union with ``null``); only the supported keywords
    (``SUPPORTED_KEYWORDS``: no ``default``, ``oneOf``, ``allOf``, ``not``, ``if``/``then``/``else``,
    ``minLength``...), types and string formats; ``$ref`` points inside the schema; and the size limits (5,000
    properties, 10 levels of nesting, 1,000 enum values, 120,000 characters of names and values, 15,000 for one enum
    of more than 250 values). Called when the DAG is parsed, so a schema OpenAI would refuse never reaches a batch.
    """
    if not isinstance(schema, Mapping):
        raise StrictSchemaError("$", f"a JSON Schema is an object, got {type(schema).__name__}")
    if "anyOf" in schema:
        raise StrictSchemaError("$", "the root must not be anyOf")
    if schema.get("type") != "object":
        raise StrictSchemaError("$", f"the root must be an object (type 'object'), got type {schema.get('type')!r}")
    totals = _Totals()
    _check_node(schema, "$", schema, totals, depth=0, refs=())
    for key in ("$defs", "definitions"):
        for name, definition in (schema.get(key) or {}).items():
            totals.chars += len(name)
            _check_node(definition, f"$.{key}.{name}", schema, totals, depth=0, refs=())
    if totals.properties > MAX_PROPERTIES:
        raise StrictSchemaError("$", f"{totals.properties:,} object properties; at most {MAX_PROPERTIES:,} are allowed")
    if totals.enum_values > MAX_ENUM_VALUES:
        raise StrictSchemaError("$", f"{totals.enum_values:,} enum values; at most {MAX_ENUM_VALUES:,} are allowed")
    if totals.chars > MAX_STRING_CHARS:
        raise StrictSchemaError(
            "$", f"{totals.chars:,} characters of names and enum/const values; at most {MAX_STRING_CHARS:,}"
        )


@dataclass
class _Totals:
    properties: int = 0
    enum_values: int = 0
    chars: int = 0


def _check_node(
    node: Any, path: str, root: Mapping[str, Any], totals: _Totals, depth: int, refs: tuple[str, ...]
) -> None:
    if not isinstance(node, Mapping):
        raise StrictSchemaError(path, f"a schema is an object, got {node!r}")
    for key in node:
        if key not in SUPPORTED_KEYWORDS:
            hint = " (a field that may be absent is a union with null, without a default)" if key == "default" else ""
            raise StrictSchemaError(f"{path}.{key}", f"'{key}' is not supported in strict mode{hint}")
    types = node.get("type")
    named = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else []
    if types is not None and (not named or any(t not in _TYPES for t in named)):
        raise StrictSchemaError(f"{path}.type", f"unsupported type {types!r}; strict mode takes {sorted(_TYPES)}")
    fmt = node.get("format")
    if fmt is not None and fmt not in SUPPORTED_FORMATS:
        raise StrictSchemaError(
            f"{path}.format", f"format {fmt!r} is not supported; use one of {sorted(SUPPORTED_FORMATS)}"
        )
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            raise StrictSchemaError(f"{path}.enum", "enum must be a non-empty list")
        totals.enum_values += len(values)
        strings = [v for v in values if isinstance(v, str)]
        totals.chars += sum(map(len, strings))
        if len(strings) > LARGE_ENUM and sum(map(len, strings)) > LARGE_ENUM_CHARS:
            raise StrictSchemaError(
                f"{path}.enum",
                f"an enum of more than {LARGE_ENUM} values holds at most {LARGE_ENUM_CHARS:,} characters",
            )
    if isinstance(node.get("const"), str):
        totals.chars += len(node["const"])
    if "object" in named or "properties" in node:
        depth += 1
        if depth > MAX_DEPTH:
            raise StrictSchemaError(path, f"objects nest at most {MAX_DEPTH} levels deep")
        if node.get("additionalProperties") is not False:
            raise StrictSchemaError(f"{path}.additionalProperties", "every object must set additionalProperties: false")
        properties = node.get("properties") or {}
        if not isinstance(properties, Mapping):
            raise StrictSchemaError(f"{path}.properties", "properties must be an object")
        required = node.get("required") or []
        absent = [name for name in properties if name not in required]
        if absent:
            raise StrictSchemaError(
                f"{path}.required",
                f"every property must be required; not required: {absent} (make one optional as a union with null)",
            )
        extra = [name for name in required if name not in properties]
        if extra:
            raise StrictSchemaError(f"{path}.required", f"required names properties that do not exist: {extra}")
        totals.properties += len(properties)
        for name, child in properties.items():
            totals.chars += len(name)
            _check_node(child, f"{path}.properties.{name}", root, totals, depth, refs)
    if "items" in node:
        _check_node(node["items"], f"{path}.items", root, totals, depth, refs)
    if "anyOf" in node:
        variants = node["anyOf"]
        if not isinstance(variants, list) or not variants:
            raise StrictSchemaError(f"{path}.anyOf", "anyOf must be a non-empty list")
        for i, variant in enumerate(variants):
            _check_node(variant, f"{path}.anyOf[{i}]", root, totals, depth, refs)
    ref = node.get("$ref")
    if ref is not None:
        target = _resolve(root, ref, path)
        if ref not in refs:  # recursion is supported: a definition is checked once per chain
            _check_node(target, path, root, _Totals(), depth, (*refs, ref))


def _resolve(root: Mapping[str, Any], ref: Any, path: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise StrictSchemaError(f"{path}.$ref", f"$ref must point inside the schema ('#/...'), got {ref!r}")
    target: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, Mapping) or part not in target:
            raise StrictSchemaError(f"{path}.$ref", f"$ref {ref!r} points at nothing")
        target = target[part]
    return target


# --- the schema --------------------------------------------------------------------------------------


class InvalidOutput(ValueError):
    """An answer that does not parse or validate against the output schema."""


@dataclass(frozen=True, eq=False)
class OutputSchema:
    """
    An output schema ready to send and to validate with: ``name`` and ``schema`` are what the request carries
    (``strict: true``), ``model`` the Pydantic type answers are validated with (``None`` for a dict schema).
    Build it with :func:`output_schema`.
    """

    name: str
    schema: dict[str, Any]
    model: Any = None
    description: str | None = None
    #: ``text → compact JSON bytes of the validated value``; raises InvalidOutput.
    _validate: Callable[[bytes | str], bytes] = field(repr=False, default=lambda text: b"")

    def validate(self, text: bytes | str) -> bytes:
        """The answer's value as compact JSON (one line), validated; :class:`InvalidOutput` when it is not."""
        return self._validate(text)

    def json_schema_param(self) -> dict[str, Any]:
        """``{name, schema, strict: true[, description]}``: the request's ``json_schema`` object."""
        param: dict[str, Any] = {"name": self.name, "schema": self.schema, "strict": True}
        if self.description:
            param["description"] = self.description
        return param


OutputSchemaLike = OutputSchema | type | Mapping[str, Any]


def output_schema(spec: OutputSchemaLike, *, name: str | None = None) -> OutputSchema:
    """
    An :class:`OutputSchema` from a Pydantic model (or Pydantic dataclass) or a JSON Schema dict.

    A model is turned into the request's schema the way the SDK's ``chat.completions.parse()`` does it
    (``openai.lib._parsing.type_to_response_format_param``, which calls ``to_strict_json_schema``), and answers
    are validated by the model, as ``parse()`` validates them. A dict is taken as the JSON Schema itself (or a
    ``{name, schema[, strict, description]}`` object, as in ``response_format.json_schema``) and answers are
    validated against it. Either is then checked against strict mode's rules (:func:`check_strict_schema`): a
    schema OpenAI would refuse raises :class:`StrictSchemaError` here, when the DAG is parsed.
    """
    if isinstance(spec, OutputSchema):
        return spec
    if isinstance(spec, Mapping):
        return _from_dict(spec, name)
    if isinstance(spec, type):
        return _from_model(spec, name)
    raise TypeError(f"output_schema takes a Pydantic model class or a JSON Schema dict, got {type(spec).__name__}")


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise StrictSchemaError(
            "name", f"the schema's name {name!r} must be 1-64 of a-z, A-Z, 0-9, '_' and '-' (pass name=...)"
        )
    return name


def _from_model(model: type, name: str | None) -> OutputSchema:
    import pydantic
    from openai.lib._parsing import type_to_response_format_param

    param: Any = type_to_response_format_param(model)
    json_schema = param["json_schema"]
    check_strict_schema(json_schema["schema"])
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(model)
    validate_json, to_json = adapter.validator.validate_json, adapter.serializer.to_json

    def validate_by_model(text: bytes | str) -> bytes:
        try:
            value = validate_json(text)
        except pydantic.ValidationError as error:
            raise InvalidOutput(_pydantic_message(error)) from None
        return bytes(to_json(value, by_alias=True))

    validate = validate_by_model
    fast = _plain_decoder(model, json_schema["schema"])
    if fast is not None:
        decode = fast.decode

        def validate_plain(text: bytes | str) -> bytes:
            try:
                decode(text)
            except (msgspec.ValidationError, msgspec.DecodeError):
                return validate_by_model(text)  # the model decides: it may take what the schema does not
            return _one_line(text)

        validate = validate_plain

    # The SDK sends no description for a model (its docstring is in the schema's own "description").
    return OutputSchema(_check_name(name or json_schema["name"]), json_schema["schema"], model, None, validate)


#: Pydantic core schema types a "plain" model is made of: JSON values only, no code of the user's in between.
_PLAIN_CORE = frozenset(
    {"model", "model-fields", "model-field", "str", "int", "float", "bool", "list", "literal", "nullable", "enum"}
)
_PLAIN_KEYS = frozenset(
    {
        "type",
        "schema",
        "fields",
        "items_schema",
        "cls",
        "config",
        "custom_init",
        "root_model",
        "metadata",
        "ref",
        "model_name",
        "computed_fields",
        "expected",
        "members",
        "sub_type",
        "strict",
        "ge",
        "gt",
        "le",
        "lt",
        "multiple_of",
        "min_length",
        "max_length",
        "default",
        "frozen",
    }
)


def _plain_decoder(model: type, schema: dict[str, Any]) -> msgspec.json.Decoder[Any] | None:
    """
    For a model made of JSON values only (no validators, serializers, aliases, computed fields or defaults other
    than ``None``; see ``_is_plain``): a msgspec decoder of its strict JSON Schema. Whatever it takes, the model
    takes too, and dumps to the same JSON, so the answer needs no model instance; what it refuses goes to the model,
    which decides. ``None`` for any other model.
    """
    core = getattr(model, "__pydantic_core_schema__", None)
    if not isinstance(core, dict) or not _is_plain(core):
        return None
    try:
        return msgspec.json.Decoder(_Compiler(schema).type_of(schema))
    except (_Unsupported, TypeError):
        return None


def _is_plain(node: Any) -> bool:
    if not isinstance(node, dict):
        return True
    kind = node.get("type")
    if kind == "default":
        return node.get("default", 0) is None and "default_factory" not in node and _is_plain(node.get("schema"))
    if kind not in _PLAIN_CORE or any(key not in _PLAIN_KEYS for key in node):
        return False
    if node.get("custom_init") or node.get("root_model") or node.get("computed_fields"):
        return False
    config = node.get("config") or {}
    if config.get("extra_fields_behavior") == "allow" or any("alias" in key for key in config):
        return False
    if kind == "enum" and node.get("sub_type") not in ("str", "int", None):
        return False
    children = [node.get("schema"), node.get("items_schema"), *(node.get("fields") or {}).values()]
    return all(_is_plain(child) for child in children if child is not None)


def _pydantic_message(error: Any) -> str:
    problems = error.errors(include_url=False)
    if problems and problems[0].get("type") == "json_invalid":
        return f"not JSON: {problems[0].get('ctx', {}).get('error', problems[0]['msg'])}"
    parts = [f"{'.'.join(map(str, p['loc'])) or '$'}: {p['msg']}" for p in problems[:3]]
    if len(problems) > 3:
        parts.append(f"and {len(problems) - 3} more")
    return "; ".join(parts)


def _from_dict(spec: Mapping[str, Any], name: str | None) -> OutputSchema:
    description = None
    if isinstance(spec.get("schema"), Mapping) and "type" not in spec:  # a json_schema object, not a schema
        if spec.get("strict") is False:
            raise StrictSchemaError("strict", "output_schema is always sent with strict: true")
        name = name or spec.get("name")
        description = spec.get("description")
        spec = spec["schema"]
    schema = _plain(spec)
    check_strict_schema(schema)
    title = schema.get("title")
    chosen = name or (title if isinstance(title, str) and _NAME.fullmatch(title) else "output")
    return OutputSchema(_check_name(chosen), schema, None, description, _dict_validator(schema))


def _plain(value: Any) -> Any:
    """A JSON copy of ``value`` (so later changes to the caller's dict change nothing here)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dict_validator(schema: dict[str, Any]) -> Callable[[bytes | str], bytes]:
    """
    Validation against a dict schema: compiled to msgspec types where strict mode's subset maps onto them (fast:
    the answer is decoded once, typed), else the ``jsonschema`` package (Airflow's own dependency) with
    ``integer`` meaning a JSON integer, as msgspec reads it.
    """
    try:
        decoder: msgspec.json.Decoder[Any] | None = msgspec.json.Decoder(_Compiler(schema).type_of(schema))
    except (_Unsupported, TypeError):
        decoder = None
    if decoder is not None:
        decode = decoder.decode

        def validate(text: bytes | str) -> bytes:
            try:
                decode(text)
            except (msgspec.ValidationError, msgspec.DecodeError) as error:
                raise InvalidOutput(_msgspec_message(error)) from None
            return _one_line(text)

        return validate
    return _jsonschema_validator(schema)


def _msgspec_message(error: Exception) -> str:
    text = str(error)
    return f"not JSON: {text}" if isinstance(error, msgspec.DecodeError) and "malformed" in text.lower() else text


def _one_line(text: bytes | str) -> bytes:
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if b"\n" in raw or b"\r" in raw:  # pretty-printed JSON: compacted, so the value fits on one JSONL line
        return msgspec.json.encode(msgspec.json.decode(raw))
    return raw


def _jsonschema_validator(schema: dict[str, Any]) -> Callable[[bytes | str], bytes]:
    import jsonschema

    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    validator = jsonschema.validators.extend(base, type_checker=checker)(schema)

    def validate(text: bytes | str) -> bytes:
        try:
            value = msgspec.json.decode(text)
        except msgspec.DecodeError as error:
            raise InvalidOutput(f"not JSON: {error}") from None
        problem = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if problem is not None:
            where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem.absolute_path)
            raise InvalidOutput(f"{problem.message} - at `{where}`")
        return _one_line(text)

    return validate


class _Unsupported(Exception):
    """A construct msgspec types cannot express exactly (the jsonschema validator takes the schema instead)."""


class _Compiler:
    """Strict mode's JSON Schema subset as msgspec types: each object a Struct that forbids unknown fields."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.structs = 0
        self.resolving: set[str] = set()

    def type_of(self, node: Mapping[str, Any]) -> Any:
        if "$ref" in node:
            ref = node["$ref"]
            if ref in self.resolving:
                raise _Unsupported("recursive schema")
            self.resolving.add(ref)
            try:
                return self.type_of(_resolve(self.root, ref, "$"))
            finally:
                self.resolving.discard(ref)
        if "anyOf" in node:
            return _union([self.type_of(v) for v in node["anyOf"]])
        if "enum" in node or "const" in node:
            return _literal(node["enum"] if "enum" in node else [node["const"]])
        types = node.get("type")
        if isinstance(types, list):
            return _union([self.type_of({**node, "type": t}) for t in types])
        if types == "string":
            return Annotated[str, msgspec.Meta(pattern=node["pattern"])] if "pattern" in node else str
        if types in ("number", "integer"):
            meta = {
                name: node[key]
                for key, name in (
                    ("minimum", "ge"),
                    ("maximum", "le"),
                    ("exclusiveMinimum", "gt"),
                    ("exclusiveMaximum", "lt"),
                    ("multipleOf", "multiple_of"),
                )
                if key in node
            }
            base: Any = int if types == "integer" else float
            return Annotated[base, msgspec.Meta(**meta)] if meta else base
        if types == "boolean":
            return bool
        if types == "null":
            return None
        if types == "array":
            item = self.type_of(node["items"]) if "items" in node else Any
            sizes = {n: node[k] for k, n in (("minItems", "min_length"), ("maxItems", "max_length")) if k in node}
            return Annotated[list[item], msgspec.Meta(**sizes)] if sizes else list[item]  # type: ignore[valid-type]
        if types == "object" or "properties" in node:
            properties = node.get("properties") or {}
            attributes = [(f"f{i}", self.type_of(child)) for i, child in enumerate(properties.values())]
            self.structs += 1
            return msgspec.defstruct(
                f"Output{self.structs}",
                attributes,
                rename=dict(zip([a for a, _ in attributes], properties, strict=True)),
                forbid_unknown_fields=True,
                gc=False,  # decoded only to be checked and dropped: no cycles, and not tracked costs less
            )
        if types is None:
            return Any
        raise _Unsupported(f"type {types!r}")


def _union(types: list[Any]) -> Any:
    merged: Any = types[0]
    for extra in types[1:]:
        merged = Union[merged, extra]  # noqa: UP007 (built from a list)
    return merged


def _literal(values: list[Any]) -> Any:
    kept = [v for v in values if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in kept):
        raise _Unsupported("an enum of values other than strings and integers")
    if not kept:
        return None
    literal = Literal[tuple(kept)]  # type: ignore[valid-type]
    return Union[literal, None] if len(kept) < len(values) else literal  # noqa: UP007


# --- the request ---------------------------------------------------------------------------------------


def _schema_endpoint(endpoint: str) -> str:
    for suffix in SCHEMA_ENDPOINTS:
        if endpoint.endswith(suffix):
            return suffix
    raise ValueError(
        f"output_schema works with /v1/chat/completions and /v1/responses; {endpoint!r} has no structured output"
    )


def response_format(spec: OutputSchemaLike, endpoint: str) -> dict[str, Any]:
    """
    The body fields that ask ``endpoint`` for ``spec``: chat completions ``{"response_format": {"type":
    "json_schema", "json_schema": {name, schema, strict: true}}}``, responses ``{"text": {"format": {"type":
    "json_schema", name, schema, strict: true}}}`` (the shapes of the SDK's ``type_to_response_format_param`` and
    ``type_to_text_format_param``).
    """
    schema = output_schema(spec)
    if _schema_endpoint(endpoint) == "/chat/completions":
        return {"response_format": {"type": "json_schema", "json_schema": schema.json_schema_param()}}
    return {"text": {"format": {"type": "json_schema", **schema.json_schema_param()}}}


def apply_output_schema(body: Mapping[str, Any], endpoint: str, spec: OutputSchemaLike) -> dict[str, Any]:
    """
    ``body`` asking for ``spec``: a copy with the response format set (other ``text`` settings, such as
    ``verbosity``, kept). A body that already sets the same format is left as it is; one that sets another raises
    :class:`OutputSchemaConflict` naming the field, so a request never asks for two formats.
    """
    wanted = response_format(spec, endpoint)
    out = dict(body)
    if "response_format" in wanted:
        current = body.get("response_format")
        if current is not None and current != wanted["response_format"]:
            raise OutputSchemaConflict(
                "body.response_format",
                f"the request sets its own response_format ({_format_name(current)}), "
                f"not the job's output_schema '{wanted['response_format']['json_schema']['name']}': remove one",
            )
        out["response_format"] = wanted["response_format"]
        return out
    text = body.get("text")
    if text is not None and not isinstance(text, Mapping):
        raise OutputSchemaConflict("body.text", f"text must be an object, got {type(text).__name__}")
    current = (text or {}).get("format")
    if current is not None and current != wanted["text"]["format"]:
        raise OutputSchemaConflict(
            "body.text.format",
            f"the request sets its own text.format ({_format_name(current)}), "
            f"not the job's output_schema '{wanted['text']['format']['name']}': remove one",
        )
    out["text"] = {**(text or {}), "format": wanted["text"]["format"]}
    return out


#: The body field of each endpoint that caps the answer's tokens (the SDK's create params: chat's ``max_tokens`` is
#: deprecated there for ``max_completion_tokens``, which reasoning models require).
MAX_TOKENS_FIELDS = {
    "/chat/completions": "max_completion_tokens",
    "/responses": "max_output_tokens",
    "/completions": "max_tokens",
}
#: Every field that caps an answer's tokens, on any endpoint.
_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def max_tokens_field(endpoint: str) -> str:
    """The body field that caps an answer's tokens on ``endpoint`` (chat completions: ``max_completion_tokens``)."""
    for suffix in MAX_TOKENS_FIELDS:  # "/chat/completions" before "/completions"
        if endpoint.endswith(suffix):
            return MAX_TOKENS_FIELDS[suffix]
    raise ValueError(f"max_tokens applies to {', '.join('/v1' + e for e in MAX_TOKENS_FIELDS)}, not {endpoint!r}")


def with_max_tokens(body: Mapping[str, Any], endpoint: str, max_tokens: int | None) -> dict[str, Any]:
    """
    ``body`` (a request body, or the fields to add to every one) with its answer capped at ``max_tokens`` under
    ``endpoint``'s field (:func:`max_tokens_field`); a body that already sets a cap of another value raises
    ``ValueError`` naming it, so a request never has two caps.
    """
    out = dict(body)
    if max_tokens is None:
        return out
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    field = max_tokens_field(endpoint)
    for name in _CAP_FIELDS:
        if name in out and out[name] != max_tokens:
            raise ValueError(
                f"the request sets {name}={out[name]!r} and max_tokens={max_tokens} asks for {field}={max_tokens}: "
                "give one"
            )
    out[field] = max_tokens
    return out


def prompt_item(i: int, item: Any) -> tuple[str, str | list[dict[str, Any]]] | None:
    """
    The ``(custom_id, prompt)`` of the ``i``-th item of a source, or ``None`` when it is not a prompt (a request
    dict). A prompt is a string or a list of messages (``prompt-000042`` from its position), a ``(key, prompt)``
    pair, a ``[key, prompt]`` list whose second item is a string (how XCom gives a pair back), or a row
    ``{"key": ..., "prompt": ...}`` (``key`` may be left out). A key is taken as a string (an id column's
    integers are fine). A row with other fields raises ``ValueError`` naming them.
    """
    if isinstance(item, str):
        return f"prompt-{i:06d}", item
    if isinstance(item, tuple) and len(item) == 2:
        return _keyed(i, item[0], item[1])
    if isinstance(item, list):
        if len(item) == 2 and isinstance(item[1], str) and not isinstance(item[0], Mapping):
            return _keyed(i, item[0], item[1])
        return f"prompt-{i:06d}", item
    if isinstance(item, Mapping) and "prompt" in item and "body" not in item:
        extra = sorted(str(k) for k in item if k not in ("key", "prompt"))
        if extra:
            raise ValueError(f"item {i}: a prompt row has 'key' and 'prompt', not {extra}")
        return _keyed(i, item.get("key"), item["prompt"])
    return None


def _keyed(i: int, key: Any, prompt: Any) -> tuple[str, Any]:
    if key is None or (isinstance(key, str) and not key.strip()):
        return f"prompt-{i:06d}", prompt
    return str(key), prompt


def prompt_request(
    custom_id: str,
    prompt: str | list[dict[str, Any]],
    *,
    endpoint: str,
    model: str,
    output_schema: OutputSchemaLike | None = None,
    **body: Any,
) -> dict[str, Any]:
    """
    One batch input line for a prompt: chat completions get it as the user message (a list is taken as the
    ``messages`` themselves), responses as ``input``; ``body`` adds other request fields (``temperature``,
    ``max_tokens``, ``instructions``...; :func:`with_max_tokens` puts a cap under the endpoint's own field), and
    ``output_schema`` the response format (:func:`apply_output_schema`).
    """
    if endpoint.endswith("/chat/completions"):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        request: dict[str, Any] = {"model": model, "messages": messages, **body}
    elif endpoint.endswith("/responses"):
        request = {"model": model, "input": prompt, **body}
    else:
        raise ValueError(f"a prompt is sent to /v1/chat/completions or /v1/responses, not {endpoint!r}")
    if output_schema is not None:
        request = apply_output_schema(request, endpoint, output_schema)
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": request}


def _format_name(current: Any) -> str:
    if not isinstance(current, Mapping):
        return repr(current)
    name = current.get("name") or (current.get("json_schema") or {}).get("name")
    return f"type {current.get('type')!r}" + (f", name {name!r}" if name else "")


# --- one row's outcome ---------------------------------------------------------------------------------


class Outcome(msgspec.Struct, gc=False):
    """
    What one answered request means. ``output``: the validated value (with a schema) or the endpoint's useful value
    (without); ``None`` unless ``succeeded``. ``text``: what the model wrote, for text endpoints. ``error``: for
    ``invalid_output`` / ``refused`` / ``truncated`` / ``failed``, ``{"code", "message"[, "reason", "text"]}``.
    """

    status: RowStatus
    output: Any = None
    text: str | None = None
    error: dict[str, Any] | None = None
    kind: OutputKind = "none"


class _Item(msgspec.Struct, gc=False):
    type: str = ""
    phase: Any = None
    content: Any = None


class _Message(msgspec.Struct, gc=False):
    content: Any = None
    refusal: Any = None


class _Choice(msgspec.Struct, gc=False):
    message: _Message | None = None
    text: Any = None
    finish_reason: Any = None


class _Incomplete(msgspec.Struct, gc=False):
    reason: Any = None


_NULL = msgspec.Raw(b"null")


class _Datum(msgspec.Struct, gc=False):
    #: Kept as its JSON: a vector of 1,536 numbers goes on to a joined line or an Arrow column as the bytes read.
    embedding: msgspec.Raw = _NULL


class _Moderation(msgspec.Struct, gc=False):
    flagged: bool = False
    categories: dict[str, Any] = {}


class _Body(msgspec.Struct, gc=False):
    """The fields of every endpoint's answer that the outcome reads; everything else is skipped unbuilt."""

    choices: list[_Choice] | None = None
    output: list[_Item] | str | None = None
    status: Any = None
    incomplete_details: _Incomplete | None = None
    error: Any = None
    data: list[_Datum] | None = None
    results: list[_Moderation] | None = None


_body_decoder = msgspec.json.Decoder(_Body)


def kind_of_url(url: str | None) -> OutputKind:
    """What an endpoint answers with, by its URL (``/v1/embeddings`` → ``embedding``)."""
    url = url or ""
    if url.endswith(("/chat/completions", "/completions", "/responses")):
        return "text"
    if url.endswith("/embeddings"):
        return "embedding"
    if url.endswith("/moderations"):
        return "moderation"
    return "none"


def row_outcome(body: Any, output_schema: OutputSchemaLike | None = None) -> Outcome:
    """
    The outcome of one request answered with HTTP 200: its response ``body`` (the bytes of the JSON, or the
    decoded object) read into a status and an ``output``.

    The first choice of a chat or completions answer is read (``n`` > 1: the others stay in the response); a
    Responses answer's text is its ``output_text`` parts (with a schema: of its final messages, as the SDK's
    ``parse()`` reads them). Without a schema the output is the text, the embedding vector (a list of vectors when
    the request sent several inputs; base64 answers decoded), or ``{"flagged", "categories"}`` of a moderation
    (the flagged categories' names, over every input); other endpoints' outputs are ``None``. A schema only applies
    to text endpoints.
    """
    schema = (
        None
        if output_schema is None
        else output_schema
        if isinstance(output_schema, OutputSchema)
        else (output_schema_cached(output_schema))
    )
    outcome = body_outcome(body, schema)
    outcome.output = as_value(outcome.output)
    return outcome


def output_schema_cached(spec: OutputSchemaLike) -> OutputSchema:
    """:func:`output_schema`, built once per model class (a dict is built again: it is not hashable)."""
    if isinstance(spec, type):
        found = _BUILT.get(spec)
        if found is None:
            found = _BUILT[spec] = output_schema(spec)
        return found
    return output_schema(spec)


_BUILT: dict[type, OutputSchema] = {}


def body_outcome(body: Any, schema: OutputSchema | None) -> Outcome:
    """
    :func:`row_outcome` for the join: ``output`` of a validated answer stays the JSON bytes it was written as
    (``msgspec.Raw``), so it can go into a joined line without being decoded and encoded again.
    """
    try:
        if isinstance(body, Mapping):  # a decoded body (a row object's): read as its JSON, the same way
            body = msgspec.json.encode(body)
        parsed = (
            _body_decoder.decode(body)
            if isinstance(body, (bytes, msgspec.Raw, bytearray, memoryview, str))
            else _Body()
        )
    except (msgspec.ValidationError, msgspec.DecodeError):
        parsed = _Body()
    return answer_outcome(parsed, schema)


#: The fields of an answer :func:`answer_outcome` reads, as a msgspec type to decode result lines with.
Answer = _Body


def answer_outcome(parsed: _Body, schema: OutputSchema | None) -> Outcome:
    """:func:`body_outcome` of an answer already decoded as :data:`Answer`."""
    if parsed.choices:
        return _choice_outcome(parsed.choices[0], schema)
    if isinstance(parsed.output, list) or parsed.status is not None:
        return _responses_outcome(parsed, schema)
    if isinstance(parsed.output, str):  # a compatible server's own endpoint answering with text
        return _text_outcome(parsed.output, schema)
    data = parsed.data
    if data:
        vectors = [_vector(d.embedding) for d in data]
        if None not in vectors:
            return Outcome("succeeded", vectors[0] if len(vectors) == 1 else vectors, kind="embedding")
    if parsed.results is not None:
        return Outcome("succeeded", _moderation(parsed.results), kind="moderation")
    if schema is not None:
        return _invalid("the answer holds no text to validate", None)
    return Outcome("succeeded")


def plain_output(parsed: _Body, schema: OutputSchema) -> bytes | None:
    """
    The validated output (compact JSON) of a chat answer that plainly succeeded: not refused, not cut short, its
    text valid for ``schema``; ``None`` for any other answer, which :func:`answer_outcome` reads. For such an
    answer, ``answer_outcome`` gives ``succeeded`` with this output: a typed join's common row, read without
    building its :class:`Outcome`.
    """
    choices = parsed.choices
    if not choices:
        return None
    choice = choices[0]
    text = choice.message.content if choice.message is not None else None
    if type(text) is not str or _ended_early(choice, text) is not None:
        return None
    try:
        return schema.validate(text)
    except InvalidOutput:
        return None


def _choice_outcome(choice: _Choice, schema: OutputSchema | None) -> Outcome:
    message = choice.message
    text = message.content if message is not None else choice.text
    text = text if isinstance(text, str) else None
    return _ended_early(choice, text) or _text_outcome(text, schema)


def _ended_early(choice: _Choice, text: str | None) -> Outcome | None:
    """A choice refused (``message.refusal``, ``finish_reason: content_filter``) or cut short (``length``)."""
    message = choice.message
    if message is not None and message.refusal:
        return Outcome("refused", None, text, {"code": "refused", "message": str(message.refusal)}, "text")
    reason = choice.finish_reason
    if reason == "length":
        return _truncated(text, "length", "the answer reached the token limit (finish_reason 'length')")
    if reason == "content_filter":
        message_text = "a content filter stopped the answer (finish_reason 'content_filter')"
        return Outcome("refused", None, text, {"code": "refused", "reason": reason, "message": message_text}, "text")
    return None


def _responses_outcome(body: _Body, schema: OutputSchema | None) -> Outcome:
    items = body.output if isinstance(body.output, list) else []
    texts, final, refusal = [], [], None
    for item in items:
        if item.type != "message" or not isinstance(item.content, list):
            continue
        for part in item.content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                if item.phase in (None, "final_answer"):
                    final.append(part["text"])
            elif kind == "refusal" and refusal is None:
                refusal = str(part.get("refusal") or "")
    text = "".join(texts) if texts else None
    if refusal is not None:
        return Outcome("refused", None, text, {"code": "refused", "message": refusal}, "text")
    if body.status == "incomplete":
        reason = body.incomplete_details.reason if body.incomplete_details else None
        if reason == "content_filter":
            error = {"code": "refused", "reason": reason, "message": "a content filter stopped the answer"}
            return Outcome("refused", None, text, error, "text")
        return _truncated(text, reason, f"the response is incomplete ({reason or 'no reason given'})")
    if body.status == "failed":
        error = body.error if isinstance(body.error, dict) else {}
        return Outcome("failed", None, text, {"code": error.get("code"), "message": error.get("message")}, "text")
    return _text_outcome("".join(final) if schema is not None and final else text, schema)


def _text_outcome(text: str | None, schema: OutputSchema | None) -> Outcome:
    if schema is None:
        return Outcome("succeeded", text, text, None, "text")
    if text is None:
        return _invalid("the answer holds no text (a tool call, or no content)", None)
    try:
        return Outcome("succeeded", msgspec.Raw(schema.validate(text)), text, None, "text")
    except InvalidOutput as error:
        return _invalid(str(error), text)


def _invalid(message: str, text: str | None) -> Outcome:
    return Outcome("invalid_output", None, text, {"code": "invalid_output", "message": message, "text": text}, "text")


def _truncated(text: str | None, reason: Any, message: str) -> Outcome:
    error = {"code": "truncated", "reason": reason, "message": message, "text": text}
    return Outcome("truncated", None, text, error, "text")


def _vector(embedding: msgspec.Raw) -> msgspec.Raw | list[float] | None:
    """
    A vector: its JSON as read when it is a flat array (no re-encoding), floats from ``encoding_format: "base64"``
    (little-endian float32 bytes), ``None`` when the datum holds none (an image, say).
    """
    data = bytes(embedding)
    first = data[0] if data else 0
    if first == 91 and data.find(b"[", 1) < 0 and data.find(b"{") < 0 and data.find(b'"') < 0:  # '['
        return embedding
    if first == 34:  # '"': base64
        try:
            values = array.array("f", base64.b64decode(msgspec.json.decode(embedding)))
        except (binascii.Error, ValueError, msgspec.DecodeError):
            return None
        if array.array("H", [1]).tobytes() != b"\x01\x00":  # pragma: no cover - a big-endian machine
            values.byteswap()
        return values.tolist()
    if first == 91:
        try:
            return msgspec.json.decode(embedding, type=list[float])
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
    return None


def as_value(output: Any) -> Any:
    """An outcome's ``output`` as Python values (the join keeps JSON it passes through as ``msgspec.Raw``)."""
    if isinstance(output, msgspec.Raw):
        return msgspec.json.decode(output)
    if isinstance(output, list) and output and isinstance(output[0], msgspec.Raw):
        return [as_value(item) for item in output]
    return output


def _moderation(results: list[_Moderation]) -> dict[str, Any]:
    flagged, names = False, dict[str, None]()
    for result in results:
        flagged = flagged or bool(result.flagged)
        for name, value in result.categories.items():
            if value:
                names[name] = None
    return {"flagged": flagged, "categories": list(names)}
