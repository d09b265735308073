"""
A join's keys: key lines, the bucket of a key, and the inputs of a typed join spilt into their buckets.

The typed join (``typed_join.py``) keeps nothing of an input but its key line, and spills the inputs' key lines
while it spills the results: reading a million long request lines for their ids is a second of one core's time,
and the results' spill keeps the main thread's core busy, its Arrow thread the other one only in part. When the
inputs are local files, a child process of their own spills them (this file run as a script: it imports only the
standard library and msgspec, not the provider or Airflow, so it starts in a tenth of a second), and the task's
process waits for it after its own spill; when it cannot (object storage, a failed child), the task's process
spills them itself, the same way (:func:`spill_key_lines`). Buckets come from the CRC-32 of a key line, so two
processes agree on them (Python's ``hash`` of bytes differs from one process to another).
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import msgspec

#: Buckets per level of a join's partitioning (a power of two: the bucket is some bits of the key's hash).
FANOUT = 64
HASH_BITS = 6
#: Input lines longer than this on average (requests with their prompts and schemas) have their keys read off
#: the bytes; shorter ones are decoded, which is as fast for them.
LONG_LINE = 512
#: Lines read at a time (a size hint in bytes for ``readlines``).
CHUNK_BYTES = 1 << 20


class Keyed(msgspec.Struct, gc=False):
    """Only the key of a line: the rest is skipped over without being built."""

    custom_id: str


key_decoder = msgspec.json.Decoder(Keyed)
_encoder = msgspec.json.Encoder()


def chunks(stream: IO[bytes], size: int = CHUNK_BYTES) -> Iterator[list[bytes]]:
    """A JSONL stream as lists of whole lines (about ``size`` bytes each), each ending in a newline."""
    while lines := stream.readlines(size):
        if not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        yield lines


def decoded(decode: Callable[[bytes], Any], lines: list[bytes]) -> list[Any]:
    """Every line of ``lines`` decoded, blank lines dropped first (from ``lines`` too) when there are any."""
    try:
        return list(map(decode, lines))
    except msgspec.DecodeError:
        lines[:] = [line for line in lines if line.strip()]
        return list(map(decode, lines))


def key_lines(ids: list[str]) -> list[bytes]:
    """
    Key lines: each ``custom_id`` as its JSON string (as msgspec writes it) and a newline. A typed join keeps no
    more of an input, and matches inputs to results by these bytes: the same key is always the same bytes.
    """
    return _encoder.encode_lines(ids).splitlines(keepends=True)


def key_lines_of(lines: list[bytes]) -> list[bytes]:
    """
    The key lines of input lines (blank lines left out). A long line that starts with its ``custom_id`` (as
    ``json.dumps`` and msgspec write requests), the id's JSON string without an escape, has that string taken off
    the bytes as its key line's, without parsing the request after it (most of the line): msgspec escapes only
    quotes, backslashes and control characters, none of which such a string holds. Any other line (another key
    first, an escape in the id, or one that does not end as an object does: a file cut short) is decoded, and
    fails as a line that is no JSON does.
    """
    decode = key_decoder.decode
    if sum(map(len, lines)) < LONG_LINE * len(lines):
        return key_lines([k.custom_id for k in decoded(decode, lines)])
    found: list[bytes] = []
    append, encode = found.append, _encoder.encode
    for line in lines:
        if line.startswith(b'{"custom_id": "'):
            start = 14
        elif line.startswith(b'{"custom_id":"'):
            start = 13
        else:
            if line.strip():
                append(encode(decode(line).custom_id))
            continue
        end = line.find(b'"', start + 1) + 1
        if end > 0 and line.find(b"\\", start, end) < 0 and (line.endswith(b"}\n") or line.endswith(b"}\r\n")):
            append(line[start:end])
        else:
            append(encode(decode(line).custom_id))
    return (b"\n".join(found) + b"\n").splitlines(keepends=True) if found else []


def bucket_of(keys: Sequence[Any], shift: int) -> list[int]:
    """
    The bucket of each key at the level ``shift``: bits of the CRC-32 of a key line (bytes), the same in every
    process, or of Python's hash of an id (str: the JSONL join, in one process).
    """
    mask = FANOUT - 1
    if keys and isinstance(keys[0], bytes):
        crc = zlib.crc32
        return [(crc(k) >> shift) & mask for k in keys]
    return [(hash(k) >> shift) & mask for k in keys]


def to_buckets(files: Sequence[IO[bytes]], buckets: list[int], lines: list[bytes], sizes: list[int]) -> None:
    """Each line appended to its bucket's file, in order; ``sizes`` counts the bytes written per bucket."""
    held: list[list[bytes]] = [[] for _ in range(FANOUT)]
    appends = [h.append for h in held]
    for bucket, line in zip(buckets, lines, strict=True):
        appends[bucket](line)
    for bucket, bucket_lines in enumerate(held):
        if bucket_lines:
            sizes[bucket] += files[bucket].write(b"".join(bucket_lines))


