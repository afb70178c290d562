"""Rate control: choose each tensor's coordinates, rank and step so the file meets a bits-per-weight target.

Every tensor t offers candidates c (a coding frame: rotation on/off, rank r) and steps Δ on a log grid. For each pair
we estimate the record's size R_t(c, Δ) in bits -- codes (ANS, from the code histogram), side data (scales, factors),
the entropy table, chunk index and the params JSON -- and its distortion D_t(c, Δ) = importance_t · Σ (W - Ŵ)².
The allocation minimizes Σ D subject to Σ R ≤ budget by the equal-slope (Lagrangian) rule: for a multiplier λ
each tensor takes the pair minimizing D + λ·R, and λ is found by bisection so the total meets the budget. With
plain MSE this gives every tensor the same step (reverse water-filling); importance weights scale the steps by
1/√importance.

Curves are measured on a fixed random subset of each tensor's entries (at most `sample` of them), scaled to the
full count; the side data is exact. Memory stays at one tensor's coding frame at a time plus the small curves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from occrt.codecs import ans
from occrt.codecs.ecsq import CodingFrame
from occrt.format.writer import canonical_json

# relative steps Δ / rms(residual): 2^(k/8) for k in this range -- from 1/64 of the rms (~8 bits a weight for a
# Gaussian) up to 2 rms (~0.6 bit); `step_exponents` reaches finer steps for targets above 5 bits
STEP_EXPONENTS = np.arange(-48, 9)
STEP_RESOLUTION = 8.0
# how far below its target the achieved size may fall when even the finest steps cannot spend the budget
SHORTFALL_TOLERANCE = 0.02


def step_exponents(bpw: float) -> np.ndarray:
    """The step grid (exponents of 2^(1/8) times the rms) for a target of `bpw` bits per weight: `STEP_EXPONENTS`
    up to 5 bits and, above that, one octave finer per bit more, so the finest step (Δ = rms · 2^-(⌈bpw⌉+1), about
    ⌈bpw⌉ + 3 bits a weight for a Gaussian) stays past the target. Before it the grid stopped at 1/64 of the rms
    whatever the target, and `--bpw 8.5` gave 8.08 bits per weight on SmolLM2."""
    finest = int(STEP_RESOLUTION) * max(6, math.ceil(bpw) + 1)
    return np.arange(-finest, int(STEP_EXPONENTS[-1]) + 1)


@dataclass
class Candidate:
    """One way to code a tensor, with its rate-distortion curve over the step grid."""

    options: dict[str, Any]  # what to pass to the frame builder (rank, rotations, scales)
    steps: np.ndarray  # (K,)
    bits: np.ndarray  # (K,) estimated record size, bits
    distortion: np.ndarray  # (K,) importance-weighted squared error


@dataclass
class TensorCurves:
    name: str
    n_params: int
    importance: float
    candidates: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    candidate: int
    step_index: int
    bits: float
    distortion: float


def sample_positions(n: int, k: int, seed: int) -> np.ndarray:
    """k distinct positions in [0, n), ascending, every k-subset equally likely. Memory: n bytes of flags (numpy's
    `choice(n, k, replace=False)` shuffles an n-long int64 array when k > n / 50: twice a float32 tensor's size).
    Uniform draws with replacement; repeats are drawn again (each new distinct position is uniform over those not
    yet taken, as in drawing without replacement)."""
    rng = np.random.default_rng(seed)
    taken = np.zeros(n, dtype=bool)
    count = 0
    while count < k:
        taken[rng.integers(0, n, size=k - count)] = True
        count = int(np.count_nonzero(taken))
    return np.flatnonzero(taken)


def measure(name: str, frame: CodingFrame, options: dict[str, Any], *, importance: float = 1.0,
            sample: int = 1 << 17, chunk_size: int = ans.DEFAULT_CHUNK_SIZE, seed: int = 0,
            trellis: tuple[int, int] | None = None, exponents: np.ndarray = STEP_EXPONENTS) -> Candidate:
    """The RD curve of one coding frame of a tensor, as ecsq (scalar rounding) at each step Δ. With `trellis`
    (states, generator) the record will be tcq at δ = Δ/2 (occrt/codecs/tcq.py): the codes' rate is taken to be
    ecsq's at Δ (the entropy of a grid of step 2δ), the record's size adds tcq's second block (its header, table
    and chunk record, the length field) and trellis params; the distortion stays ecsq's (the trellis lowers it by
    about the same factor everywhere, which leaves the equal-slope allocation where it was). `exponents`: the step
    grid (`step_exponents`)."""
    res = frame.residual.reshape(-1)
    n = res.size
    idx = sample_positions(n, sample, seed) if n > sample else None
    res_s = res if idx is None else res[idx]
    if frame.scale2.size == 1:
        scale2_s: np.ndarray | float = float(frame.scale2.reshape(-1)[0])
    else:
        scale2 = np.broadcast_to(frame.scale2, frame.shape)  # a view: flattening it would copy n float64
        scale2_s = scale2.reshape(-1) if idx is None else scale2[np.divmod(idx, frame.shape[1])]
    factor = n / max(res_s.size, 1)
    rms = float(np.sqrt(np.mean(res_s.astype(np.float64) ** 2))) if res_s.size else 0.0
    rms = rms if rms > 0 else 1.0
    steps = rms * np.exp2(np.asarray(exponents) / STEP_RESOLUTION)
    n_chunks = -(-n // chunk_size) if n else 0
    fixed_bits = 8 * frame.side_bytes() + n_chunks * (8 * ans.CHUNK_SIZE_BYTES + 16)
    bits = np.empty(steps.size)
    dist = np.empty(steps.size)
    res64 = res_s.astype(np.float64)
    for k, step in enumerate(steps):
        codes = np.rint(res_s * np.float32(1.0 / step)).astype(np.int64)
        counts = np.bincount(codes - codes.min()) if codes.size else np.zeros(0, np.int64)
        counts = counts[counts > 0]
        entropy = float(codes.size * np.log2(codes.size) - (counts * np.log2(counts)).sum()) if codes.size else 0.0
        # the frequency table: about two bytes an entry (varint of freq - 1), plus the block header
        table = 8 * (ans.HEADER_SIZE + 2 * counts.size + 8)
        params = frame.params(float(step))
        if trellis is not None:
            table = 2 * table + 8 * (8 + ans.CHUNK_SIZE_BYTES + 16)
            params = {**frame.params(float(step) / 2), "states": trellis[0], "generator": trellis[1]}
        params_bits = 8 * len(canonical_json(params))
        bits[k] = entropy * factor + table + fixed_bits + params_bits
        err = (codes * step - res64) ** 2
        dist[k] = importance * float((err * scale2_s).sum()) * factor
    return Candidate(options=options, steps=steps, bits=bits, distortion=dist)


def choose(curves: Sequence[TensorCurves], lam: float) -> list[Choice]:
    out = []
    for t in curves:
        best: Choice | None = None
        for ci, c in enumerate(t.candidates):
            cost = c.distortion + lam * c.bits
            k = int(np.argmin(cost))
            if best is None or cost[k] < best.distortion + lam * best.bits:
                best = Choice(ci, k, float(c.bits[k]), float(c.distortion[k]))
        out.append(best)
    return out


def allocate(curves: Sequence[TensorCurves], budget_bits: float) -> tuple[list[Choice], float]:
    """Equal-slope allocation meeting `budget_bits` (the total is the largest not above it on the λ path). A budget
    below the smallest encoding, or more than `SHORTFALL_TOLERANCE` above what the finest steps spend, is a
    ValueError: the target cannot be met."""
    if not curves:
        return [], 0.0
    min_bits = sum(min(float(c.bits.min()) for c in t.candidates) for t in curves)
    if budget_bits < min_bits:
        raise ValueError(f"a budget of {budget_bits / 8:,.0f} bytes is below the smallest encoding "
                         f"({min_bits / 8:,.0f} bytes): lower the target's precision or raise --bpw")
    total = lambda choices: sum(c.bits for c in choices)  # noqa: E731
    lo, hi = 1e-30, 1e30  # λ: small favours distortion (big files), large favours rate
    finest = choose(curves, lo)
    if total(finest) <= budget_bits:
        if total(finest) < (1 - SHORTFALL_TOLERANCE) * budget_bits:
            n = sum(t.n_params for t in curves)
            raise ValueError(f"a budget of {budget_bits / n:.3f} bits per weight is above what the finest steps "
                             f"spend ({total(finest) / n:.3f}): lower the target, or keep the weights exact "
                             f"(--lossless)")
        return finest, lo
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if total(choose(curves, mid)) > budget_bits:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return choose(curves, hi), hi

