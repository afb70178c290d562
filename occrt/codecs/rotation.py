"""Seeded randomized Hadamard rotations: the orthogonal maps occrt stores weights in, kept as (construction, seed, n).

A rotation is never stored as a matrix. A caller stores `RotationSpec(construction, seed, n)` (three integers) and
every reader rebuilds the same orthogonal Q from them (format_spec/rotations.md is the normative description; this
module is its reference implementation):

    Q = K · P · D                         (n, n), orthogonal: Q Qᵀ = I
    D = diag(d),  d_i ∈ {+1, -1}          signs drawn from SplitMix64 stream (seed, n, STREAM_SIGNS)
    P: (P v)_i = v[perm[i]]               a gather; construction 1: perm = identity, construction 2: Fisher–Yates
                                          shuffle drawn from stream (seed, n, STREAM_PERM)
    K = (H_L ⊗ S_h) / √n                  when n = L · h, L = 2^a, S_h a small Hadamard matrix (Paley I/II, or [1])
    K = diag(H_{2^k1}/√2^k1, ...)         the fallback when no S_h of order <= H_MAX fits: Sylvester blocks over the
                                          binary digits of n, largest first (still orthogonal, mixes less)

Why these pieces. Signs D make the rotation random (QuIP#, QuaRot: a random sign flip before a Hadamard spreads any
fixed vector's energy over all coordinates with high probability, so outliers shrink to ~ ‖x‖₂ √(2 log n / n)).
The Hadamard part is what makes Q cheap: H_L is a butterfly (L log L additions) and S_h a small dense matmul, so the
runtime can rotate activations per token. Sylvester alone only covers powers of two; real models have n = 576, 896,
4864, 11008 ..., so the odd part of n comes from a Paley matrix over GF(q) with q a prime power (q = 27, 343 need the
extension fields GF(p^k), built here from the lexicographically smallest monic irreducible polynomial).

Factorization rule (`factorize`): n = 2^e · m, m odd. m = 1: h = 1. Otherwise the smallest h = 2^j · m (2 <= j <= e,
h <= H_MAX) for which Paley I (q = h - 1 a prime power, q ≡ 3 mod 4) or, failing that, Paley II (q = h/2 - 1 a prime
power, q ≡ 1 mod 4) exists; none: the block fallback. The rule is part of construction 1 and 2: changing it (or
H_MAX) needs a new construction id, because it changes Q.

Everything here is numpy only. `rotate`/`unrotate` are the reference the numba (occrt.kernels.hadamard) and torch
kernels are tested against. Plans are memoized per spec (`plan`): a plan is a pure function of its spec, immutable
(arrays are read-only), so the memo changes speed, never results.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from occrt.errors import FormatError

# Construction ids: stable, never reused. A retired id keeps its line here, commented as retired.
CONSTRUCTIONS: dict[int, str] = {
    # 0 is reserved: a zeroed field must not read as a valid rotation.
    1: "rht1: signs, Kronecker(Sylvester, Paley) with the v1 factorization rule (Q = K·D)",
    2: "rht1p: as 1, plus a Fisher–Yates permutation between signs and Hadamard (Q = K·P·D)",
}
H_MAX = 1024  # largest small Hadamard order used densely: its cost is h multiply-adds per element and per token
N_MAX = 1 << 24  # largest n a spec may name (same bound as model.config dimensions)
SEED_LIMIT = 1 << 53  # seeds are in [0, 2^53): every JSON parser reads such an integer exactly

STREAM_SIGNS = 1  # stream label of the sign draw
STREAM_PERM = 2  # stream label of the Fisher–Yates draws

_U64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)
_M1 = 0xBF58476D1CE4E5B9  # SplitMix64's finalizer multipliers (Stafford's Mix13, as in Vigna's splitmix64.c)
_M2 = 0x94D049BB133111EB


# ----------------------------------------------------------------------------------------------------------------------
# PRNG: SplitMix64 on u64 (Python ints here, one value at a time; numpy uint64 for whole streams).

def mix64(z: int) -> int:
    """SplitMix64's output function: a bijection on u64."""
    z &= _U64
    z = ((z ^ (z >> 30)) * _M1) & _U64
    z = ((z ^ (z >> 27)) * _M2) & _U64
    return z ^ (z >> 31)


