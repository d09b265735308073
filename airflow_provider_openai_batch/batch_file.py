"""
Batch input and result files (JSONL): streaming validation and sharding of input, the shape of a result line.

Validation runs before anything is uploaded, so a bad file costs nothing but the read. It streams line by
line (a 200 MB file never sits in memory), keeps only the ``custom_id`` set, and collects the first several
problems with their line and field, because fixing one problem per paid-for attempt is not a workflow.
Lines are parsed with msgspec into structs that skip the request body, which keeps validation well above
the network speed of the upload that follows. Errors quote a bad value only in part (``MAX_SHOWN_CHARS``), and a
line nested deeper than ``MAX_NESTING_DEPTH`` is refused before it is parsed, since the parser recurses once per
level and would otherwise fail with a bare ``RecursionError`` that names no file or line.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from airflow_provider_openai_batch.endpoints import (
    EMBEDDINGS_ENDPOINT,
    MAX_EMBEDDING_INPUTS,
    batch_endpoints,
    count_embedding_inputs,
    required_body_fields,
)
from airflow_provider_openai_batch.exceptions import BatchInputError, InputIssue
from airflow_provider_openai_batch.storage import Source, describe, open_source

#: The endpoints the installed ``openai`` SDK lists for batches (``endpoints.batch_endpoints``). Compatible servers
#: may accept others: pass ``allowed_endpoints=None`` (or your own list) to the validator and operators.
OPENAI_BATCH_ENDPOINTS: tuple[str, ...] = batch_endpoints()
MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024
#: How many problems an error lists before it stops counting them individually.
MAX_REPORTED_ISSUES = 20
#: How deep arrays and objects may sit within each other in one line (the line's own object is level 1). OpenAI's
#: requests need a few levels, a JSON Schema for structured outputs a few dozen (OpenAI allows 10 schema levels);
#: the bound stays far below where the parser (one C recursion per level, within Python's recursion limit) fails.
MAX_NESTING_DEPTH = 128
#: How much of a bad value an error message quotes: a 2 MB value repeated on 20 lines is not a 40 MB error.
MAX_SHOWN_CHARS = 200

_BOM = b"\xef\xbb\xbf"
#: ``BatchFileValidator.check_block``'s typed decoders, one per endpoint.
_BLOCK_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {}


class _Line(msgspec.Struct):
    custom_id: Any = msgspec.UNSET
    method: Any = msgspec.UNSET
    url: Any = msgspec.UNSET
    #: Kept raw so validation never builds the (possibly large) request body; empty when the key is absent.
    body: msgspec.Raw = msgspec.Raw(b"")


_line_decoder = msgspec.json.Decoder(_Line)
#: A custom_id as the rules want it; the block check's types refuse anything else (the line checks then say why).
_CustomId = Annotated[str, msgspec.Meta(min_length=1)]
_Model = Annotated[str, msgspec.Meta(min_length=1)]
#: A body's fields, each left raw: which keys are present is all most checks need, and nothing large is built.
_body_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


@dataclass(frozen=True)
class BatchFileStats:
    """What validation learned about a valid file; the upload and create steps reuse it."""

    requests: int
    bytes: int
    endpoint: str | None
    model: str | None
    sha256: str
    #: Estimated input tokens (bytes / 4 per line), for quota planning.
    tokens: int = 0
    #: Embedding inputs across all requests (``/v1/embeddings`` only; OpenAI allows 50,000 per batch).
    embedding_inputs: int = 0


class _Collector:
    def __init__(self, limit: int) -> None:
        self.issues: list[InputIssue] = []
        self.more = 0
        self.limit = limit

    def add(self, line: int, field: str | None, message: str, code: str = "invalid_request") -> None:
        if len(self.issues) < self.limit:
            self.issues.append(InputIssue(line, field, message, code))
        else:
            self.more += 1


def _json_type(value: Any) -> str:
    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to ``MAX_SHOWN_CHARS`` with the value's full size after it."""
    text = repr(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(text)
    return f"{text[:MAX_SHOWN_CHARS]}… ({size:,} bytes)"


#: A JSON string (the unrolled form: no backtracking per character), so brackets inside strings do not count.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_AS_PARENTHESES = bytes.maketrans(b"[]{}", b"()()")
_NOT_A_BRACKET = bytes(byte for byte in range(256) if byte not in b"[]{}")


def nested_deeper_than(raw: bytes, limit: int = MAX_NESTING_DEPTH) -> bool:
    """
    Whether the JSON in ``raw`` nests arrays and objects more than ``limit`` levels deep, without parsing it.

    Cheap for ordinary lines: ``limit`` opening brackets or fewer cannot nest deeper, and finding them is a
    ``memchr`` per bracket (a line's few brackets cost less than counting every byte would). Otherwise strings are
    cut out, the brackets left become parentheses, and each round deletes every innermost ``()`` pair: a line
    still holding a pair after ``limit`` rounds nests deeper (each round is one C-speed pass over the brackets).
    """
    seen = 0
    for opener in b"[{":
        at = raw.find(opener)
        while at >= 0:
            seen += 1
            if seen > limit:
                return _deeper_than(raw, limit)
            at = raw.find(opener, at + 1)
    return False


def _deeper_than(raw: bytes, limit: int) -> bool:
    structure = _JSON_STRING.sub(b"", raw).translate(_AS_PARENTHESES, _NOT_A_BRACKET)
    for _ in range(limit):
        if b"()" not in structure:
            return False
        structure = structure.replace(b"()", b"")
    return b"()" in structure


def _too_deep(limit: int = MAX_NESTING_DEPTH) -> str:
    return f"the request is nested more than {limit} levels deep (arrays and objects within each other)"


def _explain_decode_error(error: Exception) -> tuple[str | None, str]:
    text = str(error)
    if len(text) > MAX_SHOWN_CHARS:  # the parser's own words, which may quote the input
        text = f"{text[:MAX_SHOWN_CHARS]}…"
    if isinstance(error, msgspec.ValidationError):
        if text.startswith("Expected `object`") and "at `$" not in text:
            return None, f"a line must be one JSON object ({text.split(' - ')[0].lower()})"
        return None, text
    return None, f"invalid JSON ({text})"


class BatchFileValidator:
    """
    Checks lines one at a time; usable on a whole file (``validate_batch_file``) or by a sharder feeding it
    lines as it goes, so the rules live in exactly one place.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        allowed_endpoints: Collection[str] | None = OPENAI_BATCH_ENDPOINTS,
        max_issues: int = MAX_REPORTED_ISSUES,
    ) -> None:
        self.endpoint = endpoint
        self.allowed_endpoints = None if allowed_endpoints is None else frozenset(allowed_endpoints)
        self.collector = _Collector(max_issues)
        self.custom_ids: set[str] = set()
        self.url: str | None = None
        self.model: str | None = None
        self.model_line = 0
        self.url_line = 0
        self.lines = 0
        self.requests = 0
        self.embedding_inputs = 0
        #: Blank lines not yet followed by a request: empty lines at the end of a file are harmless, others are not.
        self._blank_lines: list[int] = []
        if endpoint is not None and self.allowed_endpoints is not None and endpoint not in self.allowed_endpoints:
            self.collector.add(
                0,
                "endpoint",
                f"unsupported endpoint {shown(endpoint)}; supported: {', '.join(sorted(self.allowed_endpoints))}",
            )

    def check(self, lineno: int, raw: bytes) -> str | None:
        """Validate one raw line (without its newline); return its ``custom_id`` when it has a usable one."""
        if nested_deeper_than(raw):
            self.collector.add(lineno, None, _too_deep(), "invalid_json_line")
            return None
        try:
            return self._check(lineno, raw)
        except RecursionError:  # a stack already deep when validation began: still the line's fault, and named
            self.collector.add(lineno, None, _too_deep(), "invalid_json_line")
            return None

    def _check(self, lineno: int, raw: bytes) -> str | None:
        add = self.collector.add
        try:
            line = _line_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            field, message = _explain_decode_error(error)
            add(lineno, field, message, "invalid_json_line")
            return None
        custom_id = line.custom_id
        result: str | None = None
        if custom_id is msgspec.UNSET:
            add(lineno, "custom_id", "missing", "missing_required_parameter")
        elif not isinstance(custom_id, str):
            add(lineno, "custom_id", f"must be a string, got {_json_type(custom_id)}")
        elif not custom_id:
            add(lineno, "custom_id", "must not be empty")
        elif custom_id in self.custom_ids:
            add(lineno, "custom_id", f"duplicate custom_id {shown(custom_id)}", "duplicate_custom_id")
        else:
            self.custom_ids.add(custom_id)
            result = custom_id
        method = line.method
        if method is msgspec.UNSET:
            add(lineno, "method", "missing", "missing_required_parameter")
        elif method != "POST":
            add(lineno, "method", f"must be 'POST', got {shown(method)}", "invalid_method")
        self._check_url(lineno, line.url)
        self._check_body(lineno, line.body, line.url)
        return result

    def _check_url(self, lineno: int, url: Any) -> None:
        add = self.collector.add
        if url is msgspec.UNSET:
            add(lineno, "url", "missing", "missing_required_parameter")
            return
        if not isinstance(url, str) or not url:
            add(lineno, "url", f"must be a non-empty string, got {_json_type(url)}")
            return
        if self.endpoint is not None and url != self.endpoint:
            add(
                lineno,
                "url",
                f"{shown(url)} differs from the batch endpoint {shown(self.endpoint)}",
                "mismatched_endpoint",
            )
        elif self.allowed_endpoints is not None and url not in self.allowed_endpoints:
            add(
                lineno,
                "url",
                f"unsupported endpoint {shown(url)}; supported: {', '.join(sorted(self.allowed_endpoints))}",
                "invalid_url",
            )
        elif self.url is None:
            self.url, self.url_line = url, lineno
        elif url != self.url:
            add(
                lineno,
                "url",
                f"{shown(url)} differs from {shown(self.url)} on line {self.url_line}; one endpoint per file",
                "mismatched_endpoint",
            )

    def _check_body(self, lineno: int, body: msgspec.Raw, url: Any) -> None:
        add = self.collector.add
        if not body:
            add(lineno, "body", "missing", "missing_required_parameter")
            return
        try:
            fields = _body_decoder.decode(body)
        except msgspec.ValidationError:
            add(lineno, "body", f"must be an object, got {_json_type(msgspec.json.decode(body))}")
            return
        endpoint = self.endpoint or (url if isinstance(url, str) else None)
        # What the SDK's request type for this endpoint marks Required: ``model`` on chat, completions and embeddings,
        # but not on moderations, images, videos or responses (those have a default, or a stored prompt supplies it).
        for name in sorted(required_body_fields(endpoint) - fields.keys()):
            add(lineno, f"body.{name}", "missing", "missing_required_parameter")
        if "model" in fields:
            self._check_model(lineno, msgspec.json.decode(fields["model"]))
        if endpoint == EMBEDDINGS_ENDPOINT and "input" in fields:
            self.embedding_inputs += count_embedding_inputs(msgspec.json.decode(fields["input"]))

    def _check_model(self, lineno: int, model: Any) -> None:
        add = self.collector.add
        if not isinstance(model, str) or not model:
            add(lineno, "body.model", f"must be a non-empty string, got {_json_type(model)}")
        elif self.model is None:
            self.model, self.model_line = model, lineno
        elif model != self.model:
            add(
                lineno,
                "body.model",
                f"{shown(model)} differs from {shown(self.model)} on line {self.model_line}; one model per file",
                "mismatched_model",
            )

    def check_block(self, first: int, lines: list[bytes]) -> list[int] | None:
        """
        Lines ``first``, ``first + 1``, ... checked at once, when they are all ordinary valid requests: each line's
        embedding inputs (0 when the endpoint takes none), with the validator's state moved on exactly as
        ``check_line`` line by line would. ``None`` when any line is not (or something needs a line-by-line look:
        the first line, pending blank lines, an unknown endpoint): the validator is then unchanged, and the caller
        checks the block with ``check_line``, which finds and names every problem. The rules stay in one place:
        this only decides, in a few C-speed passes and typed decodes, that ``check_line`` would find nothing.
        """
        decoder = self._block_decoder()
        if decoder is None or first == 1 or self._blank_lines or self.collector.issues or not lines:
            return None
        data = b"\n".join(lines)
        if not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return None
        opened = (map(bytes.count, lines, itertools.repeat(bracket)) for bracket in (b"{", b"["))
        brackets = map(operator.add, *opened)
        if max(brackets) > MAX_NESTING_DEPTH:  # possibly too deep: for the line checks to measure
            return None
        try:
            parsed = [decoder.decode(raw) for raw in lines]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        ids = {line.custom_id for line in parsed}
        if len(ids) != len(parsed) or not ids.isdisjoint(self.custom_ids):
            return None
        if {line.url for line in parsed} != {self.endpoint}:
            return None
        models = {line.body.model for line in parsed}
        model = next(iter(models))
        if len(models) != 1 or (self.model is not None and model != self.model):
            return None
        if self.endpoint == EMBEDDINGS_ENDPOINT:
            inputs = [count_embedding_inputs(line.body.input) for line in parsed]
        else:
            inputs = [0] * len(parsed)
        self.custom_ids |= ids
        if self.url is None:
            self.url, self.url_line = self.endpoint, first
        if self.model is None and isinstance(model, str):
            self.model, self.model_line = model, first
        self.lines = first + len(lines) - 1
        self.requests += len(lines)
        self.embedding_inputs += sum(inputs)
        return inputs

    def _block_decoder(self) -> msgspec.json.Decoder[Any] | None:
        """The typed decoder ``check_block`` uses: lines whose fields are what the rules accept, for one known
        endpoint (its required body fields present, ``model`` a non-empty string)."""
        endpoint = self.endpoint
        if endpoint is None or (self.allowed_endpoints is not None and endpoint not in self.allowed_endpoints):
            return None
        decoder = _BLOCK_DECODERS.get(endpoint)
        if decoder is None:
            required = required_body_fields(endpoint)
            # Present is all the rules ask of the other required fields: kept raw, nothing is built of them.
            fields: list[Any] = [(name, msgspec.Raw) for name in sorted(required - {"model", "input"})]
            counted = endpoint == EMBEDDINGS_ENDPOINT  # its inputs are counted, so decoded
            if "input" in required:
                fields.append(("input", Any if counted else msgspec.Raw))
            if "model" in required:
                fields.append(("model", _Model))
            if "model" not in required:
                fields.append(("model", _Model | UnsetType, UNSET))
            if counted and "input" not in required:
                fields.append(("input", Any, None))
            # Untracked by the garbage collector (they hold no cycles): a block's thousands of them would otherwise
            # set off collections that cost more than the decoding.
            body = msgspec.defstruct("_BlockBody", fields, gc=False)
            line = msgspec.defstruct(
                "_BlockLine",
                [("custom_id", _CustomId), ("method", Literal["POST"]), ("url", str), ("body", body)],
                gc=False,
            )
            decoder = _BLOCK_DECODERS[endpoint] = msgspec.json.Decoder(line)
        return decoder

    def check_line(self, lineno: int, raw: bytes) -> bytes | None:
        """
        File-level checks (BOM, blank line, UTF-8), then the request checks; returns the line (without a BOM)
        when it holds a request, ``None`` when it does not.
        """
        add = self.collector.add
        self.lines = lineno
        if lineno == 1 and raw.startswith(_BOM):
            add(
                1,
                None,
                "the file starts with a UTF-8 byte order mark (BOM); save it as UTF-8 without BOM",
                "invalid_encoding",
            )
            raw = raw[len(_BOM) :]
        if not raw.strip():
            self._blank_lines.append(lineno)
            return None
        for blank in self._blank_lines:
            add(blank, None, "blank line between requests; every line must hold one request", "invalid_json_line")
        self._blank_lines.clear()
        try:
            if not raw.isascii():  # ASCII is UTF-8: most lines are checked without building a string of them
                raw.decode("utf-8")
        except UnicodeDecodeError as error:
            add(lineno, None, f"not valid UTF-8 (byte {error.start + 1} of the line)", "invalid_encoding")
            return None
        self.requests += 1
        self.check(lineno, raw)
        return raw

    def check_end(self) -> None:
        if self.requests == 0 and not self.collector.issues:
            self.collector.add(0, None, "the file is empty; a batch needs at least one request", "empty_file")

    def raise_if_invalid(self, source: str) -> None:
        if self.collector.issues:
            raise BatchInputError(source, self.collector.issues, more=self.collector.more)


def iter_raw_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Numbered lines without their line ending (LF or CRLF); blank lines are yielded too, for the caller to judge."""
    for number, raw, _ in iter_exact_lines(stream):
        yield number, raw


def iter_exact_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes, bytes]]:
    """``(number, line without its ending, the line's bytes as read)``: sizes and hashes of what is really sent."""
    for number, exact in enumerate(stream, start=1):
        raw = exact
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        yield number, raw, exact


