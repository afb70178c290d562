"""What a converter reads from a checkpoint, whatever its format: one `Source` interface.

A source gives the normalized model config, the tokenizer (as `tokenizer.json` bytes), the chat template, generation
defaults, provenance, and the tensors under Hugging Face names, one at a time (so conversion streams).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import sys
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


def return_freed_buffers_to_the_os(threshold: int = 256 << 10) -> bool:
    """glibc only: allocations of `threshold` bytes or more get their own mappings (mallopt M_MMAP_THRESHOLD), so
    a freed tensor leaves the resident set at once instead of staying in the heap for reuse. glibc raises the
    threshold on its own as large blocks are freed (up to 32 MiB), after which a conversion's succession of
    differently sized float32 tensors and torch buffers fragments the heap: on SmolLM2 with --calib the peak was
    1.48 GB with the default and 1.13 GB with this (benchmarks/quality_results.md). Process-wide, so the command
    line sets it, not the library. Returns whether it was set."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD; 0 means refused (e.g. not glibc)
    except (OSError, AttributeError):
        return False