def absorb(h: int, v: int) -> int:
    """One step of the key derivation: h' = mix64(((h XOR v) + GAMMA) mod 2^64)."""
    return mix64(((h ^ v) + GAMMA) & _U64)


def stream_state(seed: int, n: int, stream: int) -> int:
    """The initial SplitMix64 state of stream `stream` for a rotation of size n: absorb seed, n, stream from 0."""
    return absorb(absorb(absorb(0, seed), n), stream)


def splitmix64(state: int, count: int) -> np.ndarray:
    """The first `count` outputs of SplitMix64 from `state`: out_i = mix64(state + (i+1)·GAMMA mod 2^64).

    Returns (count,) uint64. Vectorized: SplitMix64's state is a counter, so output i needs no earlier output.
    """
    i = np.arange(1, count + 1, dtype=np.uint64)  # (count,)
    z = np.uint64(state & _U64) + i * np.uint64(GAMMA)  # wraps mod 2^64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def derive_seed(seed: int, *labels: int) -> int:
    """A child seed for a caller's sub-role, e.g. derive_seed(model_seed, layer, side): in [0, 2^53).

    h = absorb(0, seed), then h = absorb(h, label) for each label (at least one; all in [0, 2^64)); result h >> 11,
    the same fold as `stream_state`. Q never uses it; it is a convenience with a fixed definition
    (format_spec/rotations.md) so that a file recording only one model seed still names every rotation reproducibly.
    """
    if not labels:
        raise ValueError("derive_seed needs at least one label")
    for v in (seed, *labels):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U64:
            raise ValueError(f"seed and labels must be integers in [0, 2^64), got {v!r}")
    h = absorb(0, seed)
    for v in labels:
        h = absorb(h, v)
    return h >> 11


def draw_signs(seed: int, n: int) -> np.ndarray:
    """d (n,) int8: d_i = +1 when the top bit of output i of stream (seed, n, STREAM_SIGNS) is 0, else -1."""
    top = splitmix64(stream_state(seed, n, STREAM_SIGNS), n) >> np.uint64(63)  # (n,) 0 or 1
    return (1 - 2 * top.astype(np.int8)).astype(np.int8)


