"""Kernels on the runtime's compact weights: fixed-width integer codes C with one float multiplier per row.

A compressed matrix in its coding frame is W_r[i, j] = m_i · C[i, j] · b_j (ecsq: m = Δ·a, the step times the row
multipliers; b the column multipliers). The caller folds b into the activation (x_b = b ⊙ x), so every kernel here
computes, for rows x of X (T, n_in),

    y_i = m_i · Σ_j C[i, j] · x_j                                   (T, n_out)

reading each code once per call and never materializing W_r. Storage kinds (`KINDS`, chosen per tensor from the
range of its codes, narrowest first):

    int4   (n_out, ceil(n_in/2)) uint8   byte j of row i: C[i, j] in the low nibble, C[i, j + h] in the high nibble
                                         (h = ceil(n_in/2); two's complement nibbles, codes in [-8, 7]). Pairing the
                                         two halves of a row, not neighbours, keeps both inner loops contiguous in x,
                                         so they vectorize. When n_in is odd the last high nibble is 0 (padding).
    int8   (n_out, n_in) int8            codes in [-128, 127]
    int16  (n_out, n_in) int16           codes in [-32768, 32767]

Decoding one token reads the codes once: `qmatmul` (T = 1, or a few tokens with each row reused from L1). The prompt
(prefill) uses `qgemm`, a register-blocked kernel (4 rows x 4 tokens, 16 sums in registers, each code widened once
for 4 tokens): on a 2-core EPYC (Zen 4) it ran ~100 GFLOP/s on one core for SmolLM2's shapes, as fast as OpenBLAS's
single-threaded sgemm on the float32 matrix, and 2.5x the row-dot kernel; it needs no float copy of the tile and no
BLAS threads (which, on a machine shared with other work, cost milliseconds per call waiting for a core).
The same kernels take float32 "codes" with m = 1: the dense runtime form uses them too. `dequantize_rows` gives
rows of m ⊙ C (the embedding lookup).

Sums run in float32 with reassociation allowed (so the reductions vectorize): results agree with the float32 dense
product to float32 rounding. `reference_*` are the plain numpy definitions the tests check the kernels against.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

KINDS = ("int4", "int8", "int16")
_RANGES = {"int4": (-8, 7), "int8": (-128, 127), "int16": (-32768, 32767)}
_FAST = {"reassoc", "contract"}  # vectorized float32 sums; no assumption about NaN, infinities or signed zeros


def kind_for(lo: int, hi: int) -> str | None:
    """The narrowest storage kind holding every code in [lo, hi], or None (codes wider than int16)."""
    for kind in KINDS:
        k_lo, k_hi = _RANGES[kind]
        if k_lo <= lo and hi <= k_hi:
            return kind
    return None


def n_packed(n_in: int) -> int:
    """Bytes per row of an int4 matrix: h = ceil(n_in / 2)."""
    return (n_in + 1) // 2


# ---- int4 packing --------------------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def pack_int4(c, out):  # pragma: no cover (jit)
    """c (n_out, n_in) int8 with codes in [-8, 7] -> out (n_out, ceil(n_in/2)) uint8, half-split nibbles."""
    n_out, n_in = c.shape
    h = (n_in + 1) // 2
    for i in range(n_out):
        for j in range(h):
            lo = np.uint8(c[i, j] & 15)
            hi = np.uint8(0)
            if j + h < n_in:
                hi = np.uint8(c[i, j + h] & 15)
            out[i, j] = lo | (hi << np.uint8(4))


def unpack_int4(p: np.ndarray, n_in: int) -> np.ndarray:
    """(n_out, ceil(n_in/2)) uint8 -> (n_out, n_in) int8 (numpy; the reference for the packed layout)."""
    lo = ((p & 15).astype(np.int8) ^ 8) - 8
    hi = ((p >> 4).astype(np.int8) ^ 8) - 8
    return np.concatenate([lo, hi], axis=1)[:, :n_in]


# ---- decode: y = m ⊙ (C x) for a few tokens ----------------------------------------------------------------------
@njit(inline="always", fastmath=_FAST)
def _rows(c, X, m, Y, r0, r1):
    for i in range(r0, r1):
        row = c[i]
        for t in range(X.shape[0]):
            x = X[t]
            acc = np.float32(0.0)
            for j in range(row.shape[0]):
                acc += np.float32(row[j]) * x[j]
            Y[t, i] = acc * m[i]


@njit(inline="always")
def _lo(b):
    """The low nibble of an int8 byte, sign-extended: shift it to the top, then arithmetic shift back."""
    return np.int8(b << 4) >> 4


@njit(inline="always", fastmath=_FAST)
def _rows_i4(p, n_in, X, m, Y, r0, r1):
    # p is read as int8, so `b >> 4` is the sign-extended high nibble (an arithmetic shift)
    q = p.view(np.int8)
    h = q.shape[1]
    n_hi = n_in - h  # high nibbles that hold a code (h - 1 when n_in is odd)
    for i in range(r0, r1):
        row = q[i]
        for t in range(X.shape[0]):
            x = X[t]
            x_hi = x[h:]
            acc = np.float32(0.0)
            for j in range(n_hi):
                b = row[j]
                acc += np.float32(_lo(b)) * x[j] + np.float32(b >> 4) * x_hi[j]
            if n_hi < h:
                acc += np.float32(_lo(row[h - 1])) * x[h - 1]
            Y[t, i] = acc * m[i]


_BLOCK = 64  # rows per parallel work item: enough work to amortize scheduling, small enough to balance


@njit(nogil=True, cache=True, fastmath=_FAST)
def qmatmul(c, X, m, Y):  # pragma: no cover (jit)
    """Y (T, n_out) = (X (T, n_in) @ C.T) * m, C int8/int16 (n_out, n_in). One thread."""
    _rows(c, X, m, Y, 0, c.shape[0])


@njit(nogil=True, cache=True, parallel=True, fastmath=_FAST)
def qmatmul_parallel(c, X, m, Y):  # pragma: no cover (jit)
    """`qmatmul` with blocks of rows spread over numba's threads (for large matrices: the output head)."""
    n_out = c.shape[0]
    for b in prange((n_out + _BLOCK - 1) // _BLOCK):
        _rows(c, X, m, Y, b * _BLOCK, min(n_out, (b + 1) * _BLOCK))


@njit(nogil=True, cache=True, fastmath=_FAST)
def qmatmul_i4(p, n_in, X, m, Y):  # pragma: no cover (jit)
    """`qmatmul` for int4 codes packed as described above: p (n_out, ceil(n_in/2)) uint8."""
    _rows_i4(p, n_in, X, m, Y, 0, p.shape[0])


@njit(nogil=True, cache=True, parallel=True, fastmath=_FAST)
def qmatmul_i4_parallel(p, n_in, X, m, Y):  # pragma: no cover (jit)
    n_out = p.shape[0]
    for b in prange((n_out + _BLOCK - 1) // _BLOCK):
        _rows_i4(p, n_in, X, m, Y, b * _BLOCK, min(n_out, (b + 1) * _BLOCK))


# ---- prefill: register-blocked 4 rows x 4 tokens -----------------------------------------------------------------
@njit(inline="always", fastmath=_FAST)
def _gemm44(c, X, m, Y, i0, t0):
    """Y[t0:t0+4, i0:i0+4] for codes c int8/int16/float32: 16 sums kept in registers, each code widened once and
    used for 4 tokens, each activation used for 4 rows."""
    w0, w1, w2, w3 = c[i0], c[i0 + 1], c[i0 + 2], c[i0 + 3]
    x0, x1, x2, x3 = X[t0], X[t0 + 1], X[t0 + 2], X[t0 + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for j in range(w0.shape[0]):
        f0, f1, f2, f3 = np.float32(w0[j]), np.float32(w1[j]), np.float32(w2[j]), np.float32(w3[j])
        y0, y1, y2, y3 = x0[j], x1[j], x2[j], x3[j]
        a00 += f0 * y0; a01 += f0 * y1; a02 += f0 * y2; a03 += f0 * y3  # noqa: E702
        a10 += f1 * y0; a11 += f1 * y1; a12 += f1 * y2; a13 += f1 * y3  # noqa: E702
        a20 += f2 * y0; a21 += f2 * y1; a22 += f2 * y2; a23 += f2 * y3  # noqa: E702
        a30 += f3 * y0; a31 += f3 * y1; a32 += f3 * y2; a33 += f3 * y3  # noqa: E702
    _store44(Y, m, i0, t0, a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(inline="always", fastmath=_FAST)
def _gemm44_i4(p, n_in, X, m, Y, i0, t0):
    """`_gemm44` for packed int4 codes: byte j gives row codes for columns j (low nibble) and j + h (high)."""
    q = p.view(np.int8)
    h = q.shape[1]
    n_hi = n_in - h
    w0, w1, w2, w3 = q[i0], q[i0 + 1], q[i0 + 2], q[i0 + 3]
    x0, x1, x2, x3 = X[t0], X[t0 + 1], X[t0 + 2], X[t0 + 3]
    z0, z1, z2, z3 = x0[h:], x1[h:], x2[h:], x3[h:]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for j in range(h):
        b0, b1, b2, b3 = w0[j], w1[j], w2[j], w3[j]
        f0, f1, f2, f3 = np.float32(_lo(b0)), np.float32(_lo(b1)), np.float32(_lo(b2)), np.float32(_lo(b3))
        y0, y1, y2, y3 = x0[j], x1[j], x2[j], x3[j]
        a00 += f0 * y0; a01 += f0 * y1; a02 += f0 * y2; a03 += f0 * y3  # noqa: E702
        a10 += f1 * y0; a11 += f1 * y1; a12 += f1 * y2; a13 += f1 * y3  # noqa: E702
        a20 += f2 * y0; a21 += f2 * y1; a22 += f2 * y2; a23 += f2 * y3  # noqa: E702
        a30 += f3 * y0; a31 += f3 * y1; a32 += f3 * y2; a33 += f3 * y3  # noqa: E702
    for j in range(n_hi):
        b0, b1, b2, b3 = w0[j], w1[j], w2[j], w3[j]
        f0, f1, f2, f3 = np.float32(b0 >> 4), np.float32(b1 >> 4), np.float32(b2 >> 4), np.float32(b3 >> 4)
        y0, y1, y2, y3 = z0[j], z1[j], z2[j], z3[j]
        a00 += f0 * y0; a01 += f0 * y1; a02 += f0 * y2; a03 += f0 * y3  # noqa: E702
        a10 += f1 * y0; a11 += f1 * y1; a12 += f1 * y2; a13 += f1 * y3  # noqa: E702
        a20 += f2 * y0; a21 += f2 * y1; a22 += f2 * y2; a23 += f2 * y3  # noqa: E702
        a30 += f3 * y0; a31 += f3 * y1; a32 += f3 * y2; a33 += f3 * y3  # noqa: E702
    _store44(Y, m, i0, t0, a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(inline="always")
def _store44(Y, m, i0, t0, a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33):
    m0, m1, m2, m3 = m[i0], m[i0 + 1], m[i0 + 2], m[i0 + 3]
    Y[t0, i0], Y[t0 + 1, i0], Y[t0 + 2, i0], Y[t0 + 3, i0] = a00 * m0, a01 * m0, a02 * m0, a03 * m0
    Y[t0, i0 + 1], Y[t0 + 1, i0 + 1], Y[t0 + 2, i0 + 1], Y[t0 + 3, i0 + 1] = a10 * m1, a11 * m1, a12 * m1, a13 * m1
    Y[t0, i0 + 2], Y[t0 + 1, i0 + 2], Y[t0 + 2, i0 + 2], Y[t0 + 3, i0 + 2] = a20 * m2, a21 * m2, a22 * m2, a23 * m2
    Y[t0, i0 + 3], Y[t0 + 1, i0 + 3], Y[t0 + 2, i0 + 3], Y[t0 + 3, i0 + 3] = a30 * m3, a31 * m3, a32 * m3, a33 * m3


@njit(inline="always", fastmath=_FAST)
def _gemm_rows(c, X, m, Y, r0, r1):
    """Rows [r0, r1) for all tokens: 4x4 blocks, then the tokens left over (T mod 4) one row-dot at a time."""
    t4 = X.shape[0] // 4 * 4
    for i0 in range(r0, r1, 4):
        for t0 in range(0, t4, 4):
            _gemm44(c, X, m, Y, i0, t0)
    _rows(c, X[t4:], m, Y[t4:], r0, r1)


@njit(inline="always", fastmath=_FAST)
def _gemm_rows_i4(p, n_in, X, m, Y, r0, r1):
    t4 = X.shape[0] // 4 * 4
    for i0 in range(r0, r1, 4):
        for t0 in range(0, t4, 4):
            _gemm44_i4(p, n_in, X, m, Y, i0, t0)
    _rows_i4(p, n_in, X[t4:], m, Y[t4:], r0, r1)


@njit(nogil=True, cache=True, fastmath=_FAST)
def qgemm(c, X, m, Y):  # pragma: no cover (jit)
    """Y (T, n_out) = (X (T, n_in) @ C.T) * m for many tokens (the prompt); C int8/int16/float32. One thread."""
    n4 = c.shape[0] // 4 * 4
    _gemm_rows(c, X, m, Y, 0, n4)
    _rows(c, X, m, Y, n4, c.shape[0])


@njit(nogil=True, cache=True, parallel=True, fastmath=_FAST)
def qgemm_parallel(c, X, m, Y):  # pragma: no cover (jit)
    n4 = c.shape[0] // 4 * 4
    for b in prange((n4 + _BLOCK - 1) // _BLOCK):
        _gemm_rows(c, X, m, Y, b * _BLOCK, min(n4, (b + 1) * _BLOCK))
    _rows(c, X, m, Y, n4, c.shape[0])


@njit(nogil=True, cache=True, fastmath=_FAST)
def qgemm_i4(p, n_in, X, m, Y):  # pragma: no cover (jit)
    n4 = p.shape[0] // 4 * 4
    _gemm_rows_i4(p, n_in, X, m, Y, 0, n4)
    _rows_i4(p, n_in, X, m, Y, n4, p.shape[0])


@njit(nogil=True, cache=True, parallel=True, fastmath=_FAST)
def qgemm_i4_parallel(p, n_in, X, m, Y):  # pragma: no cover (jit)
    n4 = p.shape[0] // 4 * 4
    for b in prange((n4 + _BLOCK - 1) // _BLOCK):
        _gemm_rows_i4(p, n_in, X, m, Y, b * _BLOCK, min(n4, (b + 1) * _BLOCK))
    _rows_i4(p, n_in, X, m, Y, n4, p.shape[0])


# ---- rows of W: the embedding lookup ----------------------------------------------------------------------------
@njit(nogil=True, cache=True, fastmath=_FAST)
def dequantize_rows(c, rows, m, out):  # pragma: no cover (jit)
    """out[k] = m[rows[k]] · C[rows[k]] as float32; c int8/int16 (n_out, n_in), rows (R,) int64, out (R, n_in)."""
    for k in range(rows.shape[0]):
        i = rows[k]
        s = m[i]
        row = c[i]
        o = out[k]
        for j in range(row.shape[0]):
            o[j] = np.float32(row[j]) * s


@njit(nogil=True, cache=True, fastmath=_FAST)
def dequantize_rows_i4(p, n_in, rows, m, out):  # pragma: no cover (jit)
    q = p.view(np.int8)
    h = q.shape[1]
    n_hi = n_in - h
    for k in range(rows.shape[0]):
        i = rows[k]
        s = m[i]
        row = q[i]
        o = out[k]
        o_hi = o[h:]
        for j in range(h):
            o[j] = np.float32(_lo(row[j])) * s
        for j in range(n_hi):
            o_hi[j] = np.float32(row[j] >> 4) * s


# ---- numpy references --------------------------------------------------------------------------------------------
def reference_codes(kind: str, data: np.ndarray, n_in: int) -> np.ndarray:
    """The codes C (n_out, n_in) int32 of a stored matrix."""
    c = unpack_int4(data, n_in) if kind == "int4" else data
    return c.astype(np.int32)


def reference_qmatmul(kind: str, data: np.ndarray, n_in: int, X: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(X @ C.T) * m in float64: what `qmatmul*` compute in float32."""
    c = reference_codes(kind, data, n_in).astype(np.float64)
    return (X.astype(np.float64) @ c.T) * m.astype(np.float64)[None, :]


def reference_dequantize(kind: str, data: np.ndarray, n_in: int, rows: np.ndarray, m: np.ndarray) -> np.ndarray:
    return (reference_codes(kind, data, n_in)[rows].astype(np.float32) * m[rows, None]).astype(np.float32)
