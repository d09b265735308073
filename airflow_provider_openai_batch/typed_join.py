"""
The join behind a typed Parquet file: result rows become Arrow columns while the results are still being read.

The JSONL join (``results._join_blocks`` with ``results.Buckets``) keeps lines in its bucket files, and a typed file
made from its lines would have every row turned into columns at the end, after the last bucket is joined, while
the rest of the machine waits. Here the join's buckets hold Arrow columns (IPC stream files): each group of typed
lines is read into columns by Arrow's JSON reader in a thread of its own, while the main thread reads the next
results (Arrow leaves Python's lock while it works, so the two use two cores); a bucket is joined by a ``take`` of
its rows in its inputs' order, and the buckets are interleaved in input order by another ``take``, both in C++.
The partitioning, the order file and the nesting are the JSONL join's (``results._join_blocks``); the inputs keep
only their key lines (``join_keys.py``), spilt by a child process beside the results' spill when they are local
files. What a row holds and what its status means stay ``results.py``'s and ``outputs.py``'s; the columns are
``parquet.Layout``'s.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from airflow_provider_openai_batch import join_keys
from airflow_provider_openai_batch import parquet as _parquet
from airflow_provider_openai_batch import results as _results
from airflow_provider_openai_batch.parquet import Layout, _pyarrow
from airflow_provider_openai_batch.storage import local_path, to_storage_path

log = logging.getLogger(__name__)

_DONE = object()
#: Rows per record batch of a joined bucket's file: the interleave holds a batch of each bucket at a time.
_BATCH_ROWS = 1024


class ArrowBuckets(_results.Buckets):
    """
    Bucket files of Arrow columns (in ``layout``'s read schema), each with its key lines beside it (``k<file>``),
    line for line with its rows: a bucket is joined by matching key lines as bytes, nothing decoded.
    """

    def __init__(self, layout: Layout, input_files: list[str] | None = None) -> None:
        super().__init__()
        self.layout = layout
        #: The inputs as local files, when they are (a child process may then spill their keys).
        self.input_files = input_files
        self.pa = _pyarrow()
        import pyarrow.compute
        import pyarrow.ipc

        self.pc = pyarrow.compute
        self.ipc = pyarrow.ipc

    # --- results into buckets ---------------------------------------------------------------------------

    def spill(self, results: Iterable[Any], folder: Path, shift: int) -> list[int]:
        """
        Results, as ``(keys, typed lines)`` (or ``(keys, table)`` a level down), into ``r<bucket>`` files of
        columns, in the order read. The main thread buckets the rows and writes their key lines; a converter
        thread reads each group of lines into columns and appends each bucket's rows to its file.
        """
        groups: queue.Queue[Any] = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        sizes = [0] * _results._FANOUT

        def convert() -> None:
            item = groups.get()
            try:
                with contextlib.ExitStack() as stack:
                    writers = [self._writer(folder / f"r{b}", stack) for b in range(_results._FANOUT)]
                    while item is not _DONE and not failure:
                        data, buckets = item
                        table = data if isinstance(data, self.pa.Table) else self.layout.read_lines(data, False)
                        self._to_buckets(writers, table, buckets)
                        item = groups.get()
            except BaseException as error:
                failure.append(error)
            while item is not _DONE:  # take what is still offered, up to the end mark
                item = groups.get()

        thread = threading.Thread(target=convert, name="typed-join-convert", daemon=True)
        thread.start()
        try:
            with contextlib.ExitStack() as stack:
                keys = [stack.enter_context((folder / f"kr{b}").open("wb")) for b in range(_results._FANOUT)]
                for lines, data, buckets in self._groups(results, shift):
                    if failure:
                        break
                    join_keys.to_buckets(keys, buckets, lines, [0] * _results._FANOUT)
                    groups.put((data, bytes(buckets)))
        finally:
            groups.put(_DONE)
            thread.join()
        if failure:
            raise failure[0]
        for bucket in range(_results._FANOUT):
            sizes[bucket] = (folder / f"r{bucket}").stat().st_size
        return sizes

    def _groups(self, results: Iterable[Any], shift: int) -> Iterator[tuple[list[bytes], Any, list[int]]]:
        """Result chunks gathered into groups of ``ROWS_PER_GROUP`` rows (or ``BYTES_PER_GROUP`` bytes)."""
        keys: list[bytes] = []
        blocks: list[bytes] = []
        size = 0
        for chunk_keys, rows in results:
            if not isinstance(rows, bytes):  # a table, a level down: a group already
                yield chunk_keys, rows, join_keys.bucket_of(chunk_keys, shift)
                continue
            keys += chunk_keys
            blocks.append(rows)
            size += len(rows)
            if len(keys) >= _parquet.ROWS_PER_GROUP or size >= _parquet.BYTES_PER_GROUP:
                yield keys, b"".join(blocks), join_keys.bucket_of(keys, shift)
                keys, blocks, size = [], [], 0
        if keys:
            yield keys, b"".join(blocks), join_keys.bucket_of(keys, shift)

    def _writer(self, path: Path, stack: contextlib.ExitStack) -> Any:
        """An IPC stream writer of the read schema into ``path``, closed (then its file) with ``stack``."""
        sink = stack.enter_context(self.pa.OSFile(str(path), "wb"))
        return stack.enter_context(self.ipc.new_stream(sink, self.layout.read_schema))

    def _to_buckets(self, writers: list[Any], table: Any, buckets: bytes) -> None:
        """The rows of ``table`` appended to their buckets' files, in order (a stable sort by bucket, then slices)."""
        pa, pc = self.pa, self.pc
        of = pa.Array.from_buffers(pa.uint8(), len(buckets), [None, pa.py_buffer(buckets)])
        by_bucket = table.take(pc.sort_indices(of)).combine_chunks()
        start = 0
        for bucket, rows in sorted(collections.Counter(buckets).items()):
            writers[bucket].write_table(by_bucket.slice(start, rows))
            start += rows

    def inputs_beside(self, folder: Path, shift: int) -> _results.Beside | None:
        """
        The inputs' key lines spilt by a child process (``join_keys.py`` run as a script) while this one spills
        the results, when they are local files of at least ``_BESIDE_BYTES``; ``None`` otherwise, or when the
        child cannot be started.
        """
        files = self.input_files
        if not files or not sys.executable or sum(os.path.getsize(f) for f in files) < _BESIDE_BYTES:
            return None
        errors = folder / "inputs.err"
        (folder / join_keys.INPUT_FILES).write_bytes(b"".join(os.fsencode(f) + b"\0" for f in files))
        # The import path as the import system reads it: its str (and bytes) entries; anything else it skips.
        path = [os.fsdecode(p) for p in sys.path if isinstance(p, (str, bytes))]
        (folder / _PATH).write_text(json.dumps(path))
        command = [sys.executable, "-I", "-c", _CHILD, join_keys.__file__, str(shift), str(folder)]
        try:
            with errors.open("wb") as stderr:
                child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        except OSError as error:
            log.warning("The inputs' keys are read in this process: no process could be started for them (%s)", error)
            return None
        return _Child(child, folder, errors)

    # --- a bucket split a level down ----------------------------------------------------------------------

    def results(self, folder: Path, bucket: int) -> Iterable[Any]:
        """A bucket's rows as ``(key lines, table)`` batches."""
        with (folder / f"kr{bucket}").open("rb") as keys, self._reader(folder / f"r{bucket}") as reader:
            for batch in reader:
                yield [keys.readline() for _ in range(batch.num_rows)], self.pa.Table.from_batches([batch])

    def inputs(self, path: Path) -> Iterable[Any]:
        """A bucket's inputs (key lines) as ``(keys, lines)``: the key lines are both."""
        return ((lines, lines) for lines in _results._file_chunks(path))

    @contextlib.contextmanager
    def _reader(self, path: Path) -> Iterator[Any]:
        # Read into buffers of its own, not mapped: a mapped file's pages stay in the process's memory once read.
        with self.pa.OSFile(str(path), "rb") as source:
            yield self.ipc.open_stream(source)

    def write(self, out_path: Path, joined: Iterable[Any]) -> None:
        with contextlib.ExitStack() as stack:
            out = self._writer(out_path, stack)
            for table in joined:
                out.write_table(table, max_chunksize=_BATCH_ROWS)

    # --- a bucket joined ---------------------------------------------------------------------------------

    def join(self, in_path: Path, folder: Path, bucket: int, out_path: Path, counts: Any) -> None:
        """
        The bucket's rows in its inputs' order (a later result for the same key wins); an input without a result
        gets a ``missing`` row. Rows are counted by the Parquet writer, from the file's ``status`` column.
        """
        pa = self.pa
        with self._reader(folder / f"r{bucket}") as reader:
            rows = reader.read_all()
        keys = (folder / f"kr{bucket}").read_bytes().splitlines(keepends=True)
        index = dict(zip(keys, range(len(keys)), strict=True))
        with contextlib.ExitStack() as stack:
            out = self._writer(out_path, stack)
            for wanted in _results._file_chunks(in_path):
                found: list[int | None] = list(map(index.get, wanted))
                source, taken = (rows, found) if None not in found else self._with_missing(rows, wanted, found)
                out.write_table(source.take(pa.array(taken, pa.int64())), max_chunksize=_BATCH_ROWS)

    def _with_missing(self, rows: Any, wanted: list[bytes], found: list[int | None]) -> tuple[Any, list[int | None]]:
        """``rows`` with a ``missing`` row added for each input without a result, and where each input's row is."""
        lines: list[bytes] = []
        filled: list[int | None] = []
        at = rows.num_rows
        for key, row in zip(wanted, found, strict=True):
            if row is None:
                lines.append(_results.missing_line(key))
                filled.append(at)
                at += 1
            else:
                filled.append(row)
        return self.pa.concat_tables([rows, self.layout.read_lines(b"".join(lines))]), filled

    def drop(self, folder: Path, bucket: int) -> None:
        for name in (f"r{bucket}", f"kr{bucket}"):
            (folder / name).unlink(missing_ok=True)

    # --- the buckets' rows in input order ----------------------------------------------------------------

    def in_order(self, folder: Path) -> Iterator[Any]:
        """
        Tables of up to ``ROWS_PER_GROUP`` rows in input order: for each stretch of the order file, each bucket's
        next rows are sliced off its file (read a batch at a time), put side by side bucket after bucket, and
        taken in the stretch's order (the inverse of a stable sort of the stretch by bucket).
        """
        pa, pc = self.pa, self.pc
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(self._reader(folder / f"o{b}")) for b in range(_results._FANOUT)]
            held: list[collections.deque[Any]] = [collections.deque() for _ in range(_results._FANOUT)]
            with (folder / "order").open("rb") as order:
                while sequence := order.read(_parquet.ROWS_PER_GROUP):
                    pieces = []
                    for bucket, wanted in sorted(collections.Counter(sequence).items()):
                        pieces += _take(held[bucket], readers[bucket], wanted)
                    side_by_side = pa.Table.from_batches(pieces, schema=self.layout.read_schema)
                    of = pa.Array.from_buffers(pa.uint8(), len(sequence), [None, pa.py_buffer(sequence)])
                    yield side_by_side.take(pc.sort_indices(pc.sort_indices(of)))