def draw_permutation(seed: int, n: int) -> np.ndarray:
    """perm (n,) int64: Fisher–Yates from the identity, i = n-1 down to 1, j = floor(u · (i+1) / 2^64), swap.

    u is the next output of stream (seed, n, STREAM_PERM): draw t (t = 0, 1, ...) serves i = n-1-t. The multiply-high
    bound (Lemire, without rejection) is exact and has bias below n / 2^64: irrelevant here, and simple to reimplement.
    """
    perm = np.arange(n, dtype=np.int64)
    if n < 2:
        return perm
    u = splitmix64(stream_state(seed, n, STREAM_PERM), n - 1)  # (n-1,)
    m = np.arange(n, 1, -1, dtype=np.uint64)  # (n-1,) the bound i+1 for draw t
    # floor(u·m / 2^64) in uint64: u = hi·2^32 + lo, so u·m / 2^64 = (hi·m + (lo·m >> 32)) / 2^32 exactly (m < 2^32).
    hi, lo = u >> np.uint64(32), u & np.uint64(0xFFFFFFFF)
    j = ((hi * m + ((lo * m) >> np.uint64(32))) >> np.uint64(32)).astype(np.int64)
    p = perm.tolist()
    for t, jt in enumerate(j.tolist()):
        i = n - 1 - t
        p[i], p[jt] = p[jt], p[i]
    return np.array(p, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Finite fields GF(p^k) and their quadratic character. An element is labelled by the integer Σ c_i p^i of its
# coefficients in the basis 1, x, ..., x^(k-1) of GF(p)[x]/(f); addition is digit-wise mod p.

def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k >= 1; None when q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists lowest degree first, f monic."""
    a = list(a)
    d = len(f) - 1
    for top in range(len(a) - 1, d - 1, -1):
        c = a[top] % p
        if c:
            for i in range(d + 1):
                a[top - d + i] = (a[top - d + i] - c * f[i]) % p
    return [c % p for c in a[:d]]


def irreducible_poly(p: int, k: int) -> tuple[int, ...]:
    """The lexicographically smallest monic irreducible f = x^k + a_(k-1) x^(k-1) + ... + a_0 over GF(p).

    Returns (a_0, ..., a_(k-1), 1). Candidates are tried by increasing r = Σ a_i p^i (so a_(k-1) is the most
    significant: lexicographic order on (a_(k-1), ..., a_0)); f is irreducible when no monic polynomial of degree
    1..k/2 divides it. For k = 1 this is f = x, and GF(p) is the integers mod p.
    """
    for r in range(p ** k):
        f = [(r // p ** i) % p for i in range(k)] + [1]
        if all(any(_poly_mod(f, [(s // p ** i) % p for i in range(d)] + [1], p))
               for d in range(1, k // 2 + 1) for s in range(p ** d)):
            return tuple(f)
    raise AssertionError("an irreducible polynomial exists for every degree")


def quadratic_character(p: int, k: int) -> np.ndarray:
    """χ (q,) int8 over labels of GF(p^k), p odd: χ(0) = 0, χ(a) = +1 if a = y² for some y ≠ 0, else -1."""
    q = p ** k
    f = irreducible_poly(p, k)
    y = np.arange(1, q, dtype=np.int64)
    digits = np.stack([(y // p ** i) % p for i in range(k)], axis=1)  # (q-1, k) coefficients of each nonzero y
    sq = np.zeros((q - 1, 2 * k - 1), dtype=np.int64)  # (q-1, 2k-1) y² before reduction
    for i in range(k):
        for j in range(k):
            sq[:, i + j] += digits[:, i] * digits[:, j]
    for top in range(2 * k - 2, k - 1, -1):  # reduce x^top with x^k = -(a_0 + ... + a_(k-1) x^(k-1))
        c = sq[:, top] % p
        for i in range(k):
            sq[:, top - k + i] -= c * f[i]
        sq[:, top] = 0
    labels = ((sq[:, :k] % p) * (p ** np.arange(k, dtype=np.int64))).sum(axis=1)  # (q-1,)
    chi = np.full(q, -1, dtype=np.int8)
    chi[0] = 0
    chi[labels] = 1
    return chi


def jacobsthal(q: int) -> np.ndarray:
    """J (q, q) int8 with J[a, b] = χ(a - b), a and b field labels (subtraction digit-wise mod p)."""
    pk = prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"{q} is not an odd prime power")
    p, k = pk
    chi = quadratic_character(p, k)
    a = np.arange(q, dtype=np.int64)
    diff = np.zeros((q, q), dtype=np.int64)  # (q, q) label of a - b
    for i in range(k):
        da = (a // p ** i) % p
        diff += ((da[:, None] - da[None, :]) % p) * p ** i
    return chi[diff]


# ----------------------------------------------------------------------------------------------------------------------
# Hadamard matrices (int8, entries ±1, H Hᵀ = order · I), all built at run time.

def sylvester(L: int) -> np.ndarray:
    """H_L (L, L) int8, L a power of two: H[i, j] = (-1)^popcount(i AND j) (H_2L = [[H_L, H_L], [H_L, -H_L]])."""
    if L < 1 or L & (L - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {L}")
    i = np.arange(L, dtype=np.int64)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).astype(np.int8)


def paley1(q: int) -> np.ndarray:
    """Paley I, q ≡ 3 (mod 4): H (q+1, q+1) = I + [[0, 1ᵀ], [-1, J]]; row/column 0 is ∞, 1 + a is field label a."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 mod 4, got {q}")
    H = np.zeros((q + 1, q + 1), dtype=np.int8)
    H[0, 1:] = 1
    H[1:, 0] = -1
    H[1:, 1:] = jacobsthal(q)
    H[np.arange(q + 1), np.arange(q + 1)] += 1
    return H


def paley2(q: int) -> np.ndarray:
    """Paley II, q ≡ 1 (mod 4): H (2(q+1), 2(q+1)) = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]].

    C = [[0, 1ᵀ], [1, J]] is the symmetric conference matrix (index 0 is ∞, 1 + a is field label a); row 2i + s of
    H belongs to C's row i (Kronecker order, C outer).
    """
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 mod 4, got {q}")
    C = np.zeros((q + 1, q + 1), dtype=np.int8)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = jacobsthal(q)
    H = np.kron(C, np.array([[1, 1], [1, -1]], dtype=np.int8)) + \
        np.kron(np.eye(q + 1, dtype=np.int8), np.array([[1, -1], [-1, -1]], dtype=np.int8))
    return H.astype(np.int8)


