"""Codec 3, `tcq`: the ecsq frame with trellis-coded codes (entropy-coded trellis-coded quantization, ECTCQ).

An entropy-coded uniform scalar quantizer (codec 1) sits ~1.5 dB (0.25 bit) above the Gaussian rate-distortion
bound; that gap is the quantizer's *granular* loss: its cells are cubes. Trellis-coded quantization (Marcellin &
Fischer 1990; with entropy coding, Fischer & Wang 1992) recovers most of it by letting the sequence of choices
down a column, not each value alone, pick the reconstruction: on SmolLM2's rotated weights a 64-state trellis
gives 0.8-1.0 dB lower error than ECSQ at the same entropy (benchmarks/quality_results.md).

Reconstruction: the same as ecsq (occrt/codecs/ecsq.py), with fine codes K on a grid of step δ = `step`:

    W = Q_outᵀ · (U·V + δ · diag(a) · K · diag(b)) · Q_in

What is stored is not K but the trellis path through it. Down each column j of K (rows i = 0, 1, ..., n_out - 1)
runs a shift-register trellis of N = `states` states, starting in state 0:

    p = parity(s) = popcount(s & generator) mod 2      the "union" the next code must come from: K ≡ p (mod 2)
    m = next symbol of stream p                        K[i, j] = 2·m + p
    s = ((s << 1) | (m & 1)) mod N                     (m & 1: two's complement, so m mod 2 for negative m too)

So each K is one of the two interleaved sub-grids of step 2δ that the state allows, and its low bit m & 1 (which
of the union's two subsets, K mod 4) steers the state. The symbols m are entropy-coded in two ANS blocks
(format_spec/ans.md), one per union (p = 0, p = 1), each in row-major order of the positions that used it: the
two unions' distributions differ (p = 0 holds the zero, p = 1 is symmetric about it), so one table each costs
less than one shared table. The encoder (`trellis_codes`, or converters/gptq.py with error feedback) picks K by
the Viterbi algorithm: the path of least squared error down each column.

At the same δ·2 = Δ the rate is that of ecsq at step Δ (the entropy of a grid of step 2δ), and the error lower:
the rate control (converters/ratecontrol.py) measures ecsq at Δ and the encoder codes tcq at δ = Δ/2.

`params`: ecsq's keys (occrt/codecs/ecsq.py; `step` is δ) plus {"states": N, "generator": g}. Payload: ecsq's side
parts (a, b, U, V), then at the next multiple of 8 bytes: u64 byte length of block 0, block 0, zero padding to a
multiple of 8 bytes, block 1 to the end of the payload. format_spec/occ.md section 5.4 is the normative text.
"""
from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
from numba import njit, prange

from occrt.codecs import ans
from occrt.codecs.ecsq import PARAM_KEYS as ECSQ_KEYS, EcsqCodec, Layout
from occrt.errors import FormatError

PARAM_KEYS = ECSQ_KEYS | {"states", "generator"}
MAX_STATES = 1 << 12
# The trellis the converter writes: 64 states, generator 55 (0b110111): the best of all generators for 64 states in
# a search on Gaussian samples at ~2.6 bits (0.63 dB from the rate-distortion bound, against ~1.5 dB for ECSQ); 256
# states gain another ~0.1 dB for 4× the encoding time.
DEFAULT_STATES = 64
DEFAULT_GENERATOR = 55
# measured on SmolLM2's rotated weights (2-4 bits): the trellis' error relative to a uniform quantizer of step 2δ
# at the same rate, as an RMS factor (10^(-0.9 dB / 20)); for `occrt inspect`'s estimated error only
GRANULAR_RMS_FACTOR = 0.90


def parity_table(states: int, generator: int) -> np.ndarray:
    """(states,) int64: the union p(s) = popcount(s & generator) mod 2 each state draws its next code from."""
    return np.array([bin(s & generator).count("1") & 1 for s in range(states)], dtype=np.int64)


