"""
Where batch files come from and go to: local paths, ``ObjectStoragePath`` (any fsspec protocol), bytes, streams.

One place so that upload, validation, download and the result helpers all accept the same things and all write
the same way: to a temporary name beside the destination, then a move, so a reader never sees half a file. An upload
of validated bytes reads through ``VerifiedRead``, so what is sent is what was validated.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union, cast

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import ObjectStoragePath

#: Anything a file can be read from. ``str`` is a local path or a URI with a scheme (``s3://…``).
Source = Union[str, os.PathLike, "ObjectStoragePath", bytes, bytearray, memoryview, IO[bytes]]
#: Anything a file can be written to: a local path, a URI, or an ``ObjectStoragePath``.
Destination = Union[str, os.PathLike, "ObjectStoragePath"]
log = logging.getLogger(__name__)


def _is_uri(value: str) -> bool:
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def to_storage_path(value: Destination) -> ObjectStoragePath | Path:
    """A URI becomes an ``ObjectStoragePath`` (fsspec), a plain path stays a local ``Path``."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    if isinstance(value, ObjectStoragePath):
        return value
    text = os.fspath(value)
    if _is_uri(text) and not text.startswith("file://"):
        return ObjectStoragePath(text)
    if text.startswith("file://"):
        return ObjectStoragePath(text)
    return Path(text)


def describe(source: Source) -> str:
    """A name for error messages: the path or URI, or what kind of in-memory object it was."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    if hasattr(source, "read"):
        return "<stream>"
    return str(source)


def source_name(source: Source) -> str:
    """The base file name to give OpenAI for an upload."""
    text = describe(source)
    if text.startswith("<"):
        return "batch_input.jsonl"
    return text.rstrip("/").rsplit("/", 1)[-1] or "batch_input.jsonl"


@contextlib.contextmanager
def open_source(source: Source) -> Iterator[IO[bytes]]:
    """Open any supported source as a binary stream, without reading it into memory."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
        return
    if isinstance(source, (str, os.PathLike)) or _is_object_storage_path(source):
        path = to_storage_path(source) if isinstance(source, (str, os.PathLike)) else source
        with path.open("rb") as stream:  # type: ignore[union-attr]
            yield stream
        return
    if hasattr(source, "read"):
        yield source  # type: ignore[misc]
        return
    raise TypeError(f"Cannot read a batch file from {type(source).__name__}")


class _RawAdapter(io.RawIOBase):
    """Gives any file-like object (e.g. Airflow's lineage-tracking wrapper) the ``io`` interface the SDK needs."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self._inner = inner
        self.name = getattr(inner, "name", "upload")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return bool(getattr(self._inner, "seekable", lambda: False)())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._inner.seek(offset, whence))

    def tell(self) -> int:
        return int(self._inner.tell())


class _Limited(_RawAdapter):
    """The first ``length`` bytes of a stream (what validation decided to send), still streamed."""

    def __init__(self, inner: Any, length: int) -> None:
        super().__init__(inner)
        self._left = length

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(min(len(buffer), self._left)) if self._left > 0 else b""
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def seekable(self) -> bool:
        return False


class _PutBack(_RawAdapter):
    """A stream's bytes already read from it, then the rest of it."""

    def __init__(self, head: bytes, inner: Any) -> None:
        super().__init__(inner)
        self._head = head

    def readinto(self, buffer: Any) -> int:
        if self._head:
            data, self._head = self._head[: len(buffer)], self._head[len(buffer) :]
        else:
            data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return False


def put_back(head: bytes, stream: IO[bytes]) -> IO[bytes]:
    """``stream`` as it was before ``head`` was read from it (for a source read twice: once for a look)."""
    return io.BufferedReader(_PutBack(head, stream))