def small_hadamard_kind(h: int) -> tuple[str, int] | None:
    """How the v1 rule builds order h: ("one", 1) for h = 1, ("paley1", q) or ("paley2", q); None if it cannot.

    Paley I is preferred when both apply (e.g. h = 20: q = 19, not Paley II over GF(9)).
    """
    if h == 1:
        return ("one", 1)
    if h % 4:
        return None
    pk = prime_power(h - 1)
    if pk is not None and (h - 1) % 4 == 3:
        return ("paley1", h - 1)
    pk = prime_power(h // 2 - 1)
    if pk is not None and (h // 2 - 1) % 4 == 1:
        return ("paley2", h // 2 - 1)
    return None


@functools.lru_cache(maxsize=64)
def small_hadamard(h: int) -> np.ndarray:
    """S_h (h, h) int8 as the v1 rule builds it (read-only; memoized: pure function of h)."""
    kind = small_hadamard_kind(h)
    if kind is None:
        raise ValueError(f"no v1 construction for a Hadamard matrix of order {h}")
    name, q = kind
    S = np.ones((1, 1), dtype=np.int8) if name == "one" else paley1(q) if name == "paley1" else paley2(q)
    S.setflags(write=False)
    return S


@dataclass(frozen=True)
class Factorization:
    """K's shape for a given n: full (n = L · h, K = H_L ⊗ S_h / √n) or the block fallback."""

    n: int
    L: int  # power of two: the butterfly part (full case)
    h: int  # order of the small Hadamard S_h (1: none); 0 in the fallback
    kind: str  # "sylvester" (h = 1), "paley1", "paley2", or "blocks" (fallback)
    q: int  # the field size of a Paley construction, else 0
    blocks: tuple[int, ...]  # fallback: Sylvester block sizes, largest first (binary digits of n); full: (n,)

    @property
    def full(self) -> bool:
        """True when every output coordinate mixes all n inputs (a true n × n Hadamard)."""
        return self.kind != "blocks"

    @property
    def mixing_width(self) -> int:
        """The fewest inputs any output coordinate mixes: n when full, the smallest block otherwise."""
        return min(self.blocks)


@functools.lru_cache(maxsize=1024)
def factorize(n: int) -> Factorization:
    """The v1 factorization rule (module docstring; format_spec/rotations.md, "Factorization")."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= N_MAX:
        raise ValueError(f"n must be an integer in [1, {N_MAX}], got {n!r}")
    e = (n & -n).bit_length() - 1
    m = n >> e
    if m == 1:
        return Factorization(n, n, 1, "sylvester", 0, (n,))
    for j in range(2, e + 1):
        h = m << j
        if h > H_MAX:
            break
        kind = small_hadamard_kind(h)
        if kind is not None:
            return Factorization(n, n // h, h, kind[0], kind[1], (n,))
    blocks = tuple(1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1)
    return Factorization(n, 0, 0, "blocks", 0, blocks)


def hadamard_matrix(n: int) -> np.ndarray:
    """H_n = H_L ⊗ S_h (n, n) int8 for an n with a full construction (tests and checksums; O(n²) memory)."""
    fz = factorize(n)
    if not fz.full:
        raise ValueError(f"n = {n} has no full Hadamard construction (fallback blocks {fz.blocks})")
    return np.kron(sylvester(fz.L), small_hadamard(fz.h)).astype(np.int8)


# ----------------------------------------------------------------------------------------------------------------------
# What a caller stores, and the plan built from it.

def _as_int(name: str, v: Any, lo: int, hi: int) -> int:
    """v as a Python int in [lo, hi); numpy integers are accepted, bools and floats are not."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not lo <= v < hi:
        raise ValueError(f"rotation {name} must be an integer in [{lo}, {hi}), got {v!r:.40}")
    return int(v)


@dataclass(frozen=True)
class RotationSpec:
    """Everything that defines Q: construction id, seed in [0, 2^53), dimension n in [1, 2^24]."""

    construction: int
    seed: int
    n: int

    def __post_init__(self) -> None:
        for name, lo, hi in (("construction", 0, 1 << 31), ("seed", 0, SEED_LIMIT), ("n", 1, N_MAX + 1)):
            object.__setattr__(self, name, _as_int(name, getattr(self, name), lo, hi))
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(f"unknown rotation construction {self.construction}; known: {sorted(CONSTRUCTIONS)}")

    def to_json(self) -> dict[str, int]:
        return {"construction": self.construction, "seed": self.seed, "n": self.n}

    @classmethod
    def from_json(cls, d: Any) -> "RotationSpec":
        """Validate a parsed JSON object; FormatError on a missing, extra or out-of-range key."""
        keys = {"construction", "seed", "n"}
        if not isinstance(d, dict):
            raise FormatError(f"rotation spec must be an object, got {type(d).__name__}")
        if set(d) != keys:
            raise FormatError(f"rotation spec keys must be {sorted(keys)}, got {sorted(map(str, d))}")
        try:
            return cls(construction=d["construction"], seed=d["seed"], n=d["n"])
        except ValueError as e:
            raise FormatError(str(e)) from None


@dataclass(frozen=True, eq=False)
class RotationPlan:
    """The arrays that apply Q = K · P · D (all read-only). Build with `plan(spec)`."""

    spec: RotationSpec
    fz: Factorization
    signs: np.ndarray  # (n,) int8 d
    perm: np.ndarray | None  # (n,) int64 gather index of P; None for construction 1 (identity)
    S: np.ndarray  # (h, h) int8 small Hadamard; (1, 1) [[1]] when h <= 1

    @property
    def full(self) -> bool:
        return self.fz.full

    @property
    def mixing_width(self) -> int:
        return self.fz.mixing_width


@functools.lru_cache(maxsize=256)
def plan(spec: RotationSpec) -> RotationPlan:
    """Build (and memoize) the arrays for `spec`."""
    fz = factorize(spec.n)
    signs = draw_signs(spec.seed, spec.n)
    perm = draw_permutation(spec.seed, spec.n) if spec.construction == 2 else None
    S = small_hadamard(fz.h) if fz.h > 1 else np.ones((1, 1), dtype=np.int8)
    for a in (signs, perm):
        if a is not None:
            a.setflags(write=False)
    return RotationPlan(spec, fz, signs, perm, S)


# ----------------------------------------------------------------------------------------------------------------------
# numpy reference: apply Q or Qᵀ along one axis. x is viewed as (pre, n, post) so no transpose is needed.

def _compute_dtype(x: np.ndarray) -> np.dtype:
    return np.result_type(x.dtype, np.float32)


_DENSE_BELOW = 512  # butterfly stages whose contiguous run (half · inner) is shorter than this are merged ...
_DENSE_MAX_BITS = 6  # ... into one dense Sylvester matmul of order at most 2^6


def _butterfly(t: np.ndarray, L: int) -> np.ndarray:
    """H_L along axis 1 of t (pre, L, inner); t may be overwritten.

    Sylvester as log2(L) stages of (a, b) -> (a + b, a - b) on reshaped views. numpy pays per contiguous run, so the
    first stages, whose runs are short, are done at once as a dense H_(2^c) matmul instead (H_L = H_(L/2^c) ⊗ H_(2^c)
    exactly: the same map, different rounding order).
    """
    pre, _, inner = t.shape
    c = 0
    while c < _DENSE_MAX_BITS and (1 << c) < L and (inner << c) < _DENSE_BELOW:
        c += 1
    if c > 0:
        Hc = sylvester(1 << c).astype(t.dtype)  # (2^c, 2^c)
        t = np.matmul(Hc, t.reshape(pre * (L >> c), 1 << c, inner)).reshape(pre, L, inner)
    out = np.empty_like(t)
    half = 1 << c
    while half < L:
        v = t.reshape(pre, L // (2 * half), 2, half * inner)
        w = out.reshape(pre, L // (2 * half), 2, half * inner)
        np.add(v[:, :, 0], v[:, :, 1], out=w[:, :, 0])
        np.subtract(v[:, :, 0], v[:, :, 1], out=w[:, :, 1])
        t, out = out, t
        half *= 2
    return t


def _times_along_n(t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """t (pre, n, post) times v (n,) along axis 1, in place; a 2-D view when post = 1 keeps numpy's loops long."""
    pre, n, post = t.shape
    if post == 1 and t.flags.c_contiguous:
        flat = t.reshape(pre, n)  # a view, since t is contiguous
        flat *= v
    else:
        t *= v[:, None]
    return t


def _apply_K(t: np.ndarray, pl: RotationPlan, transpose: bool) -> np.ndarray:
    """K (or Kᵀ) along axis 1 of t (pre, n, post); t may be overwritten."""
    pre, n, post = t.shape
    fz = pl.fz
    if fz.full:
        h = fz.h
        if h > 1:
            S = pl.S.astype(t.dtype)  # (h, h)
            if transpose:
                S = S.T
            u = t.reshape(pre * fz.L, h, post)
            t = (S @ u) if post > 1 else (u[:, :, 0] @ S.T)[:, :, None]  # (pre·L, h, post)
        t = _butterfly(t.reshape(pre, fz.L, h * post), fz.L).reshape(pre, n, post)
        t *= t.dtype.type(1.0 / math.sqrt(n))
        return t
    start = 0
    for size in fz.blocks:  # K is symmetric block by block: the transpose is the same map
        blk = _butterfly(np.ascontiguousarray(t[:, start:start + size]).reshape(pre, size, post), size)
        t[:, start:start + size] = blk * blk.dtype.type(1.0 / math.sqrt(size))
        start += size
    return t


def _as_pre_n_post(x: np.ndarray, axis: int, n: int) -> tuple[np.ndarray, int]:
    x = np.asarray(x)
    axis = axis % x.ndim if x.ndim else 0
    if x.ndim == 0 or x.shape[axis] != n:
        raise ValueError(f"axis {axis} of shape {x.shape} must have length n = {n}")
    pre = math.prod(x.shape[:axis])
    post = math.prod(x.shape[axis + 1:])
    return x.reshape(pre, n, post), axis


def rotate(x: np.ndarray, spec: RotationSpec, axis: int = -1) -> np.ndarray:
    """Q x along `axis` (y_i = Σ_j Q[i, j] x_j). Float32 stays float32, float64 stays float64, others go to float32."""
    pl = plan(spec)
    shape = np.shape(x)
    t, _ = _as_pre_n_post(x, axis, spec.n)  # (pre, n, post)
    dt = _compute_dtype(t)
    if pl.perm is None:
        t = _times_along_n(t.astype(dt, copy=True), pl.signs.astype(dt))  # D x (x itself is never modified)
    else:  # P D x: (P D x)_i = d[perm[i]] · x[perm[i]]
        t = _times_along_n(np.take(t, pl.perm, axis=1).astype(dt, copy=False), pl.signs[pl.perm].astype(dt))
    return _apply_K(t, pl, transpose=False).reshape(shape)


def unrotate(y: np.ndarray, spec: RotationSpec, axis: int = -1) -> np.ndarray:
    """Qᵀ y along `axis` = D Pᵀ Kᵀ y: the inverse of `rotate`."""
    pl = plan(spec)
    shape = np.shape(y)
    t, _ = _as_pre_n_post(y, axis, spec.n)  # (pre, n, post)
    dt = _compute_dtype(t)
    t = _apply_K(t.astype(dt, copy=True), pl, transpose=True)
    if pl.perm is None:
        return _times_along_n(t, pl.signs.astype(dt)).reshape(shape)
    # D Pᵀ v: (Pᵀ v)[perm[i]] = v[i], so out[perm[i]] = d[perm[i]] · v[i].
    t = _times_along_n(t, pl.signs[pl.perm].astype(dt))
    out = np.empty_like(t)
    out[:, pl.perm] = t
    return out.reshape(shape)


def matrix(spec: RotationSpec) -> np.ndarray:
    """Q (n, n) float64, built from its factors directly (tests only: O(n²) memory)."""
    pl = plan(spec)
    n = spec.n
    fz = pl.fz
    if fz.full:
        K = hadamard_matrix(n) / math.sqrt(n)
    else:
        K = np.zeros((n, n))
        start = 0
        for size in fz.blocks:
            K[start:start + size, start:start + size] = sylvester(size) / math.sqrt(size)
            start += size
    # (K P D)[:, j] = K[:, i] · d[j] where perm[i] = j, i.e. column j of K P is column perm⁻¹(j) of K.
    KP = K if pl.perm is None else K[:, np.argsort(pl.perm)]
    return KP * pl.signs[None, :].astype(np.float64)