def spill(
    chunks: Iterable[list[bytes] | tuple[list[Any], list[bytes]]],
    folder: Path,
    prefix: str,
    shift: int,
    order: IO[bytes] | None = None,
) -> list[int]:
    """
    Lines into ``FANOUT`` bucket files (``<prefix><bucket>``) by bits of their key's hash, in the order read; the
    bucket of each line, one byte a line, into ``order`` when given. A chunk's keys are the ``custom_id`` decoded
    from its lines, unless it comes with them (``(keys, lines)``: a typed join's key lines, hashed as their
    bytes). Returns the bytes written per bucket.
    """
    key = key_decoder.decode
    sizes = [0] * FANOUT
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context((folder / f"{prefix}{b}").open("wb")) for b in range(FANOUT)]
        for chunk in chunks:
            if isinstance(chunk, tuple):
                keys, lines = chunk
            else:
                keys, lines = [k.custom_id for k in decoded(key, chunk)], chunk
            buckets = bucket_of(keys, shift)
            if order is not None:
                order.write(bytes(buckets))
            to_buckets(outs, buckets, lines, sizes)
    return sizes


def key_line_chunks(lines: Iterable[list[bytes]]) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """
    The key lines of input lines, a chunk at a time, as ``(keys, lines)`` for :func:`spill` (the same list: the
    key lines are what a typed join keeps of its inputs).
    """
    for chunk in lines:
        keys = key_lines_of(chunk)
        yield keys, keys


def spill_key_lines(lines: Iterable[list[bytes]], folder: Path, shift: int) -> None:
    """Input lines' key lines into bucket files ``i<bucket>`` of ``folder``, and their buckets into ``order``."""
    with (folder / "order").open("wb") as order:
        spill(key_line_chunks(lines), folder, "i", shift, order)


def _files(paths: list[str]) -> Iterator[list[bytes]]:
    for path in paths:
        with open(path, "rb") as stream:
            yield from chunks(stream)


#: The input files a child spills, in ``FOLDER``: their names, each ended by a NUL (any name, however many).
INPUT_FILES = "inputs"
#: Written in ``FOLDER`` by a child once its spill is whole: its exit status alone is not proof of it (a process
#: that ignores SIGCHLD reads 0 for any child).
DONE = "inputs.done"


def main(argv: list[str]) -> None:
    """
    ``join_keys.py SHIFT FOLDER``: the key lines of the files ``FOLDER/inputs`` names, into its buckets. It stops
    when the task's process that started it is gone (killed: its folder is nobody's now).
    """
    shift, folder = int(argv[0]), Path(argv[1])
    names = (folder / INPUT_FILES).read_bytes().split(b"\0")[:-1]
    parent = os.getppid()

    def lines() -> Iterator[list[bytes]]:
        for chunk in _files([os.fsdecode(name) for name in names]):
            if os.getppid() != parent:
                sys.exit("the task's process is gone")
            yield chunk

    spill_key_lines(lines(), folder, shift)
    (folder / DONE).touch()


if __name__ == "__main__":
    main(sys.argv[1:])
