"""Linear layers at run time: one class per storage kind, each `__call__(x (T, n_in)) -> (T, n_out)` and
`rows(ids) -> W[ids]` (the embedding lookup; a tied output head is the same object called as a linear layer).

    DenseLinear   W (n_out, n_in) float32: raw f32 tensors are zero-copy views of the memory-mapped file.
    EcsqLinear    codec 1 (occrt.codecs.ecsq) kept compact: W = Q_outᵀ (U·V + diag(m) · C · diag(b)) · Q_in with
                      C       codes in a fixed-width form the kernels read directly (occrt.kernels.compact: int4
                              packed, int8 or int16, the narrowest holding the tensor's codes)
                      m       (n_out,) float32 = Δ · a, the step times the row multipliers
                      b       (n_in,) float32 column multipliers, or None
                      U, V    (n_out, r), (r, n_in) float32 structural part, or None (rank 0)
                      Q_in, Q_out   seeded Hadamard rotations (occrt.kernels.hadamard), or None
                  computed as  x_r = Q_in x;  y = Q_outᵀ (m ⊙ C (b ⊙ x_r) + U (V x_r))  -- never building W.
                  Codec 3 (occrt.codecs.tcq) gets the same form: its trellis is walked at load, C = the fine codes.

`FORMS` maps a codec id to the function that builds its runtime form from the tensor's payload; a codec without an
entry is decoded to float32 and held as a DenseLinear (the lossless `planes` codec: its exact values need 32 bits).

Inputs shared by several layers (q/k/v read one activation, gate/up another) are passed as an `Activation`, which
memoizes Q_in·x per rotation spec: the converter gives projections of one input space the same input rotation, so
it is computed once per input space and step.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from occrt.codecs import ans
from occrt.codecs.ecsq import Layout
from occrt.codecs.rotation import RotationSpec
from occrt.errors import FormatError
from occrt.kernels import compact
from occrt.kernels.hadamard import HadamardKernel

# From this many tokens on (a prompt) a call uses the register-blocked kernel (4 rows x 4 tokens) instead of one
# row-dot per row and token (occrt.kernels.compact; on SmolLM2's shapes it is ~2.5x faster from 4 tokens on).
GEMM_MIN_TOKENS = 4
TILE_ELEMENTS = 1 << 17  # floats per dequantized tile of `rows` under an output rotation (512 KB: stays in L2)
# With `parallel_kernels` (occrt.model.loader.load_model), matrices at least this large use the row-parallel decode
# kernel. Off by default: decoding one token is bound by memory bandwidth, which one core nearly saturates, and on
# a 2-core machine shared with other work a parallel region cost 0.1 ms (numba's workqueue) to 8 ms (OpenMP threads
# waiting for a core) against 0.03 ms for a SmolLM2 layer matrix and 1.3 ms for its 28 M-weight head on one core.
PARALLEL_MIN_WEIGHTS = 1 << 22


class Activation:
    """One input x (T, n) float32 read by several linear layers; `rotated(spec, rotate)` memoizes rotate(x) per spec.

    Lives for one forward step (the model makes one per input space); the memoized arrays are read-only by contract.
    """

    def __init__(self, x: Any):
        self.x = x
        self._rotated: dict[RotationSpec, Any] = {}

    def rotated(self, spec: RotationSpec, rotate: Callable[[Any], Any]) -> Any:
        r = self._rotated.get(spec)
        if r is None:
            r = self._rotated[spec] = rotate(self.x)
        return r


def _checked_input(x: np.ndarray, n_in: int) -> np.ndarray:
    """x as the kernels read it, (T, n_in) C-contiguous float32; they do not check bounds, so this does."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"input of shape {x.shape} for a layer of {n_in} inputs")
    return x


def _checked_ids(ids: np.ndarray, n_rows: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        raise IndexError(f"row ids must be in [0, {n_rows}), got {ids.min()}..{ids.max()}")
    return ids


def _input(x: np.ndarray | Activation) -> Activation:
    if isinstance(x, Activation):
        return x
    return Activation(np.ascontiguousarray(x, dtype=np.float32))


class DenseLinear:
    """y = x Wᵀ (+ b) with a float32 weight (n_out, n_in), through the same kernels as the compact forms (float32
    codes, unit row multipliers): one thread per product, whatever BLAS would do with its threads."""

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None):
        self.w = w  # (n_out, n_in) float32
        self.b = b  # (n_out,) or None
        self.n_out, self.n_in = w.shape
        self._ones = np.ones(self.n_out, dtype=np.float32)  # (n_out,) the kernels' row multipliers

    def __call__(self, x: np.ndarray | Activation) -> np.ndarray:
        x = _checked_input(x.x if isinstance(x, Activation) else x, self.n_in)
        y = np.empty((x.shape[0], self.n_out), dtype=np.float32)  # (T, n_out)
        if self.w.flags.c_contiguous:
            (compact.qgemm if x.shape[0] >= GEMM_MIN_TOKENS else compact.qmatmul)(self.w, x, self._ones, y)
        else:
            np.matmul(x, self.w.T, out=y)
        if self.b is not None:
            y += self.b
        return y

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """W[ids] (T, n_in) float32."""
        return np.asarray(self.w[_checked_ids(ids, self.n_out)], dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.b is None else self.b.nbytes)


