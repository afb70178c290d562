"""What a converter reads from a checkpoint, whatever its format: one `Source` interface.

A source gives the normalized model config, the tokenizer (as `tokenizer.json` bytes), the chat template, generation
defaults, provenance, and the tensors under Hugging Face names, one at a time (so conversion streams).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from occrt.model.config import ModelConfig


@dataclass
class SourceTensor:
    """One tensor as read from the source. `data` is float32, float16, or bf16 bits as uint16 (`dtype` says)."""

    name: str
    data: np.ndarray
    dtype: str  # "f32" | "f16" | "bf16" | "quantized" (dequantized to float32 from a GGUF block format)


@dataclass
class TokenizerInfo:
    tokenizer_json: bytes
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool
    chat_template: str | None


@dataclass
class Source:
    config: ModelConfig
    tokenizer: TokenizerInfo
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def tensor_names(self) -> list[str]:
        raise NotImplementedError

    def tensors(self) -> Iterator[SourceTensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def file_record(path: str, root: str | None = None) -> dict[str, Any]:
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    return {"name": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def release_pages(mapping: mmap.mmap | None, begin: int, end: int) -> None:
    """Tell the kernel this process is done with bytes [begin, end) of a read-only shared file mapping (madvise
    MADV_DONTNEED): their pages leave the resident set. Reading them again faults them back in from the page cache
    or the file, so arrays that still view them stay valid. The pages that [begin, end) shares with its neighbours
    go too (they come back the same way). A no-op where the platform lacks MADV_DONTNEED."""
    if mapping is None or end <= begin or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = begin - begin % mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


class MallocThresholds:
    """glibc's malloc during a conversion: where a freed buffer goes (Linux with glibc only; `install` returns None
    elsewhere). Process-wide, so the command line installs it (occrt/cli.py) and hands it to `convert`; the library
    never sets it on its own.

    - Streaming (set by `install`, and the rule outside `reuse`): allocations of 256 KiB or more get their own
      mappings (M_MMAP_THRESHOLD), so a freed tensor leaves the resident set at once. glibc raises the threshold on
      its own as large blocks are freed (up to 32 MiB), after which a conversion's succession of differently sized
      float32 tensors and torch buffers fragments the heap: on SmolLM2 with --calib the peak was 1.48 GB with
      glibc's default and 1.13 GB with this (benchmarks/quality_results.md).
    - `reuse()`: up to 4 MiB from the heap, whose freed blocks are used again; on the way out the streaming
      threshold comes back and `trim` (`malloc_trim`) hands the heap's free pages to the kernel. For a pass that
      allocates the same activation sizes window after window: with a fresh mapping for each (512 tokens x 1536
      float32 is 3 MiB), every page is faulted in and zeroed anew. Left alone, the reused heap fragments (the
      layers' mix of sizes) and keeps ~550 MB of free blocks resident in a tuning step on SmolLM2 (peak 1.6 GB
      against 1.08 GB streaming, over issue 5's memory goal), so the passes that reuse it, the calibration's
      gradients and the tuning (converters/calibrate.py, `checkpointed_layers`), also trim every few layers: a
      tuning step 5.6 s instead of 9.3 s, its peak ~130 MB above streaming (benchmarks/quality_results.md)."""

    STREAMING = 256 << 10
    REUSE = 4 << 20
    _M_MMAP_THRESHOLD = -3  # glibc's malloc.h

    def __init__(self, libc):
        self._libc = libc

    @classmethod
    def install(cls) -> "MallocThresholds | None":
        """Set the streaming threshold; None (and nothing set) where this is not Linux with glibc."""
        import ctypes
        import ctypes.util

        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            heap = cls(libc)
            return heap if hasattr(libc, "malloc_trim") and heap._set(cls.STREAMING) else None
        except (OSError, AttributeError):
            return None

    def _set(self, threshold: int) -> bool:
        return bool(self._libc.mallopt(self._M_MMAP_THRESHOLD, threshold))  # 0 means refused

    @contextmanager
    def reuse(self):
        self.trim()  # start from the pages in use: what an earlier pass freed in the heap is not kept resident
        self._set(self.REUSE)
        try:
            yield
        finally:
            self._set(self.STREAMING)
            self.trim()

    def trim(self) -> None:
        """Hand the heap's free pages back to the kernel (its free blocks stay free blocks, faulted in again on use)."""
        self._libc.malloc_trim(0)


def heap_reuse(heap: MallocThresholds | None):
    """`heap.reuse()`, or nothing without one."""
    return nullcontext() if heap is None else heap.reuse()
