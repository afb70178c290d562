"""The test vectors in format_spec/test_vectors/: tiny .occ files, one per codec path, with the SHA-256 of each
decoded tensor (float32, little-endian, row-major) in vectors.json.

Regenerate (only when a codec's format changes, which needs a new codec version): python -m tests.codec_vectors
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from occrt.codecs.ecsq import CodingFrame, EcsqCodec
from occrt.codecs.planes import PlanesCodec
from occrt.codecs.raw import RawCodec
from occrt.codecs.rotation import RotationSpec
from occrt.format import OccFile, OccWriter

DIR = Path(__file__).resolve().parent.parent / "format_spec" / "test_vectors"


def tensors() -> dict[str, tuple[str, object]]:
    """name -> (file, Encoded). `exact` vectors decode with IEEE-exact arithmetic in any correct implementation."""
    rng = np.random.default_rng(2026)
    w = (rng.standard_normal((12, 20)) * np.linspace(0.5, 2, 20)[None, :]).astype(np.float32)
    heavy = (rng.standard_t(3, size=(16, 36)) * 0.05).astype(np.float32)
    return {
        "raw_f32": ("raw.occ", RawCodec.encode(w, dtype="f32")),
        "raw_f16": ("raw.occ", RawCodec.encode(w, dtype="f16")),
        "raw_bf16": ("raw.occ", RawCodec.encode(w, dtype="bf16")),
        "ecsq_plain": ("ecsq.occ", EcsqCodec.encode(w, step=0.25)),
        "ecsq_scales_escapes": ("ecsq.occ", EcsqCodec.encode(w * 50, step=0.02, row_scales=np.linspace(0.5, 2, 12),
                                                             col_scales=np.linspace(1, 1.5, 20), chunk_size=64)),
        "ecsq_rotated_rank": ("ecsq.occ", EcsqCodec.encode(heavy, step=0.01, rank=2,
                                                           rot_in=RotationSpec(1, 42, 36),
                                                           rot_out=RotationSpec(2, 43, 16))),
        "tcq_plain": ("tcq.occ", CodingFrame(w).encode(0.125, trellis=(64, 55))),
        "tcq_scales_rotated": ("tcq.occ", CodingFrame(heavy, rot_in=RotationSpec(1, 44, 36), rank=1,
                                                     row_scales=np.linspace(0.5, 2, 16),
                                                     col_scales=np.linspace(1, 1.5, 36)).encode(
                                                         0.004, trellis=(8, 5), chunk_size=64)),
        "planes_bf16": ("planes.occ", PlanesCodec.encode(w, dtype="bf16")),
        "planes_f16": ("planes.occ", PlanesCodec.encode(w, dtype="f16", chunk_size=100)),
        "planes_f32": ("planes.occ", PlanesCodec.encode(heavy, dtype="f32")),
    }


def sha256_f32(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def main() -> None:
    files: dict[str, list[tuple[str, object]]] = {}
    for name, (file, enc) in tensors().items():
        files.setdefault(file, []).append((name, enc))
    record = {}
    for file, items in files.items():
        path = DIR / file
        with OccWriter(path, overwrite=True) as w:
            for name, enc in items:
                w.add_tensor(name, enc)
            w.finish()
        with OccFile.open(path) as f:
            for name, _ in items:
                # rotations and U·V sum in an implementation-chosen order
                exact = name not in ("ecsq_rotated_rank", "tcq_scales_rotated")
                record[name] = {"file": file, "sha256": sha256_f32(f.tensor(name)), "exact": exact}
    (DIR / "vectors.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
