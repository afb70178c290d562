"""Writing `.occ` files: deterministic, streaming, and all-or-nothing.

Sections are appended to a spool file beside the output as they arrive (memory stays bounded by the largest
section); `finish()` writes the prelude and header into a second temporary file, appends the spooled data, syncs
it and renames it onto the output name. Until that rename nothing exists under the output name, so an exception,
Ctrl-C or a kill at any point leaves no partial file (`abort()` removes the temporaries; a SIGKILL may leave a
hidden `.NAME.XXXXXXXX[.data].tmp` beside the output, never the output itself).

Leftovers of a killed writer: while a writer lives it holds an advisory lock (`flock`) on its temporaries; the kernel
drops it when the process dies, however it dies. The next writer for the same output name removes that name's
temporaries that are unlocked and were not written to for `STALE_SECONDS` (the age rule covers the instant between
creating a temporary and locking it). Where `fcntl` is missing (Windows) nothing is removed.

Determinism: the header is canonical JSON (sorted keys, no spaces, UTF-8) and sections are laid out in the order
they were added, so the same calls give byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import zlib
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so stale temporaries are left alone
    fcntl = None

from occrt.codecs.base import Encoded
from occrt.codecs.registry import codec_for
from occrt.errors import FormatError, OccError
from occrt.format import constants as C

STALE_SECONDS = 60  # an unlocked temporary untouched this long belongs to a writer that is gone
COPY_BUFFER = 1 << 20  # spool -> output in pieces of this size: copying runs at disk speed, memory stays small


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _check_json_value(value: Any, where: str, depth: int) -> None:
    """Refuse what a reader rejects (format_spec/occ.md 2.2, 3 rule 5): nesting past MAX_JSON_DEPTH levels (`depth` is
    the value's level in the header: the header object is 1), non-finite numbers, integers outside [-2^63, 2^64),
    strings that are not UTF-8 encodable (lone surrogates)."""
    if depth > C.MAX_JSON_DEPTH and isinstance(value, (dict, list, tuple)):
        raise ValueError(f"{where}: nested deeper than {C.MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not (
            C.JSON_INT_RANGE[0] <= value <= C.JSON_INT_RANGE[1]):
        raise ValueError(f"{where}: integer {value} is outside [-2^63, 2^64)")
    if isinstance(value, str):
        _check_text(value, where)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
            _check_text(k, where)
            _check_json_value(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]", depth + 1)
    elif not (value is None or isinstance(value, (str, bool, int, float))):
        raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


class OccWriter:
    """Builds one `.occ` file. Use as a context manager; call `finish()` inside it.

    States: open -> (set_metadata | add_blob | add_tensor)* -> finish() -> closed. An exception inside the `with`
    block (or `abort()`) discards everything.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise OccError(f"{self.path}: is a directory")
        if os.path.exists(self.path) and not overwrite:
            raise OccError(f"{self.path} already exists (use --force to overwrite)")
        self.overwrite = overwrite
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise OccError(f"{directory}: output directory does not exist")
        self._dir = directory
        base = os.path.basename(self.path)
        remove_stale_temporaries(self.path)
        fd, self._spool_path = tempfile.mkstemp(prefix=f".{base}.", suffix=".data.tmp", dir=directory)
        _lock(fd)
        self._spool = os.fdopen(fd, "wb")
        self._offset = 0  # next free byte in the data area
        self._metadata: dict[str, Any] = {}
        self._blobs: list[dict[str, Any]] = []
        self._tensors: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._blob_names: set[str] = set()
        self._state = "open"

    # -- building -------------------------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"OccWriter is {self._state}; no more sections can be added")

    def set_metadata(self, key: str, value: Any) -> None:
        self._require_open()
        if not isinstance(key, str):
            raise ValueError(f"metadata key {key!r} is not a string")
        _check_text(key, "metadata key")
        _check_json_value(value, f"metadata {key!r}", 3)  # header {} > "metadata" {} > value
        self._metadata[key] = value

    def _append(self, buffers: list[bytes | memoryview]) -> tuple[int, int, int]:
        pad = C.align_up(self._offset) - self._offset
        if pad:
            self._spool.write(b"\0" * pad)
            self._offset += pad
        start, crc, length = self._offset, 0, 0
        for b in buffers:
            self._spool.write(b)
            crc = zlib.crc32(b, crc)
            length += memoryview(b).nbytes
        self._offset += length
        return start, length, crc

    def add_blob(self, name: str, data: bytes) -> None:
        self._require_open()
        _check_name(name)
        if name in self._blob_names:
            raise ValueError(f"duplicate blob name {name!r}")
        if len(self._blobs) >= C.MAX_BLOBS:
            raise ValueError(f"more than {C.MAX_BLOBS} blobs")
        offset, length, crc = self._append([data])
        self._blob_names.add(name)
        self._blobs.append({"name": name, "offset": offset, "length": length, "crc32": crc})

    def add_tensor(self, name: str, enc: Encoded) -> None:
        self._require_open()
        _check_name(name)
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        if len(self._tensors) >= C.MAX_TENSORS:
            raise ValueError(f"more than {C.MAX_TENSORS} tensors")
        if not isinstance(enc.params, dict):
            raise ValueError(f"params of {name!r} must be a dict")
        _check_json_value(enc.params, f"params of {name!r}", 4)  # header {} > "tensors" [] > entry {} > params
        payload = enc.payload if isinstance(enc.payload, list) else [enc.payload]
        length = sum(memoryview(b).nbytes for b in payload)
        # The writer refuses what a reader would reject, so a bad codec is caught where it is made.
        if enc.dtype not in C.DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {enc.dtype!r} (known: {sorted(C.DTYPES)})")
        shape = tuple(int(d) for d in enc.shape)
        if len(shape) > C.MAX_NDIM or any(not 0 <= d <= C.MAX_DIM for d in shape):
            raise ValueError(f"tensor {name!r}: shape {list(shape)} breaks the limits (at most {C.MAX_NDIM} "
                             f"dimensions, each 0..{C.MAX_DIM})")
        n = enc.n_elements
        if n > C.MAX_ELEMENTS:
            raise ValueError(f"tensor {name!r}: {n} elements is over the limit of {C.MAX_ELEMENTS}")
        codec_for(enc.codec).check(version=enc.codec_version, dtype=enc.dtype, shape=shape,
                                   params=enc.params, length=length)
        if n > C.MAX_ELEMENTS_PER_BYTE * length:
            raise FormatError(f"tensor {name!r}: {n} elements from {length} bytes, more than "
                              f"{C.MAX_ELEMENTS_PER_BYTE} per byte")
        offset, length, crc = self._append(payload)
        self._names.add(name)
        self._tensors.append({"name": name, "dtype": enc.dtype, "shape": [int(d) for d in enc.shape],
                              "codec": enc.codec, "codec_version": enc.codec_version, "params": enc.params,
                              "offset": offset, "length": length, "crc32": crc})

    # -- finishing ------------------------------------------------------------------------------------------------
    def header_bytes(self) -> bytes:
        return canonical_json({"metadata": self._metadata, "blobs": self._blobs, "tensors": self._tensors,
                               "data_length": self._offset})

    def finish(self) -> str:
        self._require_open()
        self._spool.flush()
        header = self.header_bytes()
        if len(header) > C.MAX_HEADER_BYTES:
            raise OccError(f"header is {len(header)} bytes, over the limit of {C.MAX_HEADER_BYTES}")
        head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, C.VERSION_MAJOR, C.VERSION_MINOR, 0, len(header))
        crc = 0
        for a, b in C.HEADER_CRC_SPANS:
            crc = zlib.crc32(head[a:b], crc)
        crc = zlib.crc32(header, crc)
        head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, C.VERSION_MAJOR, C.VERSION_MINOR, crc, len(header))
        data_start = C.align_up(C.PRELUDE_SIZE + len(header))
        base = os.path.basename(self.path)
        fd, final_tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=self._dir)
        try:
            _lock(fd)
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                out.write(header)
                out.write(b"\0" * (data_start - C.PRELUDE_SIZE - len(header)))
                with open(self._spool_path, "rb") as spool:  # the spool stays open (and locked) meanwhile
                    shutil.copyfileobj(spool, out, COPY_BUFFER)
                out.flush()
                os.fsync(out.fileno())
            # The spool goes before the rename, so a finished output never leaves a temporary behind it.
            self._drop_spool()
            if not self.overwrite and os.path.exists(self.path):
                raise OccError(f"{self.path} appeared while converting; not overwriting it (use --force)")
            os.chmod(final_tmp, 0o644)
            os.replace(final_tmp, self.path)
        except BaseException:
            _remove(final_tmp)
            self.abort()
            raise
        self._state = "finished"
        return self.path

    def abort(self) -> None:
        if self._state == "open":
            self._drop_spool()

    def _drop_spool(self) -> None:
        _remove(self._spool_path)  # unlinked while still locked, so no other writer takes it for stale meanwhile
        self._spool.close()
        self._state = "aborted"

    def __enter__(self) -> "OccWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._state == "open":
            self.abort()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name.encode()) > C.MAX_NAME_BYTES:
        raise ValueError(f"section name must be 1..{C.MAX_NAME_BYTES} UTF-8 bytes, got {name!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise ValueError(f"section name {name!r} contains a control character")


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: {s!r:.80} is not valid Unicode text (lone surrogate)") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _lock(fd: int) -> None:
    """Hold an advisory lock on a temporary for as long as it is open (the kernel releases it when the process
    dies). Best effort: where the file system refuses locks, the temporary is simply never taken for stale."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporaries that killed writers left for the output `path`; returns the paths removed.

    A temporary is `.NAME.` + mkstemp's 8 random characters + `.tmp` or `.data.tmp` in the output's directory; it is
    stale when no process holds its lock and its contents are older than STALE_SECONDS.
    """
    if fcntl is None:
        return []
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{os.path.basename(path)}.") + r"[a-z0-9_]{8}(\.data)?\.tmp")
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < STALE_SECONDS:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
            if os.fstat(fd).st_ino == os.stat(entry.path, follow_symlinks=False).st_ino:
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