#: About how many bytes of lines ``iter_line_blocks`` reads at a time.
LINE_BLOCK_BYTES = 1 << 20


def iter_line_blocks(stream: IO[bytes], size: int | None = None) -> Iterator[tuple[int, list[bytes]]]:
    """``(number of the first line, lines without their endings)``, about ``size`` bytes of lines at a time
    (``LINE_BLOCK_BYTES``): the lines ``iter_raw_lines`` yields, split by the C reader rather than one Python step
    each."""
    number = 1
    while True:
        exact = stream.readlines(size or LINE_BLOCK_BYTES)
        if not exact:
            return
        lines = [line[:-2] if line[-2:] == b"\r\n" else line[:-1] if line[-1:] == b"\n" else line for line in exact]
        yield number, lines
        number += len(lines)


def iter_lines(source: Source) -> Iterator[bytes]:
    """The non-blank lines of a file, streamed, without their line endings."""
    with open_source(source) as stream:
        for _, raw in iter_raw_lines(stream):
            if raw.strip():
                yield raw


def validate_batch_file(
    source: Source,
    *,
    endpoint: str | None = None,
    allowed_endpoints: Collection[str] | None = OPENAI_BATCH_ENDPOINTS,
    max_requests: int = MAX_REQUESTS_PER_FILE,
    max_bytes: int = MAX_BYTES_PER_FILE,
    max_issues: int = MAX_REPORTED_ISSUES,
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS,
) -> BatchFileStats:
    """
    Check a whole input file against the Batch API's rules, streaming, and raise ``BatchInputError``
    naming the file, each line and field (the first ``max_issues`` of them) when it breaks any.

    ``bytes`` and ``sha256`` are those of the file exactly as it will be sent: CRLF endings and a missing final
    newline as they are, empty lines at the end left out (OpenAI does not say it accepts them, so the upload sends
    the first ``bytes`` bytes only). A retry recognises its own earlier upload by that name and size.
    """
    name = describe(source)
    validator = BatchFileValidator(endpoint=endpoint, allowed_endpoints=allowed_endpoints, max_issues=max_issues)
    add = validator.collector.add
    digest = hashlib.sha256()
    size = tokens = 0
    trailing: list[bytes] = []  # empty lines not (yet) followed by a request: not sent if they end the file
    with open_source(source) as stream:
        for lineno, raw, exact in iter_exact_lines(stream):
            line = validator.check_line(lineno, raw)
            if not raw.strip():
                trailing.append(exact)
                continue
            for blank in trailing:
                size += len(blank)
                digest.update(blank)
            trailing.clear()
            size += len(exact)
            digest.update(exact)
            if line is not None:
                tokens += estimate_tokens(line)
                if len(exact) > max_bytes:
                    add(lineno, None, _request_too_big(len(exact), max_bytes), "file_too_large")
    validator.check_end()
    requests = validator.requests
    if requests > max_requests:
        add(
            0,
            None,
            f"{requests:,} requests; a batch file holds at most {max_requests:,} (shard the input)",
            "too_many_tasks",
        )
    if size > max_bytes:
        add(
            0,
            None,
            f"{size:,} bytes; a batch file holds at most {max_bytes:,} bytes (shard the input)",
            "file_too_large",
        )
    if validator.embedding_inputs > max_embedding_inputs:
        add(
            0,
            "body.input",
            f"{validator.embedding_inputs:,} embedding inputs; an embeddings batch holds at most "
            f"{max_embedding_inputs:,} across all its requests (shard the input)",
            "too_many_embedding_inputs",
        )
    validator.raise_if_invalid(name)
    return BatchFileStats(
        requests=requests,
        bytes=size,
        endpoint=validator.url,
        model=validator.model,
        sha256=digest.hexdigest(),
        tokens=tokens,
        embedding_inputs=validator.embedding_inputs,
    )