# ---- encoding: the Viterbi path ------------------------------------------------------------------------------------
@njit(cache=True)
def viterbi_column(x, step, parity, out):  # pragma: no cover (jit; tested against exhaustive search)
    """Fine codes out (n,) int32 on the trellis of `parity` (starting in state 0) with least Σ (x - step·K)².

    State s2 is reached from s2 >> 1 and (s2 >> 1) | N/2, both by the subset bit b = s2 & 1; the code a state
    takes with bit b is the nearest point of the subset K ≡ parity(s) + 2b (mod 4). So per position the four
    subsets' nearest points and errors are computed once, and each state compares its two predecessors."""
    n = x.shape[0]
    n_states = parity.shape[0]
    half = n_states >> 1
    cost = np.full(n_states, np.inf)
    cost[0] = 0.0
    new = np.empty(n_states)
    err = np.empty(4)
    nearest = np.empty((n, 4), np.int32)  # per position: the nearest point of each subset K ≡ r (mod 4)
    back = np.empty((n, n_states), np.uint8)  # 1: state s2 came from its upper predecessor (s2 >> 1) | N/2
    for t in range(n):
        xv = x[t] / step
        for r in range(4):
            k = np.floor((xv - r) / 4.0 + 0.5) * 4 + r
            nearest[t, r] = np.int32(k)
            e = x[t] - k * step
            err[r] = e * e
        for s2 in range(n_states):
            b = s2 & 1
            lo = s2 >> 1
            hi = lo | half
            c_lo = cost[lo] + err[parity[lo] + 2 * b]
            c_hi = cost[hi] + err[parity[hi] + 2 * b]
            if c_hi < c_lo:
                new[s2] = c_hi
                back[t, s2] = 1
            else:
                new[s2] = c_lo
                back[t, s2] = 0
        cost[:] = new
    s = 0
    for q in range(n_states):
        if cost[q] < cost[s]:
            s = q
    for t in range(n - 1, -1, -1):
        prev = (s >> 1) | (half if back[t, s] else 0)
        out[t] = nearest[t, parity[prev] + 2 * (s & 1)]
        s = prev


@njit(parallel=True, cache=True)
def _trellis_codes(residual, step, parity, out):  # pragma: no cover (jit)
    n_out, n_in = residual.shape
    for j in prange(n_in):
        x = np.empty(n_out)
        for i in range(n_out):
            x[i] = residual[i, j]
        col = np.empty(n_out, np.int32)
        viterbi_column(x, step, parity, col)
        for i in range(n_out):
            out[i, j] = col[i]


def trellis_codes(residual: np.ndarray, step: float, parity: np.ndarray) -> np.ndarray:
    """Fine codes K (n_out, n_in) int32 for `residual` (in the coding frame, divided by the step multipliers): the
    Viterbi path of least squared error down each column, columns in parallel."""
    out = np.empty(residual.shape, dtype=np.int32)
    _trellis_codes(np.ascontiguousarray(residual, dtype=np.float32), float(step), parity, out)
    return out


# ---- the two symbol streams <-> fine codes -------------------------------------------------------------------------
@njit(cache=True)
def _split(k, parity, m0, m1, count_only):  # pragma: no cover (jit; tested against `merge_reference`)
    """Walk the trellis over k: with count_only the number of union-0 positions, else fill m0 and m1 and return
    the same; -1 - (flat position) for a code off the trellis."""
    n_out, n_in = k.shape
    mask = parity.shape[0] - 1
    s = np.zeros(n_in, np.int64)
    n0 = n1 = 0
    for i in range(n_out):
        for j in range(n_in):
            p = parity[s[j]]
            d = np.int64(k[i, j]) - p
            if d & 1:
                return -1 - (i * n_in + j)  # K has the other union's parity
            m = d >> 1
            if p == 0:
                if not count_only:
                    m0[n0] = m
                n0 += 1
            else:
                if not count_only:
                    m1[n1] = m
                n1 += 1
            s[j] = ((s[j] << 1) | (m & 1)) & mask
    return n0


