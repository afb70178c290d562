"""Reading `.occ` files: memory-mapped, validated before anything is trusted.

`OccFile.open(path)` checks, before returning: the prelude (magic, version, header length within limits and within
the file), the header CRC, the header JSON (strict: no duplicate keys, no NaN or overflowing numbers, no lone
surrogates, bounded nesting, known keys, types and limits), every index entry (names, dtypes, shapes, codec ids and
versions, the codec's own check of its params, at most MAX_ELEMENTS_PER_BYTE elements per section byte), and the
layout of the data area (sections in order, aligned, inside the file, not overlapping, zero padding between them, no
trailing bytes). A section's CRC is checked when it is first read (`tensor`, `blob`, `payload`) and by `verify()`;
so nothing is decoded from bytes that were not checked. Every problem is one `FormatError` naming the byte offset.
"""
from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from occrt.codecs.registry import codec_for
from occrt.errors import FormatError
from occrt.format import constants as C


@dataclass(frozen=True)
class SectionEntry:
    name: str
    offset: int  # absolute byte offset in the file
    length: int
    crc32: int


@dataclass(frozen=True)
class TensorEntry(SectionEntry):
    dtype: str
    shape: tuple[int, ...]
    codec: int
    codec_version: int
    params: dict[str, Any]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class OccFile:
    """An open, validated `.occ` file. Close it (or use `with`) when the decoded arrays are no longer needed:
    raw f32/f16 tensors are zero-copy views of the mapping."""

    def __init__(self, path: str, mm: mmap.mmap | bytes, size: int):
        self.path = path
        self._mm = mm
        self.size = size
        self._checked: set[tuple[int, int, int]] = set()
        self.version: tuple[int, int]
        self.metadata: dict[str, Any]
        self.blobs: dict[str, SectionEntry]
        self.tensors: dict[str, TensorEntry]
        self.header_length: int
        self.data_start: int

    # -- opening --------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "OccFile":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror}", path=path) from None
        occ = cls(path, mm, size)
        try:
            occ._validate()
        except FormatError as e:
            occ.close()
            raise FormatError(e.reason, e.offset, path=path) from None
        # Validation read the header and every gap between sections; where the page cache holds the file in large
        # folios, each read maps a whole folio (2 MB on ext4), i.e. most of the file. Nothing needs those pages now.
        occ._release(0, size)
        return occ

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> "OccFile":
        occ = cls(name, data, len(data))
        try:
            occ._validate()
        except FormatError as e:
            raise FormatError(e.reason, e.offset, path=name) from None
        return occ

    def _validate(self) -> None:
        mm, size = self._mm, self.size
        if size < C.PRELUDE_SIZE:
            raise FormatError(f"file is {size} bytes, shorter than the {C.PRELUDE_SIZE}-byte prelude", 0)
        magic, major, minor, header_crc, header_length = struct.unpack_from(C.PRELUDE_FORMAT, mm, 0)
        if magic != C.MAGIC:
            raise FormatError(f"wrong magic {magic!r} (not an .occ file)", 0)
        if major != C.VERSION_MAJOR:
            raise FormatError(f"format version {major}.{minor} is not readable by this reader "
                              f"(it reads {C.VERSION_MAJOR}.x)", 8)
        if header_length < 2 or header_length > C.MAX_HEADER_BYTES:
            raise FormatError(f"header length {header_length} is outside 2..{C.MAX_HEADER_BYTES}", 16)
        if C.PRELUDE_SIZE + header_length > size:
            raise FormatError(f"header of {header_length} bytes runs past the end of the {size}-byte file", 16)
        header = bytes(mm[C.PRELUDE_SIZE:C.PRELUDE_SIZE + header_length])
        crc = 0
        for a, b in C.HEADER_CRC_SPANS:
            crc = zlib.crc32(mm[a:b], crc)
        crc = zlib.crc32(header, crc)
        if crc != header_crc:
            raise FormatError(f"header checksum mismatch (stored {header_crc:#010x}, computed {crc:#010x})", 12)
        self.version = (major, minor)
        self.header_length = header_length
        self.data_start = C.align_up(C.PRELUDE_SIZE + header_length)
        doc = _parse_json(header, C.PRELUDE_SIZE)
        strict = minor <= C.VERSION_MINOR  # a newer minor version may add keys this reader does not know
        self._validate_header(doc, strict)
        self._validate_layout()

    def _validate_header(self, doc: Any, strict: bool) -> None:
        at = C.PRELUDE_SIZE
        if not isinstance(doc, dict):
            raise FormatError("header is not a JSON object", at)
        missing = C.HEADER_KEYS - doc.keys()
        if missing:
            raise FormatError(f"header lacks keys {sorted(missing)}", at)
        if strict and doc.keys() - C.HEADER_KEYS:
            raise FormatError(f"header has unknown keys {sorted(doc.keys() - C.HEADER_KEYS)}", at)
        if not isinstance(doc["metadata"], dict):
            raise FormatError("header 'metadata' is not an object", at)
        self.metadata = doc["metadata"]
        self.data_length = _int(doc["data_length"], "data_length", 0, 1 << 62)
        blobs, tensors = doc["blobs"], doc["tensors"]
        if not isinstance(blobs, list) or len(blobs) > C.MAX_BLOBS:
            raise FormatError(f"'blobs' must be a list of at most {C.MAX_BLOBS} entries", at)
        if not isinstance(tensors, list) or len(tensors) > C.MAX_TENSORS:
            raise FormatError(f"'tensors' must be a list of at most {C.MAX_TENSORS} entries", at)
        self.blobs = {}
        for i, e in enumerate(blobs):
            entry = self._section(e, f"blob #{i}", C.BLOB_KEYS, strict)
            if entry.name in self.blobs:
                raise FormatError(f"duplicate blob name {entry.name!r}", at)
            self.blobs[entry.name] = entry
        self.tensors = {}
        for i, e in enumerate(tensors):
            base = self._section(e, f"tensor #{i}", C.TENSOR_KEYS, strict)
            what = f"tensor {base.name!r}"
            if base.name in self.tensors:
                raise FormatError(f"duplicate tensor name {base.name!r}", at)
            dtype = e["dtype"]
            if not isinstance(dtype, str) or dtype not in C.DTYPES:
                raise FormatError(f"{what}: unknown dtype {dtype!r} (known: {sorted(C.DTYPES)})", at)
            shape = e["shape"]
            if not isinstance(shape, list) or len(shape) > C.MAX_NDIM:
                raise FormatError(f"{what}: shape must be a list of at most {C.MAX_NDIM} dimensions", at)
            shape = tuple(_int(d, f"{what} shape", 0, C.MAX_DIM) for d in shape)
            n = 1
            for d in shape:
                n *= d
            if n > C.MAX_ELEMENTS:
                raise FormatError(f"{what}: {n} elements is over the limit of {C.MAX_ELEMENTS}", at)
            codec_id = _int(e["codec"], f"{what} codec", 0, 1 << 31)
            version = _int(e["codec_version"], f"{what} codec_version", 0, 1 << 31)
            params = e["params"]
            if not isinstance(params, dict):
                raise FormatError(f"{what}: params must be an object", at)
            try:
                codec_for(codec_id).check(version=version, dtype=dtype, shape=shape, params=params,
                                          length=base.length)
            except FormatError as err:
                raise FormatError(f"{what}: {err.reason}", at) from None
            if n > C.MAX_ELEMENTS_PER_BYTE * base.length:
                raise FormatError(f"{what}: {n} elements from a {base.length}-byte section, more than "
                                  f"{C.MAX_ELEMENTS_PER_BYTE} per byte", at)
            self.tensors[base.name] = TensorEntry(base.name, base.offset, base.length, base.crc32, dtype, shape,
                                                  codec_id, version, params)

    def _section(self, e: Any, what: str, keys: frozenset, strict: bool) -> SectionEntry:
        at = C.PRELUDE_SIZE
        if not isinstance(e, dict):
            raise FormatError(f"{what} is not an object", at)
        if keys - e.keys():
            raise FormatError(f"{what} lacks keys {sorted(keys - e.keys())}", at)
        if strict and e.keys() - keys:
            raise FormatError(f"{what} has unknown keys {sorted(e.keys() - keys)}", at)
        name = e["name"]
        if (not isinstance(name, str) or not name or len(name.encode()) > C.MAX_NAME_BYTES
                or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name)):
            raise FormatError(f"{what}: name must be 1..{C.MAX_NAME_BYTES} UTF-8 bytes without control "
                              f"characters, got {name!r:.80}", at)
        what = f"{what} {name!r}"
        offset = _int(e["offset"], f"{what} offset", 0, self.data_length)
        length = _int(e["length"], f"{what} length", 0, self.data_length)
        crc = _int(e["crc32"], f"{what} crc32", 0, 0xFFFFFFFF)
        if offset % C.ALIGNMENT:
            raise FormatError(f"{what}: offset {offset} is not a multiple of {C.ALIGNMENT}", at)
        if offset + length > self.data_length:
            raise FormatError(f"{what}: section [{offset}, {offset + length}) runs past the data area "
                              f"({self.data_length} bytes)", at)
        return SectionEntry(name, self.data_start + offset, length, crc)

    def _validate_layout(self) -> None:
        if self.data_start + self.data_length != self.size:
            raise FormatError(f"file is {self.size} bytes but the header describes "
                              f"{self.data_start + self.data_length}", min(self.size, self.data_start + self.data_length))
        sections = sorted(list(self.blobs.values()) + list(self.tensors.values()), key=lambda s: (s.offset, s.length))
        pos = C.PRELUDE_SIZE + self.header_length  # end of what has been accounted for
        for s in sections:
            expected = self.data_start + C.align_up(max(pos - self.data_start, 0))
            if s.offset < pos:
                raise FormatError(f"section {s.name!r} overlaps the one before it", s.offset)
            if s.offset != expected:
                raise FormatError(f"gap before section {s.name!r}: expected it at {expected}", pos)
            self._check_zero(pos, s.offset)
            pos = s.offset + s.length
        end = self.data_start + self.data_length
        if not sections:
            self._check_zero(pos, self.data_start)
            pos = self.data_start
        if pos != end:
            raise FormatError(f"{end - pos} unaccounted bytes at the end of the data area", pos)

    def _check_zero(self, start: int, stop: int) -> None:
        if stop > start:
            pad = self._mm[start:stop]
            if pad.count(0) != len(pad):
                raise FormatError("padding bytes are not zero", start + next(i for i, b in enumerate(pad) if b))

    # -- reading --------------------------------------------------------------------------------------------------
    def payload(self, entry: SectionEntry) -> memoryview:
        """The bytes of one section, CRC-checked on first use."""
        view = memoryview(self._mm)[entry.offset:entry.offset + entry.length]
        key = (entry.offset, entry.length, entry.crc32)  # zero-length sections may share an offset, not a CRC
        if key not in self._checked:
            crc = zlib.crc32(view)
            if crc != entry.crc32:
                raise FormatError(f"checksum mismatch in section {entry.name!r} (stored {entry.crc32:#010x}, "
                                  f"computed {crc:#010x})", entry.offset, path=self.path)
            self._checked.add(key)
        return view

    def release(self, entry: SectionEntry) -> None:
        """Tell the OS this process no longer needs the section's pages (once a compressed tensor is decoded): they
        leave the resident set, the page cache keeps them, and a later read faults them back in unchanged. Only
        whole pages inside the section are released; a no-op where madvise is unavailable."""
        self._release(entry.offset, entry.offset + entry.length)

    def release_all(self, keep: "list[SectionEntry] | tuple[SectionEntry, ...]" = ()) -> None:
        """`release` every page of the file outside the sections in `keep` (those still read through views)."""
        pos = 0
        for entry in sorted(keep, key=lambda e: e.offset):
            self._release(pos, entry.offset)
            pos = max(pos, entry.offset + entry.length)
        self._release(pos, self.size)

    def _release(self, begin: int, end: int) -> None:
        if not isinstance(self._mm, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-begin // page) * page
        stop = end // page * page
        if stop > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except (OSError, ValueError):
                pass  # advice only

    def blob(self, name: str) -> bytes:
        if name not in self.blobs:
            raise FormatError(f"no blob named {name!r} (has {sorted(self.blobs)})", path=self.path)
        return bytes(self.payload(self.blobs[name]))

    def tensor(self, name: str) -> np.ndarray:
        """Decode one tensor (float32, or float16 for raw f16 storage). Raw tensors are read-only views."""
        try:
            entry = self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        view = self.payload(entry)
        try:
            return codec_for(entry.codec).decode(view, version=entry.codec_version, dtype=entry.dtype,
                                                 shape=entry.shape, params=entry.params)
        except FormatError as e:
            raise FormatError(f"tensor {name!r}: {e.reason}",
                              None if e.offset is None else entry.offset + e.offset, path=self.path) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def verify(self) -> dict[str, int]:
        """Check every section's CRC, then decode every tensor. Returns counts; raises FormatError on the first fault.
        (All CRCs first: corruption is reported as such, and cheaply, before any decoder sees the bytes.)"""
        for entry in list(self.blobs.values()) + list(self.tensors.values()):
            self.payload(entry)
        n_elements = 0
        for name, entry in self.tensors.items():
            a = self.tensor(name)
            if a.shape != entry.shape:
                raise FormatError(f"tensor {name!r} decoded to shape {a.shape}, index says {entry.shape}",
                                  entry.offset, path=self.path)
            n_elements += entry.n_elements
        return {"blobs": len(self.blobs), "tensors": len(self.tensors), "elements": n_elements, "bytes": self.size}

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            try:
                self._mm.close()
            except BufferError:
                pass  # arrays still view the mapping; it is released when they are

    def __enter__(self) -> "OccFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_json(data: bytes, at: int) -> Any:
    def no_duplicates(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    def no_constants(name):
        raise ValueError(f"{name} is not allowed")

    def bounded_int(literal: str) -> int:
        # checked before int(): a megabyte of digits must not cost quadratic time
        if len(literal.lstrip("-")) > C.MAX_JSON_INT_DIGITS:
            raise ValueError(f"integer literal of {len(literal)} characters")
        v = int(literal)
        if not C.JSON_INT_RANGE[0] <= v <= C.JSON_INT_RANGE[1]:
            raise ValueError(f"integer {v} is outside [-2^63, 2^64)")
        return v

    def finite_float(literal: str) -> float:
        v = float(literal)
        if not math.isfinite(v):
            raise ValueError(f"number {literal[:40]} is not finite as a double")
        return v

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"header is not UTF-8: {e.reason}", at + e.start) from None
    try:
        doc = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants, parse_int=bounded_int,
                         parse_float=finite_float)
    except json.JSONDecodeError as e:
        raise FormatError(f"header is not valid JSON: {e.msg}", at + len(text[:e.pos].encode())) from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"header JSON rejected: {e}", at) from None
    _check_values(doc, at)
    return doc


def _check_values(value: Any, at: int) -> None:
    """Nesting depth, and strings that are Unicode scalar values: a `\\ud800` escape decodes to a lone surrogate,
    which is not text (it cannot be encoded as UTF-8) and would break every later use of the string.

    Depth-first with one iterator per level of the current path, so the walk itself needs O(depth) memory."""
    if isinstance(value, str):
        _check_text(value, at)
    if not isinstance(value, (dict, list)):
        return
    path = [_children(value)]  # the header object is level 1; each object or array inside one adds a level
    while path:
        for v in path[-1]:
            if isinstance(v, str):
                _check_text(v, at)
            elif isinstance(v, (dict, list)):
                if len(path) + 1 > C.MAX_JSON_DEPTH:
                    raise FormatError(f"header JSON nests deeper than {C.MAX_JSON_DEPTH} levels", at)
                path.append(_children(v))
                break
        else:
            path.pop()


def _children(v: dict | list) -> Iterator[Any]:
    return itertools.chain(v.keys(), v.values()) if isinstance(v, dict) else iter(v)


def _check_text(s: str, at: int) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FormatError(f"header JSON string holds a lone surrogate (U+{ord(s[e.start]):04X})", at) from None


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.40}", C.PRELUDE_SIZE)
    return v