# --- sharding ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLimits:
    """
    When to start a new file. OpenAI's own limits by default; lower them to stay under a quota, e.g. an
    enqueued-token limit per batch (``max_tokens`` counts estimated input tokens: a line's bytes / 4).
    """

    max_requests: int = MAX_REQUESTS_PER_FILE
    max_bytes: int = MAX_BYTES_PER_FILE
    max_tokens: int | None = None
    #: Embedding inputs per file (``/v1/embeddings``: an ``input`` array counts each element; OpenAI allows 50,000).
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS

    def __post_init__(self) -> None:
        if not 0 < self.max_requests <= MAX_REQUESTS_PER_FILE:
            raise ValueError(f"max_requests must be 1..{MAX_REQUESTS_PER_FILE:,}, got {self.max_requests}")
        if not 0 < self.max_bytes <= MAX_BYTES_PER_FILE:
            raise ValueError(f"max_bytes must be 1..{MAX_BYTES_PER_FILE:,}, got {self.max_bytes}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not 0 < self.max_embedding_inputs <= MAX_EMBEDDING_INPUTS:
            raise ValueError(
                f"max_embedding_inputs must be 1..{MAX_EMBEDDING_INPUTS:,}, got {self.max_embedding_inputs}"
            )


@dataclass(frozen=True)
class Shard:
    """One valid batch file cut from a larger input, ready to upload."""

    path: Path
    requests: int
    bytes: int
    sha256: str
    first_line: int
    #: Estimated tokens (``line_tokens`` of ``shard_batch_file``) over the shard's requests.
    tokens: int = 0


def _request_too_big(size: int, limit: int) -> str:
    return (
        f"one request of {size:,} bytes; a batch file holds at most {limit:,} bytes and a request cannot be split "
        "across files"
    )


def too_many_inputs(validator: BatchFileValidator, lineno: int, line_inputs: int, limits: ShardLimits) -> bool:
    """One request holding more embedding inputs than a batch may (reported on ``validator``): it cannot be split."""
    if line_inputs <= limits.max_embedding_inputs:
        return False
    validator.collector.add(
        lineno,
        "body.input",
        f"{line_inputs:,} embedding inputs in one request; a batch holds at most {limits.max_embedding_inputs:,}",
        "too_many_embedding_inputs",
    )
    return True


def estimate_tokens(raw: bytes) -> int:
    """A cheap, conservative input-token estimate for quota planning: about four bytes per token."""
    return max(1, len(raw) // 4)


def shard_batch_file(
    source: Source,
    folder: Path,
    *,
    endpoint: str | None = None,
    allowed_endpoints: Collection[str] | None = OPENAI_BATCH_ENDPOINTS,
    limits: ShardLimits | None = None,
    max_issues: int = MAX_REPORTED_ISSUES,
    line_tokens: Callable[[bytes], int] | None = None,
) -> list[Shard]:
    """
    Validate ``source`` and cut it into files that each respect ``limits``, in one streaming pass.

    Every problem in the whole input is reported (file, line, field) before any shard is used, and
    ``custom_id`` must be unique across all shards, since results are joined back on it. Shards keep
    input order: shard 0 holds the first lines. ``line_tokens`` estimates one request line's tokens (for
    ``limits.max_tokens`` and ``Shard.tokens``; default ``estimate_tokens``).
    """
    count_tokens = line_tokens or estimate_tokens
    limits = limits or ShardLimits()
    name = describe(source)
    validator = BatchFileValidator(endpoint=endpoint, allowed_endpoints=allowed_endpoints, max_issues=max_issues)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[Shard] = []
    out: IO[bytes] | None = None
    digest = hashlib.sha256()
    count = size = tokens = inputs = start = 0

    pending: list[bytes] = []  # lines of the open shard not yet written: written a block at a time

    def flush() -> None:
        if out is not None and pending:
            data = b"\n".join(pending) + b"\n"
            out.write(data)
            digest.update(data)
            pending.clear()

    def close() -> None:
        nonlocal out
        if out is not None:
            flush()
            out.close()
            path = folder / f"shard-{len(shards):05d}.jsonl"
            shards.append(Shard(path, count, size, digest.hexdigest(), start, tokens))
            out = None

    def lines_checked(first: int, block: list[bytes]) -> tuple[Iterable[int], list[bytes], list[int]]:
        """The block's requests: line numbers, lines and embedding inputs. Checked at once when they are all
        ordinary, else line by line (every problem found and named)."""
        inputs = validator.check_block(first, block)
        if inputs is not None:
            return range(first, first + len(block)), block, inputs
        numbers, lines, counted = [], [], []
        for lineno, line in enumerate(block, start=first):
            inputs_before = validator.embedding_inputs
            raw = validator.check_line(lineno, line)
            if raw is not None:
                numbers.append(lineno)
                lines.append(raw)
                counted.append(validator.embedding_inputs - inputs_before)
        return numbers, lines, counted

    max_requests, max_bytes, max_tokens = limits.max_requests, limits.max_bytes, limits.max_tokens
    max_inputs = limits.max_embedding_inputs
    with open_source(source) as stream:
        for first, block in iter_line_blocks(stream):
            numbers, lines, counted = lines_checked(first, block)
            if validator.collector.issues:
                continue  # keep reading to report every problem, but write nothing more
            sizes = [len(raw) + 1 for raw in lines]
            if count_tokens is estimate_tokens:
                line_tokens_of = [max(1, (size - 1) // 4) for size in sizes]
            else:
                line_tokens_of = [count_tokens(raw) for raw in lines]
            for lineno, raw, size_of, line_inputs, this_tokens in zip(
                numbers, lines, sizes, counted, line_tokens_of, strict=True
            ):
                if size_of > max_bytes:
                    validator.collector.add(lineno, None, _request_too_big(size_of, max_bytes), "file_too_large")
                    continue
                if max_tokens is not None and this_tokens > max_tokens:
                    validator.collector.add(
                        lineno,
                        None,
                        f"one request of about {this_tokens:,} input tokens; a file holds at most "
                        f"{max_tokens:,} (max_tokens) and a request cannot be split across files",
                        "token_limit_exceeded",
                    )
                    continue
                if line_inputs > max_inputs and too_many_inputs(validator, lineno, line_inputs, limits):
                    continue
                if out is not None and (
                    count >= max_requests
                    or size + size_of > max_bytes
                    or (max_tokens is not None and tokens + this_tokens > max_tokens)
                    or inputs + line_inputs > max_inputs
                ):
                    close()
                if out is None:
                    out = (folder / f"shard-{len(shards):05d}.jsonl").open("wb")
                    digest = hashlib.sha256()
                    count = size = tokens = inputs = 0
                    start = lineno
                pending.append(raw)
                count, size, tokens = count + 1, size + size_of, tokens + this_tokens
                inputs += line_inputs
            flush()
    if out is not None:
        close()
    validator.check_end()
    validator.raise_if_invalid(name)
    return shards


# --- result files ---------------------------------------------------------------------------------


class ResultLine(msgspec.Struct):
    """One line of an output or error file, as OpenAI writes it."""

    custom_id: str
    id: str | None = None
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def encode_requests(requests: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """
    JSONL bytes for request dicts, one line each (what upload sends when given rows instead of a file).

    A row nested deeper than a file's line may be (``MAX_NESTING_DEPTH``) is an input error naming the row by its
    line number in the file it becomes, as validation names the lines of a file. The bound is checked on the
    encoded bytes, so it does not depend on the interpreter's recursion limit (which any library may raise); a row
    too deep for the encoder itself (it recurses once per level) is the same error.
    """
    encoder = msgspec.json.Encoder()
    for number, request in enumerate(requests, start=1):
        try:
            line = encoder.encode(request)
        except RecursionError:
            line = None
        if line is None or nested_deeper_than(line):
            raise BatchInputError("<rows>", [InputIssue(number, None, _too_deep(), "invalid_json_line")])
        yield line + b"\n"
