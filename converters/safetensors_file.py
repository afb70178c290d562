"""Reading safetensors shards: memory-mapped, one tensor at a time, pages handed back as the conversion moves on.

The format (safetensors' README): an 8-byte little-endian unsigned header size N, N bytes of a JSON object
`{name: {"dtype": D, "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data
area; offsets count from the data area's first byte, tensors are row-major and little-endian. This reader checks
before it trusts: N within the file and at most MAX_HEADER_BYTES, the header a JSON object, each entry's dtype
known, its shape non-negative integers, `end - begin` equal to the shape's element count times the item size,
every range inside the data area, no two ranges overlapping. Any failure is a ConversionError naming the file
and the tensor.

Why not the `safetensors` package: its `framework="pt"` reader imports torch (~180 MiB resident before a tensor is
read) and gives no handle on the mapping's pages. Pages of a mapped file that were read stay in the process's
resident set as long as they are mapped; reading a 5 GB shard through one mapping would grow the resident set by
5 GB, though the kernel could drop those pages at any time. `release(name)` tells the kernel the process is done
with a tensor's pages (madvise MADV_DONTNEED). The mapping is read-only and shared, so this only drops the page
table entries: an array that still views those bytes stays valid, and its next read faults them in again from the
page cache or the file.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from occrt.converters.source import release_pages
from occrt.errors import ConversionError

MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own cap
# safetensors dtype -> (numpy dtype, occrt's name for it); bf16 is kept as its bits (numpy has no bfloat16)
DTYPES = {"F32": (np.dtype("<f4"), "f32"), "F16": (np.dtype("<f2"), "f16"), "BF16": (np.dtype("<u2"), "bf16")}
_ALL_DTYPES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64")


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # occrt's name: f32 | f16 | bf16
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """One shard. `entries` in name order (the order the `safetensors` package lists them); `tensor(name)` is a
    read-only view of the mapped file; `release(name)` hands its pages back."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        try:
            self.entries = self._read_header()
            size = os.fstat(self._file.fileno()).st_size
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> ConversionError:
        return ConversionError(f"{self.path}: not a valid safetensors file: {what}")

    def _read_header(self) -> dict[str, Entry]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._fail(f"{size} bytes, too short for the 8-byte header size")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise self._fail(f"header size {n} at byte 0 is over the limit ({MAX_HEADER_BYTES}) or past the end "
                             f"of the {size}-byte file")
        try:
            header = json.loads(self._file.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header (bytes 8..{8 + n}) is not UTF-8 JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start, data_size = 8 + n, size - 8 - n
        entries: dict[str, Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = self._entry(name, info, data_start, data_size)
        spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise self._fail(f"tensors {a!r} and {b!r} overlap")
        return dict(sorted(entries.items()))

    def _entry(self, name: str, info, data_start: int, data_size: int) -> Entry:
        if not isinstance(info, dict):
            raise self._fail(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            known = "known" if dtype in _ALL_DTYPES else "unknown"
            raise ConversionError(f"{self.path}: tensor {name!r} has dtype {dtype} ({known} to safetensors); "
                                  f"supported: {sorted(DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise self._fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise self._fail(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        np_dtype, occ_dtype = DTYPES[dtype]
        n_bytes = int(np.prod(shape, dtype=object)) * np_dtype.itemsize
        if not 0 <= begin <= end <= data_size or end - begin != n_bytes:
            raise self._fail(f"tensor {name!r}: data_offsets [{begin}, {end}] for {n_bytes} bytes of {dtype} "
                             f"{shape}, in a data area of {data_size} bytes")
        return Entry(name, occ_dtype, tuple(shape), data_start + begin, data_start + end)

    def tensor(self, name: str) -> np.ndarray:
        e = self.entries[name]
        np_dtype = DTYPES[{"f32": "F32", "f16": "F16", "bf16": "BF16"}[e.dtype]][0]
        count = (e.end - e.begin) // np_dtype.itemsize
        if count == 0:  # nothing to map (and the file may end before `begin`)
            a = np.zeros(e.shape, dtype=np_dtype)
            a.flags.writeable = False  # read-only like every other tensor of a shard
            return a
        return np.frombuffer(self._map, dtype=np_dtype, count=count, offset=e.begin).reshape(e.shape)

    def release(self, name: str) -> None:
        """Hand the pages under tensor `name` back to the kernel (those it shares with a neighbour's go too; they
        come back on the neighbour's next read)."""
        e = self.entries[name]
        release_pages(self._map, e.begin, e.end)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # arrays still view it: the mapping goes when the last of them does
                pass
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
