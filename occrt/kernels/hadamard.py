"""Fast application of a seeded randomized Hadamard rotation Q (occrt.codecs.rotation) to activations, in place.

The numpy reference is `occrt.codecs.rotation.rotate` / `unrotate`; tests/test_rotation.py checks these kernels
against it (within 1e-5 relative, float32). Q = K · P · D with K = (H_L ⊗ S_h) / √n, or the block fallback
K = diag(H_(2^k) / √(2^k)); every block below is (start, L_b) with the small order h shared (h = 1 in the fallback).

Per row (n floats, float32 throughout):
    forward  (Q x):  w_i = x[perm[i]] · d[perm[i]]        gather and sign in one pass (sg = d[perm])
                     w <- (I_L ⊗ S_h) w                   a dense h × h matvec per group of h, in place via tmp (h,)
                     w <- (H_L ⊗ I_h) w                   butterfly: stage `half` pairs runs of half·h contiguous floats
                     x_i = w_i / √n
    inverse  (Qᵀ x): the same stages transposed in reverse order: butterfly (H is symmetric), Sᵀ, then the scatter
                     x[perm[i]] = sg[i] · w_i / √n.
Cost per row: n·h multiply-adds + n·log2(L) additions (n = 576: 16 groups of 36² plus 4 stages; microseconds).

The numba functions take the plan's arrays, not objects, so they compile once for all specs; `HadamardKernel` holds
those arrays (float32, contiguous) for one spec. `rotate_torch` / `unrotate_torch` (and `TorchHadamard`) are the same
maps for torch tensors on any device; torch is imported inside them only.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from occrt.codecs.rotation import RotationSpec, plan, sylvester

_ROWS_PARALLEL = 4  # from this many rows on, rows are spread over threads; below it the thread start costs more


@njit(cache=True, inline="always")
def _small(w, tmp, M, L, h):
    """w (L·h,) <- for each group g of h: g = Mᵀ g, i.e. g_i = Σ_k M[k, i] g_k. Pass M = Sᵀ to apply S."""
    for r in range(L):
        g = w[r * h:(r + 1) * h]
        tmp[:] = 0.0
        for k in range(h):
            c = g[k]
            m = M[k]
            for i in range(h):  # contiguous in i: vectorizes without reassociating a sum
                tmp[i] += m[i] * c
        g[:] = tmp


@njit(cache=True, inline="always")
def _butterfly(w, start, L, h):
    """w[start : start + L·h] <- (H_L ⊗ I_h) of it: stage `half` maps runs a, b of half·h floats to (a + b, a - b).

    a and b are separate slice views: indexing w[i] and w[i + span] in one loop keeps LLVM from vectorizing (it cannot
    prove they do not overlap).
    """
    half = 1
    while half < L:
        span = half * h
        for base in range(start, start + L * h, 2 * span):
            a = w[base:base + span]
            b = w[base + span:base + 2 * span]
            for i in range(span):
                u = a[i]
                v = b[i]
                a[i] = u + v
                b[i] = u - v
        half *= 2


@njit(cache=True)
def _forward_row(x, w, tmp, perm, has_perm, sg, ST, h, starts, Ls, scales):
    n = x.shape[0]
    if has_perm:
        for i in range(n):
            w[i] = x[perm[i]] * sg[i]
    else:
        for i in range(n):
            w[i] = x[i] * sg[i]
    for b in range(starts.shape[0]):
        if h > 1:
            _small(w[starts[b]:], tmp, ST, Ls[b], h)
        _butterfly(w, starts[b], Ls[b], h)
        s = scales[b]
        for i in range(starts[b], starts[b] + Ls[b] * h):
            x[i] = w[i] * s


@njit(cache=True)
def _inverse_row(x, w, tmp, perm, has_perm, sg, S, h, starts, Ls, scales):
    n = x.shape[0]
    for i in range(n):
        w[i] = x[i]
    for b in range(starts.shape[0]):
        _butterfly(w, starts[b], Ls[b], h)
        if h > 1:
            _small(w[starts[b]:], tmp, S, Ls[b], h)  # M = S applies Sᵀ
        s = scales[b]
        if has_perm:
            for i in range(starts[b], starts[b] + Ls[b] * h):
                x[perm[i]] = w[i] * sg[i] * s
        else:
            for i in range(starts[b], starts[b] + Ls[b] * h):
                x[i] = w[i] * sg[i] * s


@njit(cache=True)
def _apply_vec(x, inverse, perm, has_perm, sg, S, ST, h, starts, Ls, scales):
    """One vector x (n,) float32, in place (decode step)."""
    w = np.empty(x.shape[0], dtype=np.float32)
    tmp = np.empty(max(h, 1), dtype=np.float32)
    if inverse:
        _inverse_row(x, w, tmp, perm, has_perm, sg, S, h, starts, Ls, scales)
    else:
        _forward_row(x, w, tmp, perm, has_perm, sg, ST, h, starts, Ls, scales)


@njit(cache=True, parallel=True)
def _apply_rows(X, inverse, perm, has_perm, sg, S, ST, h, starts, Ls, scales):
    """Rows of X (rows, n) float32, each rotated in place; rows spread over threads (prefill)."""
    n = X.shape[1]
    for r in prange(X.shape[0]):
        w = np.empty(n, dtype=np.float32)
        tmp = np.empty(max(h, 1), dtype=np.float32)
        if inverse:
            _inverse_row(X[r], w, tmp, perm, has_perm, sg, S, h, starts, Ls, scales)
        else:
            _forward_row(X[r], w, tmp, perm, has_perm, sg, ST, h, starts, Ls, scales)


@njit(cache=True)
def _apply_rows_serial(X, inverse, perm, has_perm, sg, S, ST, h, starts, Ls, scales):
    """`_apply_rows` on one thread."""
    n = X.shape[1]
    w = np.empty(n, dtype=np.float32)
    tmp = np.empty(max(h, 1), dtype=np.float32)
    for r in range(X.shape[0]):
        if inverse:
            _inverse_row(X[r], w, tmp, perm, has_perm, sg, S, h, starts, Ls, scales)
        else:
            _forward_row(X[r], w, tmp, perm, has_perm, sg, ST, h, starts, Ls, scales)


class HadamardKernel:
    """Q and Qᵀ of one spec, applied in place to float32 vectors (n,) or rows (..., n). Build once, call per token.
    `parallel`: spread rows over numba's threads from _ROWS_PARALLEL rows on (the runtime passes False: on a busy
    machine a parallel region can wait milliseconds for a core, longer than rotating a prompt's rows on one)."""

    def __init__(self, spec: RotationSpec, *, parallel: bool = True):
        pl = plan(spec)
        fz = pl.fz
        n = spec.n
        self.spec = spec
        self.n = n
        self.parallel = parallel
        self.full = pl.full
        self.mixing_width = pl.mixing_width
        # writable copies: numba compiles separately for read-only arrays (the plan's are read-only)
        perm = np.arange(n, dtype=np.int64) if pl.perm is None else np.array(pl.perm, dtype=np.int64)
        self._has_perm = pl.perm is not None
        self._perm = perm  # (n,) gather index
        self._sg = np.ascontiguousarray(pl.signs[perm], dtype=np.float32)  # (n,) d[perm[i]]
        if fz.full:
            self._h = fz.h
            self._starts = np.zeros(1, dtype=np.int64)
            self._Ls = np.array([fz.L], dtype=np.int64)
            self._scales = np.array([1.0 / math.sqrt(n)], dtype=np.float32)
        else:
            self._h = 1
            sizes = np.array(fz.blocks, dtype=np.int64)
            self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            self._Ls = sizes
            self._scales = (1.0 / np.sqrt(sizes.astype(np.float64))).astype(np.float32)
        self._S = np.ascontiguousarray(pl.S, dtype=np.float32)  # (h, h)
        self._ST = np.ascontiguousarray(pl.S.T, dtype=np.float32)  # (h, h)

    def _args(self):
        return (self._perm, self._has_perm, self._sg, self._S, self._ST, self._h, self._starts, self._Ls,
                self._scales)

    def _apply(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise TypeError("the Hadamard kernels work in place on C-contiguous float32 arrays")
        if x.ndim == 0 or x.shape[-1] != self.n:
            raise ValueError(f"last axis of shape {x.shape} must have length n = {self.n}")
        if x.ndim == 1:
            _apply_vec(x, inverse, *self._args())
            return x
        rows = x.reshape(-1, self.n)  # a view: x is contiguous
        if self.parallel and rows.shape[0] >= _ROWS_PARALLEL:
            _apply_rows(rows, inverse, *self._args())
        else:
            _apply_rows_serial(rows, inverse, *self._args())
        return x

    def rotate_(self, x: np.ndarray) -> np.ndarray:
        """x <- Q x along the last axis, in place; returns x."""
        return self._apply(x, False)

    def unrotate_(self, x: np.ndarray) -> np.ndarray:
        """x <- Qᵀ x along the last axis, in place; returns x."""
        return self._apply(x, True)


def rotate_(x: np.ndarray, spec: RotationSpec) -> np.ndarray:
    """Q x along the last axis of a float32 array, in place (builds a HadamardKernel: keep one for repeated calls)."""
    return HadamardKernel(spec).rotate_(x)


def unrotate_(x: np.ndarray, spec: RotationSpec) -> np.ndarray:
    """Qᵀ x along the last axis of a float32 array, in place."""
    return HadamardKernel(spec).unrotate_(x)


# ----------------------------------------------------------------------------------------------------------------------
# torch (CUDA path). Same stages as the numpy reference, on whole tensors; half types are computed in float32.

class TorchHadamard:
    """Q and Qᵀ of one spec for torch tensors (..., n) on `device`; returns new tensors in the input's dtype."""

    _DENSE_BITS = 6  # the butterfly's first stages as one dense H_64 matmul: one kernel launch instead of six

    def __init__(self, spec: RotationSpec, device="cpu"):
        import torch

        pl = plan(spec)
        self.spec = spec
        self.n = spec.n
        self.fz = pl.fz
        self.full = pl.full
        self.mixing_width = pl.mixing_width
        perm = np.arange(spec.n) if pl.perm is None else pl.perm
        self._perm = None if pl.perm is None else torch.from_numpy(np.array(perm, dtype=np.int64)).to(device)
        self._sg = torch.from_numpy(pl.signs[perm].astype(np.float32)).to(device)  # (n,) d[perm[i]]
        self._S = torch.from_numpy(pl.S.astype(np.float32)).to(device)  # (h, h)
        orders = {min(L, 1 << self._DENSE_BITS) for L in ((pl.fz.L,) if pl.full else pl.fz.blocks)}
        self._H = {c: torch.from_numpy(sylvester(c).astype(np.float32)).to(device) for c in orders}  # (c, c)

    def _butterfly(self, t, L: int):
        """H_L along axis 1 of t (rows, L, inner): a dense H_c (c = min(L, 64)) for the first stages, then stages."""
        import torch

        rows, _, inner = t.shape
        c = min(L, 1 << self._DENSE_BITS)
        if c > 1:
            u = t.reshape(rows * (L // c), c, inner)
            t = torch.matmul(self._H[c].to(t.dtype), u).reshape(rows, L, inner)
        half = c
        while half < L:
            v = t.reshape(rows, L // (2 * half), 2, half * inner)
            t = torch.stack((v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]), dim=2).reshape(rows, L, inner)
            half *= 2
        return t

    def _K(self, t, transpose: bool):
        """K or Kᵀ on t (rows, n) float32."""
        import torch

        rows, n = t.shape
        fz = self.fz
        if fz.full:
            if fz.h > 1:
                S = (self._S if transpose else self._S.T).to(t.dtype)
                t = (t.reshape(rows * fz.L, fz.h) @ S)  # rows of groups times Sᵀ (forward) or S (transpose)
            return self._butterfly(t.reshape(rows, fz.L, fz.h), fz.L).reshape(rows, n) * (1.0 / math.sqrt(n))
        parts, start = [], 0
        for size in fz.blocks:
            blk = t[:, start:start + size].reshape(rows, size, 1)
            parts.append(self._butterfly(blk, size).reshape(rows, size) * (1.0 / math.sqrt(size)))
            start += size
        return torch.cat(parts, dim=1)

    def _prep(self, x):
        import torch

        if x.shape[-1] != self.n:
            raise ValueError(f"last axis of shape {tuple(x.shape)} must have length n = {self.n}")
        dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return x.reshape(-1, self.n).to(dt), dt

    def rotate(self, x):
        """Q x along the last axis."""
        t, dt = self._prep(x)
        if self._perm is not None:
            t = t[:, self._perm]
        t = self._K(t * self._sg.to(dt), transpose=False)
        return t.reshape(x.shape).to(x.dtype)

    def unrotate(self, x):
        """Qᵀ x along the last axis."""
        import torch

        t, dt = self._prep(x)
        t = self._K(t, transpose=True) * self._sg.to(dt)
        if self._perm is not None:
            out = torch.empty_like(t)
            out[:, self._perm] = t
            t = out
        return t.reshape(x.shape).to(x.dtype)


def rotate_torch(x, spec: RotationSpec):
    """Q x along the last axis of a torch tensor (any device); builds a TorchHadamard: keep one for repeated calls."""
    return TorchHadamard(spec, x.device).rotate(x)


def unrotate_torch(x, spec: RotationSpec):
    """Qᵀ x along the last axis of a torch tensor."""
    return TorchHadamard(spec, x.device).unrotate(x)
