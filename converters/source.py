"""What a converter reads from a checkpoint, whatever its format: one `Source` interface.

A source gives the normalized model config, the tokenizer (as `tokenizer.json` bytes), the chat template, generation
defaults, provenance, and the tensors under Hugging Face names, one at a time (so conversion streams).
"""
from __future__ import annotations

import hashlib
import mmap
import os
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
