"""What every codec provides, and the record a codec's encoder hands to the container writer.

A codec turns one tensor into a byte payload plus a small JSON object of parameters (`params`) and back. The container
stores `codec` (a stable integer id, `occrt.codecs.registry`), `codec_version`, `params` in the tensor index and the
payload in its own checksummed data section; it never interprets either. A codec's decoder must treat both as hostile:
`check` validates everything the index says before any byte is read, and `decode` raises `FormatError` (with the offset
inside the payload) for anything inconsistent, never another exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from occrt.errors import FormatError


@dataclass(frozen=True)
class Encoded:
    """One tensor as a codec wrote it: what the writer puts in the index and the data section."""

    codec: int
    codec_version: int
    dtype: str  # logical dtype of the decoded tensor ("f32", "f16", "bf16")
    shape: tuple[int, ...]
    payload: bytes | memoryview | list  # a list of buffers is written back to back
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


class Codec:
    """Base class. Subclasses set `id`, `name`, `versions` and implement `check` and `decode`."""

    id: ClassVar[int]
    name: ClassVar[str]
    versions: ClassVar[tuple[int, ...]]

    def check(self, *, version: int, dtype: str, shape: tuple[int, ...], params: dict[str, Any], length: int) -> None:
        """Validate an index entry (not the payload bytes). Raise FormatError(message) on anything wrong."""
        if version not in self.versions:
            raise FormatError(f"codec {self.name!r} (id {self.id}) has no version {version}; "
                              f"this reader knows {list(self.versions)}")

    def decode(self, payload: memoryview, *, version: int, dtype: str, shape: tuple[int, ...],
               params: dict[str, Any]) -> np.ndarray:
        """Decode a payload to a float array of `shape` (float32, or float16 for f16 raw storage)."""
        raise NotImplementedError

    def examples(self) -> list[Encoded]:
        """A few small encoded tensors that reach this codec's decoding paths (the fuzz tests, tests/test_fuzz.py,
        mutate them and the bit-flip sweep stores them). The default encodes seeded random tensors of a few shapes with
        `encode(w)`; a codec whose `encode` needs arguments, or has paths those miss, overrides this."""
        rng = np.random.default_rng(0)
        shapes = [(0,), (1,), (7,), (3, 5), (16, 24)]
        return [self.encode(rng.standard_normal(s).astype(np.float32)) for s in shapes]  # type: ignore[attr-defined]


def n_elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
