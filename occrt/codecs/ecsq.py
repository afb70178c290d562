"""Codec 1, `ecsq`: a weight in chosen coordinates = structure + entropy-coded uniform residual.

For a matrix W (n_out, n_in) the encoder picks coordinates and writes

    W_r = Q_out · W · Q_inᵀ                  seeded randomized Hadamard rotations (either may be absent),
                                             stored as (construction, seed, n) -- format_spec/rotations.md
    W_r ≈ U·V + Δ · diag(a) · C · diag(b)    U (n_out, r), V (r, n_in): a rank-r structural part (f16; r may be 0);
                                             C: integer codes (any int32, no alphabet limit), ANS-coded in chunks;
                                             Δ: the tensor's step; a (n_out,), b (n_in,): optional f16 step
                                             multipliers per row / per column (importance-weighted steps)

and the decoder inverts it: W = Q_outᵀ · (U·V + Δ·diag(a)·C·diag(b)) · Q_in. The codes are an entropy-constrained
scalar quantizer (ECSQ): one uniform step, nearest-integer rounding, and an entropy coder that pays for the tails
instead of clipping them -- within ~0.25 bit of the Gaussian rate-distortion bound at useful rates (DESIGN.md).

`params` (JSON): {"step": Δ, "rank": r, "row_scales": bool, "col_scales": bool, "rot_in": spec|null,
"rot_out": spec|null}. Payload, each part starting at a multiple of 8 bytes (zero padding between):
    a  f16[n_out]            if row_scales
    b  f16[n_in]             if col_scales
    U  f16[n_out·r], V f16[r·n_in]     (row-major)
    codes: one ANS block (format_spec/ans.md) of n_out·n_in symbols, row-major
The numpy reference decoder in format_spec/occ.md (section 5.2) is these few lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from occrt.codecs import ans
from occrt.codecs.base import Codec, Encoded
from occrt.codecs.rotation import RotationSpec, rotate, unrotate
from occrt.errors import FormatError

PARAM_KEYS = frozenset({"step", "rank", "row_scales", "col_scales", "rot_in", "rot_out"})
MAX_RANK = 4096
PART_ALIGN = 8


def _align(n: int) -> int:
    return (n + PART_ALIGN - 1) // PART_ALIGN * PART_ALIGN


@dataclass(frozen=True)
class Layout:
    """Byte offsets of the payload's parts, from params and shape alone."""

    row_scales: tuple[int, int] | None
    col_scales: tuple[int, int] | None
    u: tuple[int, int] | None
    v: tuple[int, int] | None
    codes: int  # the ANS block starts here and runs to the end

    @classmethod
    def of(cls, n_out: int, n_in: int, params: dict[str, Any]) -> "Layout":
        pos = 0
        parts: dict[str, tuple[int, int] | None] = {"row_scales": None, "col_scales": None, "u": None, "v": None}
        for name, present, count in (("row_scales", params["row_scales"], n_out),
                                     ("col_scales", params["col_scales"], n_in),
                                     ("u", params["rank"] > 0, n_out * params["rank"]),
                                     ("v", params["rank"] > 0, params["rank"] * n_in)):
            if present:
                parts[name] = (pos, 2 * count)
                pos = _align(pos + 2 * count)
        return cls(codes=pos, **parts)