# (int4?, many tokens?, parallel?) -> kernel
_KERNELS = {(False, False, False): compact.qmatmul, (False, False, True): compact.qmatmul_parallel,
            (False, True, False): compact.qgemm, (False, True, True): compact.qgemm_parallel,
            (True, False, False): compact.qmatmul_i4, (True, False, True): compact.qmatmul_i4_parallel,
            (True, True, False): compact.qgemm_i4, (True, True, True): compact.qgemm_i4_parallel}


class EcsqLinear:
    """The compact runtime form of an ecsq matrix (module docstring). Build with `decode_ecsq`."""

    def __init__(self, *, kind: str, codes: np.ndarray, n_in: int, m: np.ndarray, col: np.ndarray | None = None,
                 u: np.ndarray | None = None, v: np.ndarray | None = None, rot_in: RotationSpec | None = None,
                 rot_out: RotationSpec | None = None, bias: np.ndarray | None = None):
        self.kind = kind  # "int4" | "int8" | "int16" | "int32"
        self.codes = codes  # (n_out, n_in) int8/int16/int32, or (n_out, ceil(n_in/2)) uint8 for int4
        self.n_out, self.n_in = codes.shape[0], n_in
        self.m = m  # (n_out,) float32
        self.col = col  # (n_in,) float32 or None
        self.u, self.v = u, v  # (n_out, r), (r, n_in) float32 or None
        self.rot_in, self.rot_out = rot_in, rot_out
        self._q_in = None if rot_in is None else HadamardKernel(rot_in, parallel=False)
        self._q_out = None if rot_out is None else HadamardKernel(rot_out, parallel=False)
        self.b = bias  # (n_out,) float32 or None
        self.parallel = False  # row-parallel decode kernel (set by the loader for large matrices, on request)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.m, self.col, self.u, self.v, self.b) if a is not None)

    # -- y = W x ------------------------------------------------------------------------------------------------------
    def __call__(self, x: np.ndarray | Activation) -> np.ndarray:
        act = _input(x)
        x_r = act.x if self._q_in is None else act.rotated(self.rot_in, self._rotate_in)  # (T, n_in)
        x_b = x_r if self.col is None else x_r * self.col  # column multipliers folded into the input
        y = self.coded_product(x_b)  # (T, n_out) = (x_b Cᵀ) ⊙ m
        if self.u is not None:
            y += (x_r @ self.v.T) @ self.u.T
        if self._q_out is not None:
            self._q_out.unrotate_(y)
        if self.b is not None:
            y += self.b
        return y

    def _rotate_in(self, x: np.ndarray) -> np.ndarray:
        return self._q_in.rotate_(x.copy())

    def coded_product(self, x: np.ndarray) -> np.ndarray:
        """(x Cᵀ) ⊙ m for x (T, n_in) float32, reading the codes in place (occrt.kernels.compact)."""
        x = _checked_input(x, self.n_in)
        y = np.empty((x.shape[0], self.n_out), dtype=np.float32)
        kernel = _KERNELS[self.kind == "int4", x.shape[0] >= GEMM_MIN_TOKENS, self.parallel]
        if self.kind == "int4":
            kernel(self.codes, self.n_in, x, self.m, y)
        else:
            kernel(self.codes, x, self.m, y)
        return y

    def _tiles(self):
        """(first row, m ⊙ C[rows] float32) for consecutive tiles of rows; one buffer reused for all tiles."""
        step = max(1, TILE_ELEMENTS // max(self.n_in, 1))
        buf = np.empty((min(step, self.n_out), self.n_in), dtype=np.float32)
        for r0 in range(0, self.n_out, step):
            rows = np.arange(r0, min(r0 + step, self.n_out), dtype=np.int64)
            tile = buf[:rows.size]
            self._dequantize(rows, tile)
            yield r0, tile

    def _dequantize(self, rows: np.ndarray, out: np.ndarray) -> None:
        if self.kind == "int4":
            compact.dequantize_rows_i4(self.codes, self.n_in, rows, self.m, out)
        else:
            compact.dequantize_rows(self.codes, rows, self.m, out)

    # -- W[ids] -------------------------------------------------------------------------------------------------------
    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of W (T, n_in) float32, dequantized on lookup (the embedding)."""
        ids = _checked_ids(ids, self.n_out)
        if self._q_out is None:
            w_r = np.empty((ids.size, self.n_in), dtype=np.float32)  # rows of U·V + diag(m)·C·diag(b)
            self._dequantize(ids, w_r)
            if self.col is not None:
                w_r *= self.col
            if self.u is not None:
                w_r += self.u[ids] @ self.v
        else:
            # W[i] = e_iᵀ Q_outᵀ W_r Q_in, and e_iᵀ Q_outᵀ = (Q_out e_i)ᵀ is dense: multiply by all of W_r
            e = np.zeros((ids.size, self.n_out), dtype=np.float32)
            e[np.arange(ids.size), ids] = 1.0
            e = self._q_out.rotate_(e)
            w_r = np.zeros((ids.size, self.n_in), dtype=np.float32)
            for r0, tile in self._tiles():
                w_r += e[:, r0:r0 + tile.shape[0]] @ tile
            if self.col is not None:
                w_r *= self.col
            if self.u is not None:
                w_r += (e @ self.u) @ self.v
        if self._q_in is not None:
            self._q_in.unrotate_(w_r)  # row · Q_in = (Q_inᵀ rowᵀ)ᵀ
        return w_r


# ---- building the forms from a file's payloads --------------------------------------------------------------------
def _f16_part(buf: np.ndarray, part: tuple[int, int] | None) -> np.ndarray | None:
    if part is None:
        return None
    start, n_bytes = part
    return buf[start:start + n_bytes].view("<f2").astype(np.float32)


def decode_ecsq(payload: memoryview, *, shape: tuple[int, ...], params: dict[str, Any], threads: int = 1
                ) -> EcsqLinear:
    """Payload of an ecsq tensor (its index entry validated by the reader) -> EcsqLinear. The codes are decoded
    straight into their compact array (int4 through an int8 scratch of the tensor's size). FormatError offsets are
    relative to the payload."""
    n_out, n_in = shape
    layout = Layout.of(n_out, n_in, params)
    buf = np.frombuffer(payload, dtype=np.uint8)
    block = buf[layout.codes:]
    try:
        info = ans.block_info(block)
        if info["n_symbols"] != n_out * n_in:
            raise FormatError(f"block holds {info['n_symbols']} symbols, the tensor has {n_out * n_in}", 8)
        kind = compact.kind_for(info["min_symbol"], info["max_symbol"]) or "int32"
        if kind == "int4":
            scratch = np.empty((n_out, n_in), dtype=np.int8)
            ans.decode_symbols(block, n_symbols=n_out * n_in, threads=threads, out=scratch.reshape(-1))
            codes = _packed(scratch)
            del scratch
        else:
            codes = np.empty((n_out, n_in), dtype=kind)
            ans.decode_symbols(block, n_symbols=n_out * n_in, threads=threads, out=codes.reshape(-1))
    except FormatError as e:
        raise FormatError(e.reason, None if e.offset is None else layout.codes + e.offset) from None
    return _ecsq_form(buf, layout, kind, codes, shape, params)


def decode_tcq(payload: memoryview, *, shape: tuple[int, ...], params: dict[str, Any], threads: int = 1
               ) -> EcsqLinear:
    """Payload of a tcq tensor (occrt/codecs/tcq.py) -> EcsqLinear: the trellis is walked once at load, so the
    runtime form is exactly ecsq's, its codes the fine codes K and its step δ."""
    from occrt.codecs.tcq import TCQ

    n_out, n_in = shape
    layout = Layout.of(n_out, n_in, params)
    buf = np.frombuffer(payload, dtype=np.uint8)
    k = TCQ.fine_codes(buf, layout, (n_out, n_in), params, threads=threads)  # (n_out, n_in) int64
    kind = compact.kind_for(int(k.min(initial=0)), int(k.max(initial=0))) or "int32"
    codes = _packed(k.astype(np.int8)) if kind == "int4" else k.astype(kind)
    del k
    return _ecsq_form(buf, layout, kind, codes, shape, params)


def _packed(codes_i8: np.ndarray) -> np.ndarray:
    n_out, n_in = codes_i8.shape
    packed = np.empty((n_out, compact.n_packed(n_in)), dtype=np.uint8)
    compact.pack_int4(codes_i8, packed)
    return packed


def _ecsq_form(buf: np.ndarray, layout: Layout, kind: str, codes: np.ndarray, shape: tuple[int, ...],
               params: dict[str, Any]) -> EcsqLinear:
    n_out, n_in = shape
    step = np.float32(params["step"])
    a = _f16_part(buf, layout.row_scales)
    m = np.full(n_out, step, dtype=np.float32) if a is None else (a * step).astype(np.float32)
    r = params["rank"]
    u = v = None
    if r:
        u = _f16_part(buf, layout.u).reshape(n_out, r)
        v = _f16_part(buf, layout.v).reshape(r, n_in)
    spec = {k: None if params[k] is None else RotationSpec.from_json(params[k]) for k in ("rot_in", "rot_out")}
    return EcsqLinear(kind=kind, codes=codes, n_in=n_in, m=m, col=_f16_part(buf, layout.col_scales), u=u, v=v,
                      rot_in=spec["rot_in"], rot_out=spec["rot_out"])


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# codec id -> (payload, shape=, params=, threads=) -> runtime form. Codecs not listed decode to a DenseLinear.
FORMS: dict[int, Callable[..., Any]] = {
    1: decode_ecsq,
    3: decode_tcq,
}
