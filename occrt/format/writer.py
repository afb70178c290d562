"""Writing `.occ` files: deterministic, streaming, and all-or-nothing.

Sections are appended to a spool file beside the output as they arrive (memory stays bounded by the largest
section); `finish()` writes the prelude and header into a second temporary file, appends the spooled data, syncs
it and renames it onto the output name. Until that rename nothing exists under the output name, so an exception,
Ctrl-C or a kill at any point leaves no partial file (`abort()` removes the temporaries; a SIGKILL may leave a
hidden `.*.tmp` beside the output, never the output itself).

Determinism: the header is canonical JSON (sorted keys, no spaces, UTF-8) and sections are laid out in the order
they were added, so the same calls give byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from typing import Any

from occrt.codecs.base import Encoded
from occrt.codecs.registry import codec_for
from occrt.errors import OccError
from occrt.format import constants as C


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _check_json_value(value: Any, where: str, depth: int = 0) -> None:
    if depth > C.MAX_JSON_DEPTH:
        raise ValueError(f"{where}: nested deeper than {C.MAX_JSON_DEPTH}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
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
        fd, self._spool_path = tempfile.mkstemp(prefix=f".{base}.", suffix=".data.tmp", dir=directory)
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
        _check_json_value(value, f"metadata {key!r}")
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
        _check_json_value(enc.params, f"params of {name!r}")
        payload = enc.payload if isinstance(enc.payload, list) else [enc.payload]
        length = sum(memoryview(b).nbytes for b in payload)
        # The writer refuses what a reader would reject, so a bad codec is caught where it is made.
        codec_for(enc.codec).check(version=enc.codec_version, dtype=enc.dtype, shape=tuple(enc.shape),
                                   params=enc.params, length=length)
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
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                out.write(header)
                out.write(b"\0" * (data_start - C.PRELUDE_SIZE - len(header)))
                self._spool.close()
                with open(self._spool_path, "rb") as spool:
                    shutil.copyfileobj(spool, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())
            if not self.overwrite and os.path.exists(self.path):
                raise OccError(f"{self.path} appeared while converting; not overwriting it (use --force)")
            os.chmod(final_tmp, 0o644)
            os.replace(final_tmp, self.path)
        except BaseException:
            _remove(final_tmp)
            self.abort()
            raise
        _remove(self._spool_path)
        self._state = "finished"
        return self.path

    def abort(self) -> None:
        if self._state == "open":
            self._spool.close()
            _remove(self._spool_path)
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


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
