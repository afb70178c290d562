"""Rounding with error feedback (GPTQ / LDLQ) inside the entropy-coded scalar quantizer.

Plain rounding makes each code the nearest integer to its residual, independently. When the layer's inputs x are
correlated, the output error ‖(W − Ŵ)x‖² is what matters: its expectation is tr(E H Eᵀ) with H = E[x xᵀ]. GPTQ
(Frantar et al. 2022; LDLQ in QuIP, Chee et al. 2023) rounds the columns in order and pushes each column's rounding
error onto the columns not yet rounded, along the directions H says are correlated:

    U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), H damped by `damp`·mean(diag H)·I
    for j in 0..n-1:   c_j = rint(w_j / Δ);   e = (w_j − Δ c_j) / U_jj;   w_k −= e · U_jk  for k > j

The rows are independent given U, so the kernel runs them in parallel. With an unbounded alphabet there is no
clipping: the step Δ alone sets the rate, which the rate control chose; the codes' entropy moves little.

With the trellis quantizer (codec 3, occrt/codecs/tcq.py) the trellis runs down each column (over the rows), and
the loss of column j's choices, Σ_i (w_ij − δ k_ij)² / U_jj², is a sum over rows: the Viterbi path down column j is
exactly the best joint choice for it, after which its errors are fed forward as above. So the columns are taken in
order, each with one Viterbi pass over the rows and one update of the columns after it (`tcq_error_feedback`).

`ecsq_error_feedback_reference` and `tcq_error_feedback_reference` are the plain numpy versions the numba kernels
are tested against.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from occrt.codecs.tcq import viterbi_column


def cholesky_inverse_upper(h: np.ndarray, *, damp: float) -> np.ndarray:
    """U with H⁻¹ = UᵀU for the damped H; inputs that never fire (zero diagonal) get a unit diagonal."""
    h = np.array(h, dtype=np.float64)
    n = h.shape[0]
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    mean = float(diag[~dead].mean()) if (~dead).any() else 1.0
    h[np.diag_indices(n)] = np.where(dead, mean, diag) + damp * mean
    # Without forming H⁻¹: with J the order reversal, chol(J H J) = L gives H = M Mᵀ for the upper M = J L J, so
    # H⁻¹ = (M⁻¹)ᵀ M⁻¹ and U = M⁻¹ = J L⁻¹ J (one Cholesky factorization and one triangular solve, in torch, which
    # conversion with calibration has loaded and which uses every core).
    import torch

    lower = torch.linalg.cholesky(torch.from_numpy(np.ascontiguousarray(h[::-1, ::-1])))
    inverse = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    return np.ascontiguousarray(inverse.numpy()[::-1, ::-1])


@njit(parallel=True, cache=True)
def _feedback(w, u, inv_step, step, codes):  # pragma: no cover (jit; tested against the reference)
    n_out, n = w.shape
    for i in prange(n_out):
        row = w[i].copy()
        for j in range(n):
            c = np.rint(row[j] * inv_step)
            codes[i, j] = np.int32(c)
            e = (row[j] - c * step) / u[j, j]
            for k in range(j + 1, n):
                row[k] -= e * u[j, k]


def ecsq_error_feedback(residual: np.ndarray, u: np.ndarray, step: float) -> np.ndarray:
    """Codes (n_out, n_in) int32 for `residual` (already in the coding frame, divided by the step multipliers)."""
    w = np.ascontiguousarray(residual, dtype=np.float64)
    codes = np.empty(w.shape, dtype=np.int32)
    _feedback(w, np.ascontiguousarray(u, dtype=np.float64), 1.0 / step, float(step), codes)
    return codes


def ecsq_error_feedback_reference(residual: np.ndarray, u: np.ndarray, step: float) -> np.ndarray:
    w = np.array(residual, dtype=np.float64)
    codes = np.empty(w.shape, dtype=np.int32)
    for j in range(w.shape[1]):
        c = np.rint(w[:, j] * (1.0 / step))
        codes[:, j] = c.astype(np.int32)
        e = (w[:, j] - c * step) / u[j, j]
        w[:, j + 1:] -= np.outer(e, u[j, j + 1:])
    return codes


@njit(parallel=True, cache=True)
def _tcq_feedback_block(w, u, b0, step, parity, codes, err):  # pragma: no cover (jit; tested against the reference)
    """Columns b0 .. b0 + B of the whole problem, held in w (n_out, B): each column's Viterbi path, its errors
    (divided by U_jj) into err (n_out, B) and fed forward to the block's later columns."""
    n_out, width = w.shape
    col = np.empty(n_out)
    k = np.empty(n_out, np.int32)
    for j in range(width):
        for i in range(n_out):
            col[i] = w[i, j]
        viterbi_column(col, step, parity, k)
        d = u[b0 + j, b0 + j]
        for i in range(n_out):
            codes[i, b0 + j] = k[i]
            err[i, j] = (col[i] - k[i] * step) / d
        for i in prange(n_out):
            ei = err[i, j]
            for q in range(j + 1, width):
                w[i, q] -= ei * u[b0 + j, b0 + q]


TCQ_BLOCK = 64  # columns per block: the block's feedback in cache, the rest of the matrix updated once per block


def tcq_error_feedback(residual: np.ndarray, u: np.ndarray, step: float, parity: np.ndarray) -> np.ndarray:
    """Fine codes (n_out, n_in) int32 on the trellis of `parity` for `residual` (in the coding frame, divided by
    the step multipliers), fine step δ = `step`, rounding errors fed forward under U (`cholesky_inverse_upper`).
    GPTQ's lazy batches: within a block of TCQ_BLOCK columns each column's errors reach the next at once; the
    columns after the block get the block's errors in one product, W[:, after] −= E · U[block, after]."""
    w = np.array(residual, dtype=np.float64)  # a copy: updated in place
    u = np.ascontiguousarray(u, dtype=np.float64)
    n_out, n = w.shape
    codes = np.empty(w.shape, dtype=np.int32)
    for b0 in range(0, n, TCQ_BLOCK):
        b1 = min(b0 + TCQ_BLOCK, n)
        block = np.ascontiguousarray(w[:, b0:b1])  # (n_out, B)
        err = np.empty(block.shape)
        _tcq_feedback_block(block, u, b0, float(step), parity, codes, err)
        if b1 < n:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def tcq_error_feedback_reference(residual: np.ndarray, u: np.ndarray, step: float, parity: np.ndarray
                                 ) -> np.ndarray:
    w = np.array(residual, dtype=np.float64)
    codes = np.empty(w.shape, dtype=np.int32)
    for j in range(w.shape[1]):
        k = np.empty(w.shape[0], np.int32)
        viterbi_column.py_func(w[:, j].copy(), step, parity, k)
        codes[:, j] = k
        e = (w[:, j] - k * step) / u[j, j]
        w[:, j + 1:] -= np.outer(e, u[j, j + 1:])
    return codes