class EcsqCodec(Codec):
    id = 1
    name = "ecsq"
    versions = (1,)
    param_keys = PARAM_KEYS  # codec 3 (tcq) adds its trellis' keys

    def check(self, *, version, dtype, shape, params, length):
        super().check(version=version, dtype=dtype, shape=shape, params=params, length=length)
        if dtype != "f32":
            raise FormatError(f"ecsq decodes to f32, the index says {dtype!r}")
        if len(shape) != 2:
            raise FormatError(f"ecsq stores matrices; shape {list(shape)} is not 2-D")
        if set(params) != self.param_keys:
            raise FormatError(f"{self.name} params must have keys {sorted(self.param_keys)}, got {sorted(params)}")
        step = params["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not (0 < step < 1e30):
            raise FormatError(f"ecsq step must be a positive finite number, got {step!r}")
        rank = params["rank"]
        n_out, n_in = shape
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(n_out, n_in, MAX_RANK):
            raise FormatError(f"ecsq rank must be an integer in [0, min(shape, {MAX_RANK})], got {rank!r}")
        for key in ("row_scales", "col_scales"):
            if not isinstance(params[key], bool):
                raise FormatError(f"ecsq {key} must be true or false")
        for key, n in (("rot_in", n_in), ("rot_out", n_out)):
            if params[key] is not None:
                spec = RotationSpec.from_json(params[key])
                if spec.n != n:
                    raise FormatError(f"ecsq {key} has n={spec.n}, the matrix dimension is {n}")
        layout = Layout.of(n_out, n_in, params)
        if length < layout.codes + ans.HEADER_SIZE:
            raise FormatError(f"ecsq payload of {length} bytes is too short: side data takes {layout.codes} and the "
                              f"code block at least {ans.HEADER_SIZE}")

    def decode(self, payload: memoryview, *, version: int, dtype: str, shape: tuple[int, ...],
               params: dict[str, Any]) -> np.ndarray:
        n_out, n_in = shape
        layout = Layout.of(n_out, n_in, params)
        buf = np.frombuffer(payload, dtype=np.uint8)
        codes = self.fine_codes(buf, layout, (n_out, n_in), params)
        w = codes.astype(np.float32) * np.float32(params["step"])  # (n_out, n_in)
        if layout.row_scales:
            w *= _f16(buf, layout.row_scales)[:, None]
        if layout.col_scales:
            w *= _f16(buf, layout.col_scales)[None, :]
        if params["rank"]:
            r = params["rank"]
            u = _f16(buf, layout.u).reshape(n_out, r)
            v = _f16(buf, layout.v).reshape(r, n_in)
            w += u @ v
        return from_coding_frame(w, rot_in=_spec(params["rot_in"]), rot_out=_spec(params["rot_out"]))

    def fine_codes(self, buf: np.ndarray, layout: Layout, shape: tuple[int, int], params: dict[str, Any],
                   threads: int = 1) -> np.ndarray:
        """The integer codes C (n_out, n_in) of a payload (`buf`, uint8). FormatError offsets are the payload's."""
        n = shape[0] * shape[1]
        try:
            return ans.decode_symbols(buf[layout.codes:], n_symbols=n, threads=threads).reshape(shape)
        except FormatError as e:
            raise FormatError(e.reason, None if e.offset is None else layout.codes + e.offset) from None

    @staticmethod
    def encode(w: np.ndarray, *, step: float, rank: int = 0, rot_in: RotationSpec | None = None,
               rot_out: RotationSpec | None = None, row_scales: np.ndarray | None = None,
               col_scales: np.ndarray | None = None, chunk_size: int = ans.DEFAULT_CHUNK_SIZE) -> Encoded:
        """Encode W (n_out, n_in) with the given choices (the rate control makes them; see converters/ratecontrol)."""
        frame = CodingFrame(w, rot_in=rot_in, rot_out=rot_out, rank=rank, row_scales=row_scales,
                            col_scales=col_scales)
        return frame.encode(step, chunk_size=chunk_size)

    def summarize(self, params: dict[str, Any], shape: tuple[int, ...], payload: memoryview) -> dict[str, Any]:
        """For `occrt inspect`: rank, step, rotations, the codes' entropy under the stored table (bits per code),
        and the estimated RMS error, Δ·rms(a)·rms(b)/√12 (uniform rounding error; error feedback moves it a little)."""
        n_out, n_in = shape
        layout = Layout.of(n_out, n_in, params)
        buf = np.frombuffer(payload, dtype=np.uint8)
        info = ans.block_info(buf[layout.codes:])
        freqs = info["freqs"].astype(np.float64)
        p = freqs / freqs.sum()
        entropy = float(-(p * np.log2(p)).sum())  # bits per code if the codes follow the table (escapes excluded)
        return self._summary(params, shape, buf, layout, entropy=entropy, rms=float(params["step"]) / math.sqrt(12))

    @staticmethod
    def _summary(params, shape, buf, layout: Layout, *, entropy: float, rms: float) -> dict[str, Any]:
        """The summary from the codes' entropy and the quantizer's RMS error at unit multipliers."""
        for part in (layout.row_scales, layout.col_scales):
            if part is not None:
                rms *= float(np.sqrt(np.mean(_f16(buf, part).astype(np.float64) ** 2)))
        return {"rank": params["rank"], "step": params["step"],
                "rotation": "+".join(k[4:] for k in ("rot_in", "rot_out") if params[k]) or "none",
                "entropy": entropy, "est_rms_error": rms}

    def examples(self) -> list[Encoded]:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((24, 16)).astype(np.float32)
        return [
            self.encode(w, step=0.3),
            self.encode(w, step=0.05, rank=2, rot_in=RotationSpec(1, 7, 16), rot_out=RotationSpec(2, 9, 24),
                        row_scales=np.linspace(0.5, 2, 24), col_scales=np.linspace(1, 3, 16), chunk_size=100),
            self.encode(np.zeros((3, 5), np.float32), step=1.0),
            self.encode(100 * w, step=1e-3),  # wide alphabet: escapes
        ]


def _spec(d: dict | None) -> RotationSpec | None:
    return None if d is None else RotationSpec.from_json(d)


def _f16(buf: np.ndarray, part: tuple[int, int]) -> np.ndarray:
    start, n_bytes = part
    return buf[start:start + n_bytes].view("<f2").astype(np.float32)


def to_coding_frame(w: np.ndarray, *, rot_in: RotationSpec | None, rot_out: RotationSpec | None) -> np.ndarray:
    """W_r = Q_out W Q_inᵀ (float32)."""
    t = np.asarray(w, dtype=np.float32)
    if rot_in is not None:
        t = rotate(t, rot_in, axis=1)
    if rot_out is not None:
        t = rotate(t, rot_out, axis=0)
    return np.ascontiguousarray(t, dtype=np.float32)


def from_coding_frame(t: np.ndarray, *, rot_in: RotationSpec | None, rot_out: RotationSpec | None) -> np.ndarray:
    """W = Q_outᵀ W_r Q_in (float32)."""
    if rot_out is not None:
        t = unrotate(t, rot_out, axis=0)
    if rot_in is not None:
        t = unrotate(t, rot_in, axis=1)
    return np.ascontiguousarray(t, dtype=np.float32)


def to_f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 without overflow (values are clipped to ±65504) and without zeros for positive scales."""
    return np.clip(np.asarray(x, dtype=np.float64), -65504, 65504).astype(np.float16)


_ROUND_BLOCK = 1 << 18  # elements rounded at a time in CodingFrame.codes (1 MiB of float32 temporaries)


class CodingFrame:
    """One matrix prepared for coding: rotated, structural part removed, steps' per-row/column multipliers fixed.

    `residual` is what the scalar quantizer sees, divided by the multipliers: codes = round(residual / Δ). The rate
    control calls `codes(Δ)` / `distortion(Δ)` for many Δ and `encode(Δ)` once.
    """

    def __init__(self, w: np.ndarray, *, rot_in: RotationSpec | None = None, rot_out: RotationSpec | None = None,
                 rank: int = 0, row_scales: np.ndarray | None = None, col_scales: np.ndarray | None = None):
        if w.ndim != 2:
            raise ValueError(f"ecsq encodes matrices, got shape {w.shape}")
        n_out, n_in = w.shape
        if not 0 <= rank <= min(n_out, n_in, MAX_RANK):
            raise ValueError(f"rank {rank} out of range for shape {w.shape}")
        self.shape = (n_out, n_in)
        self.rot_in, self.rot_out, self.rank = rot_in, rot_out, rank
        t = to_coding_frame(w, rot_in=rot_in, rot_out=rot_out)  # (n_out, n_in)
        self.u = self.v = None
        if rank:
            # Truncated SVD of the rotated matrix; the factors are split evenly (√s on each side) and rounded to f16
            # first, so the residual is taken against exactly what the decoder will rebuild.
            uu, s, vt = np.linalg.svd(t.astype(np.float64), full_matrices=False)
            root = np.sqrt(s[:rank])
            self.u = to_f16(uu[:, :rank] * root[None, :])
            self.v = to_f16(root[:, None] * vt[:rank])
            t = t - self.u.astype(np.float32) @ self.v.astype(np.float32)
        self.a = None if row_scales is None else to_f16(row_scales)
        self.b = None if col_scales is None else to_f16(col_scales)
        for name, m, n in (("row_scales", self.a, n_out), ("col_scales", self.b, n_in)):
            if m is not None and (m.shape != (n,) or not (m.astype(np.float32) > 0).all()):
                raise ValueError(f"{name} must be {n} positive numbers (after rounding to f16)")
        self.scale = np.ones((1, 1), np.float32)  # multiplier of Δ per element, broadcast (n_out, n_in)
        if self.a is not None:
            self.scale = self.scale * self.a.astype(np.float32)[:, None]
        if self.b is not None:
            self.scale = self.scale * self.b.astype(np.float32)[None, :]
        # (n_out, n_in); without multipliers t itself (x / 1 == x), which may be a read-only view of the source
        self.residual = t if self.scale.size == 1 and self.scale[0, 0] == 1 else \
            np.ascontiguousarray(t / self.scale, dtype=np.float32)
        # distortion is measured in the coding frame, where the rotation keeps it equal to the weight error
        self.scale2 = (self.scale.astype(np.float64) ** 2)

    def codes(self, step: float) -> np.ndarray:
        """round(residual / Δ) as int32, (n_out, n_in); rounded in blocks, so the only full-size array is the
        codes (the same values as np.rint(residual * (1/Δ)).astype(int32) in one go)."""
        inv = np.float32(1.0 / step)
        out = np.empty(self.shape, dtype=np.int32)
        r, o = self.residual.reshape(-1), out.reshape(-1)
        for a in range(0, r.size, _ROUND_BLOCK):
            q = r[a:a + _ROUND_BLOCK] * inv
            np.rint(q, out=q)
            o[a:a + _ROUND_BLOCK] = q  # float32 -> int32, as astype
        return out

    def distortion(self, step: float, codes: np.ndarray | None = None) -> float:
        """Σ (W - Ŵ)² in the coding frame (= in the original frame: the rotations are orthogonal)."""
        c = self.codes(step) if codes is None else codes
        err = (c.astype(np.float32) * np.float32(step) - self.residual).astype(np.float64)
        return float(((err ** 2) * self.scale2).sum())

    def side_bytes(self) -> int:
        n_out, n_in = self.shape
        params = {"row_scales": self.a is not None, "col_scales": self.b is not None, "rank": self.rank}
        return Layout.of(n_out, n_in, params).codes

    def params(self, step: float) -> dict[str, Any]:
        return {"step": float(step), "rank": self.rank, "row_scales": self.a is not None,
                "col_scales": self.b is not None,
                "rot_in": None if self.rot_in is None else self.rot_in.to_json(),
                "rot_out": None if self.rot_out is None else self.rot_out.to_json()}

    def encode(self, step: float, *, chunk_size: int = ans.DEFAULT_CHUNK_SIZE, codes: np.ndarray | None = None,
               trellis: tuple[int, int] | None = None) -> Encoded:
        """The record at step Δ: codec 1 (ecsq), or with `trellis` = (states, generator) codec 3 (tcq, Δ the fine
        step δ; occrt/codecs/tcq.py), its codes the Viterbi path unless `codes` gives them (on the trellis)."""
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"step must be positive and finite, got {step}")
        if trellis is not None:
            from occrt.codecs import tcq

            if codes is None:
                codes = tcq.trellis_codes(self.residual, step, tcq.parity_table(*trellis))
            blocks = tcq.encode_codes(codes, *trellis, chunk_size=chunk_size)
            params = {**self.params(step), "states": trellis[0], "generator": trellis[1]}
            return Encoded(codec=tcq.TcqCodec.id, codec_version=1, dtype="f32", shape=self.shape,
                           payload=[self._side(), b"".join(blocks)], params=params)
        c = self.codes(step) if codes is None else codes
        block = ans.encode_symbols(c.reshape(-1), chunk_size=chunk_size)
        return Encoded(codec=EcsqCodec.id, codec_version=1, dtype="f32", shape=self.shape,
                       payload=[self._side(), block], params=self.params(step))

    def _side(self) -> bytes:
        """The payload's parts before the codes (a, b, U, V), padded to where the codes start."""
        layout = Layout.of(*self.shape, self.params(1.0))
        payload = bytearray(layout.codes)
        for part, arr in ((layout.row_scales, self.a), (layout.col_scales, self.b), (layout.u, self.u),
                          (layout.v, self.v)):
            if part is not None:
                payload[part[0]:part[0] + part[1]] = arr.astype("<f2").tobytes()
        return bytes(payload)


ECSQ = EcsqCodec()