class VerifiedRead(_Limited):
    """
    The first ``length`` bytes of a stream, hashed as they are read, which must be the bytes validation hashed.

    The read that reaches the end (the last bytes, or an early end of the stream) compares the hash first and, when
    it differs, raises ``BatchInputError`` naming the source instead of returning those bytes: the reader of the
    stream (a multipart request body) never gets to its end, so the request is never completed and the server
    never makes the file. ``verified`` says the whole ``length`` was read and matched.
    """

    def __init__(self, inner: Any, length: int, sha256: str, source: str) -> None:
        super().__init__(inner, length)
        self.length = length
        self.expected = sha256
        self.source = source
        self.verified = False
        self.error: Exception | None = None
        self._digest = hashlib.sha256()
        self._read = 0

    def readinto(self, buffer: Any) -> int:
        if self.error is not None:
            raise self.error
        if self.verified or len(buffer) == 0:
            return 0
        data = self._inner.read(min(len(buffer), self._left)) if self._left > 0 else b""
        self._digest.update(data)
        self._read += len(data)
        self._left -= len(data)
        if self._left <= 0 or not data:  # this read ends what is sent: check before handing it over
            self._finish()
        buffer[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        if self._left <= 0 and self._digest.hexdigest() == self.expected:
            self.verified = True
            return
        if self._left > 0:
            what = f"it ended after {self._read:,} of the {self.length:,} bytes validated"
        else:
            what = f"its first {self.length:,} bytes no longer have the validated sha256 {self.expected[:16]}…"
        self.error = self.failure(what)
        raise self.error

    def failure(self, what: str) -> Exception:
        """The error for a read whose bytes are not the validated ones: ``what`` differs."""
        from airflow_provider_openai_batch.exceptions import BatchInputError, InputIssue

        message = (
            f"changed between validation and upload ({what}); the upload was stopped before its end, so OpenAI "
            "kept nothing. Something rewrote the input while the task ran: write it before the task starts, or "
            "under a new name, then retry"
        )
        return BatchInputError(self.source, [InputIssue(0, None, message, "source_changed")])


def as_io(stream: Any, length: int | None = None, *, sha256: str | None = None, source: str | None = None) -> IO[bytes]:
    """
    ``stream`` itself when it is a real ``io`` object, else a thin adapter (no copy, still streamed); with
    ``length``, only that many bytes of it; with ``sha256`` too, only if they are those bytes (``VerifiedRead``,
    which ``read_check`` returns; ``source`` names the input in its error).
    """
    if sha256 is not None:
        if length is None:
            raise ValueError("a verified read needs the length that was validated")
        raw = VerifiedRead(stream, length, sha256, source or describe(stream))
        return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[return-value]
    if length is not None:
        return io.BufferedReader(_Limited(stream, length), buffer_size=1 << 20)  # type: ignore[return-value]
    if isinstance(stream, io.IOBase):
        return stream  # type: ignore[return-value]
    return io.BufferedReader(_RawAdapter(stream), buffer_size=1 << 20)  # type: ignore[return-value]


def read_check(reader: IO[bytes]) -> VerifiedRead | None:
    """The ``VerifiedRead`` behind a reader ``as_io`` made with ``sha256``, else ``None``."""
    raw = getattr(reader, "raw", None)
    return raw if isinstance(raw, VerifiedRead) else None


def _is_object_storage_path(value: object) -> bool:
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    return isinstance(value, ObjectStoragePath)


def source_size(source: Source) -> int | None:
    """Size in bytes when it is cheap to know (a stat, not a read), else ``None``."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return len(source)
        if isinstance(source, (str, os.PathLike)):
            path = to_storage_path(source)
            return int(path.stat().st_size)
        if _is_object_storage_path(source):
            return int(source.stat().st_size)  # type: ignore[union-attr]
    except (OSError, ValueError):
        return None
    return None


@contextlib.contextmanager
def atomic_writer(destination: Destination, *, overwrite: bool = False) -> Iterator[IO[bytes]]:
    """
    Write to a hidden temporary name beside ``destination`` and move it into place only on success.

    A dropped stream or a failed check inside the ``with`` block leaves nothing at the destination and no
    temporary file behind, so a retry starts clean and a downstream reader never picks up half a result file.
    A writer killed outright (kill -9, OOM) cannot clean up: the next successful write removes the temporary
    files it left (see ``_remove_stale_partials``). On object stores the move is a server-side copy, still
    never partial.
    """
    started = time.time()
    target = to_storage_path(destination)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f"{_partial_prefix(target.name)}{uuid.uuid4().hex[:12]}.partial"
    try:
        # The filesystem's own file object: Airflow's wrapper around ObjectStoragePath.open records lineage on
        # every write() call, which costs more than the write itself for a 200 MB stream of 64 KB chunks.
        opened = (
            cast(Any, temp).fs.open(cast(Any, temp).path, "wb") if _is_object_storage_path(temp) else temp.open("wb")
        )
        with opened as stream:
            yield stream
        local = local_path(target)
        if local is not None:
            os.replace(cast(Path, local_path(temp)), local)
        else:  # a server-side copy, one file (``fs.mv`` would read ``[``, ``]`` and ``*`` in a key as a pattern)
            cast(Any, temp).fs.cp_file(cast(Any, temp).path, cast(Any, target).path)
            remove_file(temp)
        _remove_stale_partials(target, started)
    finally:
        with contextlib.suppress(FileNotFoundError, OSError):
            if temp.exists():
                remove_file(temp)


#: Bytes of a destination's name kept in its temporary files' names: with a dot, the random part and
#: ``.partial`` (22 bytes), within the 255 bytes a name may have on most filesystems.
_NAME_ROOM = 200


def _partial_prefix(name: str) -> str:
    """How the names of ``name``'s temporary files start: ``.name.``, a long name cut short."""
    return f".{name.encode('utf-8', 'surrogateescape')[:_NAME_ROOM].decode('utf-8', 'ignore')}."


def local_path(path: Any) -> Path | None:
    """
    ``path`` (from :func:`to_storage_path`) as a local ``Path`` when it is on this machine's disk: a plain path or
    a ``file://`` URI; ``None`` on object storage.
    """
    # Older universal-pathlib makes ObjectStoragePath a pathlib.Path too: ask what it is, not what it extends.
    if not _is_object_storage_path(path):
        return cast(Path, path)
    protocol = path.fs.protocol
    return Path(path.path) if "file" in ((protocol,) if isinstance(protocol, str) else protocol) else None


def remove_file(path: Any) -> None:
    """One file removed (its name taken as it is: ``[``, ``]`` and ``*`` included)."""
    if _is_object_storage_path(path):
        path.fs.rm_file(path.path)
    else:
        path.unlink()


def remove_tree(path: Any) -> None:
    """
    A folder and everything in it, local or on an object store; what is gone already is no error. On an object
    store its files go one at a time (``fs.rm`` would read ``[``, ``]`` and ``*`` in a name as a pattern), then its
    folders, deepest first, where the filesystem has folders of its own.
    """
    local = local_path(path)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
        return
    fs = path.fs
    try:
        found = fs.find(path.path, withdirs=True, detail=True)
    except (FileNotFoundError, OSError):
        return
    folders = {name for name, info in found.items() if info.get("type") == "directory"}
    for name in found:
        if name not in folders:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.rm_file(name)
    # Only folders found in it (an object store's vanish with their last file; rmdir of a bucket would delete it).
    for name in sorted(folders, key=len, reverse=True):
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.rmdir(name)


def _remove_stale_partials(target: Any, started: float) -> None:
    """
    Temporary files of ``target`` last written before this write started: left by a writer that was killed
    (an earlier try on a worker that died). A local writer still running keeps its file's modification time
    current as it writes, so it is left alone (one stalled for the whole of this write is not); an object store
    shows a file only once its writer has finished.
    """
    for partial in target.parent.glob(f"{glob.escape(_partial_prefix(target.name))}*.partial"):
        with contextlib.suppress(FileNotFoundError, OSError, KeyError, TypeError):
            if _modified(partial) < started:
                remove_file(partial)
                log.info("Removed %s, left by a writer that was killed", partial)


def _modified(path: Any) -> float:
    if not _is_object_storage_path(path):
        return float(path.stat().st_mtime)
    info = path.fs.info(path.path)
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return float(value.timestamp() if hasattr(value, "timestamp") else value)


class _Writer(threading.Thread):
    """
    Writes handed-over pieces while the caller keeps reading: disk and network overlap (both release the GIL).

    The writer wakes once ``wake`` bytes wait, not once per piece, and then writes every waiting piece in one call
    (``os.writev`` on a local file), so a 64 KB piece costs the reader a list append, not a thread switch. At most
    ``limit`` bytes wait (the reader waits beyond that), so a slow disk slows the download instead of filling RAM.
    """

    def __init__(self, out: IO[bytes], fd: int | None, *, wake: int, limit: int) -> None:
        super().__init__(daemon=True, name="openai-batch-writer")
        self.out = out
        self.fd = fd
        self.wake = wake
        self.limit = max(limit, wake)  # a reader waiting for room always has a writer awake to make it
        self.error: BaseException | None = None
        self._pieces: list[bytes] = []
        self._waiting = 0  # bytes handed over and not yet written
        self._ended = False
        self._turn = threading.Condition(threading.Lock())

    def put(self, piece: bytes) -> None:
        """Hand a piece over; waits while ``limit`` bytes are already waiting."""
        with self._turn:
            while self._waiting >= self.limit and self.error is None:
                self._turn.wait()
            self._pieces.append(piece)
            self._waiting += len(piece)
            if self._waiting >= self.wake:
                self._turn.notify()

    def end(self) -> None:
        """No more pieces: write what waits, then stop."""
        with self._turn:
            self._ended = True
            self._turn.notify()

    def run(self) -> None:
        while True:
            with self._turn:
                while self._waiting < self.wake and not self._ended:
                    self._turn.wait()
                taken, self._pieces = self._pieces, []
                ended = self._ended  # set after the last put: every piece is in ``taken``
            size = sum(len(piece) for piece in taken)
            if taken and self.error is None:
                try:
                    self._write(taken)
                except BaseException as error:  # reported to the reader on its next piece or at the end
                    self.error = error
            with self._turn:
                self._waiting -= size
                self._turn.notify()
            if ended:
                return

    def _write(self, pieces: list[bytes]) -> None:
        """Write ``pieces`` in order (the list is used up on the way)."""
        if self.fd is None:
            for piece in pieces:  # each already a block (see copy_chunks): joined, they would be a second copy
                self.out.write(piece)
            return
        views: list[bytes | memoryview] = list(pieces)
        while views:  # a regular file takes it all at once; a short write goes on where it stopped
            sent = os.writev(self.fd, views[:_IOV_MAX])
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = memoryview(views[0])[sent:]


def _iov_max() -> int:
    """The most pieces one ``writev`` call takes (POSIX guarantees at least 16; Linux allows 1,024)."""
    try:
        return max(16, min(1024, os.sysconf("SC_IOV_MAX")))
    except (AttributeError, ValueError, OSError):
        return 16


_IOV_MAX = _iov_max()


def _local_fd(out: IO[bytes]) -> int | None:
    """
    The descriptor of a plain local file (what ``Path.open("wb")`` returns), with its buffer emptied first, so
    its pieces can go straight to the kernel; ``None`` for anything else (an fsspec or object-store file).
    """
    if type(out) not in (io.BufferedWriter, io.FileIO) or not hasattr(os, "writev"):
        return None
    out.flush()
    return out.fileno()


def copy_chunks(chunks: Iterable[bytes], out: IO[bytes], *, block: int = 1 << 20, depth: int = 8) -> Iterator[bytes]:
    """
    Write ``chunks`` to ``out`` on a background thread and yield each one to the caller (to count or hash).

    A plain local file gets the pieces as they come, without a copy or a Python file object on the way: once a
    ``block`` of them waits, the writer hands them to the kernel in one ``os.writev``. Anything else gets
    ``block``-sized writes gathered from smaller pieces (one copy), because some file objects pay per call
    (fsspec buffers, Airflow's ``ObjectStoragePath`` wrapper). At most ``depth`` blocks of bytes wait in memory,
    so a slow disk slows the download instead of filling RAM.
    """
    fd = _local_fd(out)
    writer = _Writer(out, fd, wake=block, limit=block * depth)
    writer.start()
    pending: list[bytes] = []
    gathered = 0
    try:
        for chunk in chunks:
            if writer.error is not None:
                raise writer.error
            if fd is not None:
                if chunk:  # handed over as it is: bytes cannot change under the writer (anything else is copied)
                    writer.put(chunk if isinstance(chunk, bytes) else bytes(chunk))
            else:
                pending.append(chunk)
                gathered += len(chunk)
                if gathered >= block:
                    single = len(pending) == 1 and isinstance(pending[0], bytes)
                    writer.put(pending[0] if single else b"".join(pending))
                    pending.clear()
                    gathered = 0
            yield chunk
        if gathered:
            writer.put(b"".join(pending))
    finally:
        writer.end()
        writer.join()
    if writer.error is not None:
        raise writer.error