def split(k: np.ndarray, parity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fine codes (n_out, n_in) int32 -> the symbols m of union 0 and of union 1, each in row-major order. Two
    walks (count, then fill), so the two streams together take one int32 array of the tensor's size."""
    k = np.ascontiguousarray(k, dtype=np.int32)
    empty = np.empty(0, np.int32)
    n0 = _split(k, parity, empty, empty, True)
    if n0 < 0:
        i, j = divmod(-1 - n0, k.shape[1])
        raise ValueError(f"code {int(k[i, j])} at ({i}, {j}) is not on the trellis")
    m0 = np.empty(n0, np.int32)
    m1 = np.empty(k.size - n0, np.int32)
    _split(k, parity, m0, m1, False)
    return m0, m1


@njit(cache=True)
def _merge(m0, m1, parity, out):  # pragma: no cover (jit; tested against `merge_reference`)
    n_out, n_in = out.shape
    mask = parity.shape[0] - 1
    s = np.zeros(n_in, np.int64)
    n0 = n1 = 0
    for i in range(n_out):
        for j in range(n_in):
            p = parity[s[j]]
            if p == 0:
                if n0 == m0.shape[0]:
                    return -1
                m = np.int64(m0[n0])
                n0 += 1
            else:
                if n1 == m1.shape[0]:
                    return -2
                m = np.int64(m1[n1])
                n1 += 1
            out[i, j] = 2 * m + p
            s[j] = ((s[j] << 1) | (m & 1)) & mask
    if n0 != m0.shape[0]:
        return -3
    if n1 != m1.shape[0]:
        return -4
    return 0


def merge(m0: np.ndarray, m1: np.ndarray, parity: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The two unions' symbols -> fine codes K (n_out, n_in) int64. FormatError if the streams do not fit the
    trellis exactly (one runs out, or symbols are left over)."""
    out = np.empty(shape, dtype=np.int64)
    status = _merge(np.asarray(m0, np.int32), np.asarray(m1, np.int32), parity, out)
    if status:
        which = "0" if status in (-1, -3) else "1"
        what = "runs out before the trellis ends" if status in (-1, -2) else "has symbols left over at its end"
        raise FormatError(f"tcq: stream {which} {what}")
    if out.size and (out.max() > np.iinfo(np.int32).max or out.min() < np.iinfo(np.int32).min):
        raise FormatError("tcq: a fine code 2·m + p overflows int32")
    return out


def merge_reference(m0: np.ndarray, m1: np.ndarray, parity: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Plain numpy `merge` (row by row, every column's state advanced at once), for the tests and the spec."""
    n_out, n_in = shape
    s = np.zeros(n_in, np.int64)
    k = np.empty(shape, np.int64)
    pos = [0, 0]
    for i in range(n_out):
        p = parity[s]
        m = np.empty(n_in, np.int64)
        for q, stream in ((0, m0), (1, m1)):
            at = np.flatnonzero(p == q)
            m[at] = stream[pos[q]:pos[q] + at.size]
            pos[q] += at.size
        k[i] = 2 * m + p
        s = ((s << 1) | (m & 1)) & (len(parity) - 1)
    assert pos == [len(m0), len(m1)]
    return k


# ---- the codec -----------------------------------------------------------------------------------------------------
def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _block_spans(buf: np.ndarray, at: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(start, end) of block 0 and block 1 in a payload whose codes part starts at `at` (its length field, block 0,
    zero padding, block 1 to the end); FormatError if block 0 overruns or the padding is missing or not zero."""
    (n_bytes,) = struct.unpack_from("<Q", buf, at)
    start0 = at + 8
    if n_bytes > len(buf) - start0:
        raise FormatError(f"tcq block 0 of {n_bytes} bytes runs past the payload end", at)
    start1 = _align8(start0 + n_bytes)
    if start1 > len(buf) or buf[start0 + n_bytes:start1].any():
        raise FormatError("tcq padding after block 0 is missing or not zero", start0 + n_bytes)
    return (start0, start0 + n_bytes), (start1, len(buf))


def encode_codes(k: np.ndarray, states: int, generator: int, *, chunk_size: int) -> list[bytes]:
    """The codes part of a tcq payload for fine codes `k` (which must lie on the trellis)."""
    m0, m1 = split(k, parity_table(states, generator))
    b0 = ans.encode_symbols(m0, chunk_size=chunk_size)
    del m0
    b1 = ans.encode_symbols(m1, chunk_size=chunk_size)
    return [struct.pack("<Q", len(b0)), b0, bytes(_align8(len(b0)) - len(b0)), b1]


class TcqCodec(EcsqCodec):
    id = 3
    name = "tcq"
    versions = (1,)
    param_keys = PARAM_KEYS

    def check(self, *, version, dtype, shape, params, length):
        super().check(version=version, dtype=dtype, shape=shape, params=params, length=length)
        states, generator = params["states"], params["generator"]
        if isinstance(states, bool) or not isinstance(states, int) or not 2 <= states <= MAX_STATES \
                or states & (states - 1):
            raise FormatError(f"tcq states must be a power of two in [2, {MAX_STATES}], got {states!r}")
        if isinstance(generator, bool) or not isinstance(generator, int) or not 0 < generator < states:
            raise FormatError(f"tcq generator must be an integer in [1, states), got {generator!r}")
        layout = Layout.of(*shape, params)
        if length < layout.codes + 8 + 2 * ans.HEADER_SIZE:
            raise FormatError(f"tcq payload of {length} bytes is too short: side data takes {layout.codes}, the "
                              f"two code blocks at least {8 + 2 * ans.HEADER_SIZE}")

    def fine_codes(self, buf: np.ndarray, layout: Layout, shape: tuple[int, int], params: dict[str, Any],
                   threads: int = 1) -> np.ndarray:
        """K (n_out, n_in) int64 from the payload's two blocks. FormatError offsets are relative to the payload."""
        n = shape[0] * shape[1]
        at = layout.codes
        blocks = []
        for start, end in _block_spans(buf, at):
            try:
                info = ans.block_info(buf[start:end])
                if info["n_symbols"] > n:
                    raise FormatError(f"block holds {info['n_symbols']} symbols, the tensor has {n}", 8)
                blocks.append(ans.decode_symbols(buf[start:end], n_symbols=info["n_symbols"], threads=threads))
            except FormatError as e:
                raise FormatError(e.reason, None if e.offset is None else start + e.offset) from None
        if blocks[0].size + blocks[1].size != n:
            raise FormatError(f"tcq blocks hold {blocks[0].size} + {blocks[1].size} symbols, the tensor has {n}",
                              at)
        try:
            return merge(blocks[0], blocks[1], parity_table(params["states"], params["generator"]), shape)
        except FormatError as e:
            raise FormatError(e.reason, at) from None

    def summarize(self, params: dict[str, Any], shape: tuple[int, ...], payload: memoryview) -> dict[str, Any]:
        """ecsq's summary; entropy: bits per code over both blocks' tables; the estimated RMS error is that of a
        uniform quantizer of step 2δ times GRANULAR_RMS_FACTOR (the trellis' measured gain)."""
        n_out, n_in = shape
        layout = Layout.of(n_out, n_in, params)
        buf = np.frombuffer(payload, dtype=np.uint8)
        bits = 0.0
        for start, end in _block_spans(buf, layout.codes):
            info = ans.block_info(buf[start:end])
            freqs = info["freqs"].astype(np.float64)
            p = freqs / freqs.sum() if freqs.size else freqs
            bits += info["n_symbols"] * float(-(p * np.log2(np.where(p > 0, p, 1))).sum())
        out = super()._summary(params, shape, buf, layout, entropy=bits / max(n_out * n_in, 1),
                               rms=2 * float(params["step"]) / math.sqrt(12) * GRANULAR_RMS_FACTOR)
        out["trellis"] = f"{params['states']} states, generator {params['generator']}"
        return out

    def examples(self) -> list:
        from occrt.codecs.ecsq import CodingFrame
        from occrt.codecs.rotation import RotationSpec

        rng = np.random.default_rng(0)
        w = rng.standard_normal((24, 16)).astype(np.float32)
        return [
            CodingFrame(w).encode(0.15, trellis=(DEFAULT_STATES, DEFAULT_GENERATOR)),
            CodingFrame(w, rank=2, rot_in=RotationSpec(1, 7, 16), row_scales=np.linspace(0.5, 2, 24),
                        col_scales=np.linspace(1, 3, 16)).encode(0.03, trellis=(4, 2), chunk_size=50),
            CodingFrame(np.zeros((3, 5), np.float32)).encode(1.0, trellis=(2, 1)),
            CodingFrame(100 * w).encode(1e-3, trellis=(8, 5)),  # wide alphabet: escapes
        ]


TCQ = TcqCodec()