#: Local input files this large at least have their keys spilt by a process of their own (a child starts in about
#: a tenth of a second; reading 32 MB of requests for their keys takes about 30 ms here).
_BESIDE_BYTES = 32 << 20
#: The child's first lines. ``-I`` keeps the user's environment (``PYTHON*`` variables) out of it and the script's
#: folder (the package's modules) off its path; the path it imports from is then the task's own (``FOLDER/path``,
#: a JSON list), where msgspec was found (a venv, ``pip install --user``, ``PYTHONPATH``), and ``join_keys.py``
#: runs as ``__main__`` with its arguments (``SCRIPT SHIFT FOLDER``).
_CHILD = (
    "import json, os, runpy, sys; sys.argv = sys.argv[1:]; "
    "sys.path[:] = json.load(open(os.path.join(sys.argv[2], 'path'))); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
_PATH = "path"


class _Child:
    """A child process spilling the inputs' key lines (``ArrowBuckets.inputs_beside``)."""

    def __init__(self, process: subprocess.Popen[bytes], folder: Path, errors: Path) -> None:
        self.process, self.folder, self.errors = process, folder, errors

    def wait(self) -> bool:
        if self.process.wait() == 0 and (self.folder / join_keys.DONE).exists():
            return True
        said = self.errors.read_text(errors="replace").strip().splitlines()
        log.warning(
            "The inputs' keys are read again in this process: the process reading them ended with %s (%s)",
            self.process.returncode,
            said[-1] if said else "it said nothing",
        )
        return False

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _local_files(sources: list[Any]) -> list[str] | None:
    """The sources as local file names, or ``None`` when one of them is not a local file."""
    files = []
    for source in sources:
        if not isinstance(source, (str, os.PathLike)):
            return None
        path = local_path(to_storage_path(source))
        if path is None or not path.is_file():  # object storage, or no file
            return None
        files.append(str(path))
    return files


def _take(held: collections.deque[Any], reader: Any, rows: int) -> list[Any]:
    """The next ``rows`` rows of a bucket, as slices of its batches (``held``: what is read and not taken yet)."""
    taken = []
    while rows:
        if not held:
            held.append(reader.read_next_batch())
        batch = held.popleft()
        if batch.num_rows > rows:
            held.appendleft(batch.slice(rows))
            batch = batch.slice(0, rows)
        taken.append(batch)
        rows -= batch.num_rows
    return taken


def typed_tables(inputs: list[Any], results: Iterable[tuple[list[bytes], bytes]], layout: Layout) -> Iterator[Any]:
    """
    The typed join: ``results`` (``(key lines, block of typed lines)`` chunks) joined to the ``inputs`` (sources:
    only their key lines are kept), as tables of ``layout``'s read schema in input order (``Layout.columns_of``
    makes them the file's).
    """
    import tempfile

    buckets = ArrowBuckets(layout, _local_files(inputs))
    with tempfile.TemporaryDirectory(prefix="openai-batch-join-") as folder:
        key_lines = _results._input_key_lines(inputs)
        yield from _results._join_blocks(key_lines, results, Path(folder), _results._Counts(), buckets)
