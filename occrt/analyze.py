"""`occrt analyze`: a model's weight matrices seen in three coordinate systems (DESIGN.md, "Three regimes").

For each 2-D weight W (n_out, n_in), N = n_out · n_in entries, we list its coefficients c in three orthonormal bases
of the same N-dimensional space and measure them:

    original    c = W                              the checkpoint's axes
    rotated     c = Q_out · W · Q_inᵀ              seeded randomized Hadamard rotations of both sides
                                                   (occrt.codecs.rotation, construction 1; the codec's --rotate both)
    aligned     c = U_fullᵀ · W · V_full           the singular basis {u_i v_jᵀ}: c is diag(s) padded with N - m exact
                = diag(s_1 .. s_m), zeros           zeros (m = min(n_out, n_in)); the basis adapted to the operator

Why the singular basis for "aligned". The codec's structural part (occrt/codecs/ecsq.py: W_r ≈ U·V + Δ·C) is a
truncated SVD; the singular basis is that same choice carried to full rank -- the orthonormal basis of matrix space in
which this operator's coefficients are most concentrated (by Eckart–Young, its first k coefficients hold the most
energy any k rank-one directions can). It is the clean statement of regime 3: few coefficients carry the energy,
the rest are exactly zero. Its price is the basis itself: U and V are as large as W. So this module reports two rates
for it -- `bits` in the aligned regime counts the coefficients only (the basis taken as given: the floor if the basis
were shared or free), and `codec` is what occrt's ecsq codec achieves by choosing a real coding frame (rotation none or
both, structural rank from a small ladder, f16 factors and side data counted, ANS-coded residual) at the same error.

What is measured (moments about zero -- the quantizer's origin -- in float64):
    energy      Σ c²; equal in all three regimes (the bases are orthonormal): a check, reported, not assumed
    max/rms     max |c| / √(Σ c² / N)
    kurtosis    excess kurtosis  N Σ c⁴ / (Σ c²)² - 3  (0 for a Gaussian, -1.2 for a uniform, large for heavy tails
                or sparse vectors)
    PR          participation ratio of the coefficient energies e = c²:  (Σ e)² / Σ e²  -- the effective number of
                coordinates that carry the energy. Note PR = N / (kurtosis + 3) exactly: PR/N and kurtosis are two
                readings of one number. In the aligned regime PR = (Σ s²)² / Σ s⁴, the effective rank of W
                (= k for a matrix with k equal singular values).
    bits        bits per weight (N weights) that an entropy-coded uniform scalar quantizer needs so that the RMS error
                equals `rel_error` times the RMS of W: the step Δ is searched until Σ (c - Δ·rint(c/Δ))² = N (ε·rms)²
                (rotations and the singular basis are orthonormal, so this is the weight-space error in every
                regime), and bits = n·H(codes) / N, the empirical entropy of the codes (occrt.codecs.ans.ideal_bits;
                the ANS coder reaches it within ~0.1 %). The step is searched on a random subset of at most
                SEARCH_SAMPLE coefficients; bits and the achieved error are then measured on all of them.

Caveat on quantized sources: a GGUF Q4_1 tensor holds, per block of 32 weights, 16 levels. The values are then
not a continuous source, and fine-step entropy measurements in the original axes see that grid (a rotation mixes
blocks and removes it). benchmarks/analyze_smollm2.md measures how much it matters for SmolLM2.

Per layer type (q, k, v, o, gate, up, down, embedding, lm_head) the summary gives the medians over the tensors of the
distribution measures and the parameter-weighted mean of the bits (total bits / total weights).

Cost: one thin SVD per matrix plus ~20 quantizer passes per regime and codec frame (SmolLM2-135M: ~2 min on one
core). On a shared machine set OPENBLAS_NUM_THREADS=1: contended BLAS threads made the same run take 21 min.

numpy only at import; matplotlib is imported by `plot` alone.
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from occrt.codecs import ans
from occrt.codecs.ecsq import Layout, to_f16
from occrt.errors import OccError
from occrt.codecs.rotation import RotationSpec, derive_seed, rotate
from occrt.format.writer import canonical_json

REGIMES = ("original", "rotated", "aligned")
KINDS = ("q", "k", "v", "o", "gate", "up", "down", "embedding", "lm_head", "other")
DEFAULT_RANKS = (0, 1, 4, 16, 64)  # structural ranks the codec-frame search tries (as `occrt convert --ranks`)
SEARCH_SAMPLE = 1 << 18  # coefficients the step search looks at (the error is a mean: a subset estimates it well)
STEP_RESOLUTION = 16  # the step grid is rms · 2^(k / 16) before the final bisection
HIST_BINS = 70
HIST_FLOOR = 1e-2  # smallest |coefficient| / rms the histograms resolve (log-spaced bins from here)

_PROJ = re.compile(r"(?:^|\.)(q|k|v|o|gate|up|down)_proj\.weight$")


def layer_kind(name: str) -> str:
    """The layer type of a tensor from its Hugging Face name."""
    m = _PROJ.search(name)
    if m:
        return m.group(1)
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name.endswith("lm_head.weight"):
        return "lm_head"
    return "other"


# ---- the measures -----------------------------------------------------------------------------------------------------

def entropy_bits(codes: np.ndarray, *, n_zeros: int = 0) -> float:
    """n · H(empirical distribution of `codes` plus `n_zeros` extra zeros), in bits (= ans.ideal_bits of them all).

    A histogram by bincount (linear time) where the code range is small, np.unique otherwise.
    """
    c = np.asarray(codes, dtype=np.int64).reshape(-1)
    n = c.size + n_zeros
    if n == 0:
        return 0.0
    lo = min(int(c.min()), 0) if c.size else 0
    hi = max(int(c.max()), 0) if c.size else 0
    if hi - lo < 1 << 24:
        counts = np.bincount(c - lo, minlength=hi - lo + 1)
        counts[-lo] += n_zeros
    else:
        values, counts = np.unique(c, return_counts=True)
        counts = np.concatenate([counts, [n_zeros]]) if n_zeros and 0 not in values else counts
        if n_zeros and 0 in values:
            counts[np.searchsorted(values, 0)] += n_zeros
    counts = counts[counts > 0].astype(np.float64)
    return float(n * math.log2(n) - (counts * np.log2(counts)).sum())


@dataclass(frozen=True)
class QuantPoint:
    """One operating point of the entropy-coded uniform quantizer on a coefficient vector."""

    step: float
    bits: float  # per weight
    rel_error: float  # achieved RMS error / RMS of the tensor


def _sse(c: np.ndarray, step: float) -> float:
    q = np.rint(c * (1.0 / step))
    q *= step
    q -= c
    return float(np.dot(q, q))


def search_step(c: np.ndarray, *, target_sse: float, rms: float) -> float:
    """The largest step Δ (on a 2^(1/16) grid, then refined by bisection) with Σ (c - Δ rint(c/Δ))² ≤ target_sse.

    c: 1-D float64. Assumes the error grows with the step (true up to small wiggles for any spread-out c); the result
    is deterministic either way. The grid spans rms·2^-24 .. rms·2^24.
    """
    sse = lambda s: _sse(c, s)  # noqa: E731
    grid = lambda k: rms * 2.0 ** (k / STEP_RESOLUTION)  # noqa: E731
    lo_k, hi_k = -24 * STEP_RESOLUTION, 24 * STEP_RESOLUTION
    if sse(grid(hi_k)) <= target_sse:
        return grid(hi_k)
    if sse(grid(lo_k)) > target_sse:
        return grid(lo_k)
    while hi_k - lo_k > 1:  # invariant: grid(lo_k) feasible, grid(hi_k) not
        mid = (lo_k + hi_k) // 2
        if sse(grid(mid)) <= target_sse:
            lo_k = mid
        else:
            hi_k = mid
    a, b = grid(lo_k), grid(hi_k)
    for _ in range(6):
        m = math.sqrt(a * b)
        if sse(m) <= target_sse:
            a = m
        else:
            b = m
    return a


def quantize_point(c: np.ndarray, *, rel_error: float, rms: float, n_total: int | None = None,
                   rng: np.random.Generator | None = None) -> tuple[QuantPoint, np.ndarray]:
    """Step and bits per weight for RMS error = rel_error · rms over n_total coefficients, of which c (any shape) are
    the listed ones and the rest exact zeros (they cost no error and are coded as code 0). Returns the point and the
    codes of c."""
    c = np.asarray(c).reshape(-1)
    n_total = c.size if n_total is None else n_total
    if n_total == 0 or rms == 0:
        return QuantPoint(step=1.0, bits=0.0, rel_error=0.0), np.zeros(c.size, np.int64)
    target = n_total * (rel_error * rms) ** 2
    sample = c
    if c.size > SEARCH_SAMPLE:
        rng = rng or np.random.default_rng(0)
        sample = c[np.sort(rng.choice(c.size, size=SEARCH_SAMPLE, replace=False))]
    # implicit zeros cost no error; the sample's share of the error budget is its share of the listed coefficients
    step = search_step(sample.astype(np.float64), target_sse=target * sample.size / max(c.size, 1), rms=rms)
    codes = np.rint(c * (1.0 / step)).astype(np.int64)
    err = math.sqrt(_sse(c.astype(np.float64), step) / n_total) / rms
    return QuantPoint(step=step, bits=entropy_bits(codes, n_zeros=n_total - c.size) / n_total, rel_error=err), codes


@dataclass
class RegimeStats:
    energy: float
    max_over_rms: float
    excess_kurtosis: float
    participation: float  # PR = (Σ c²)² / Σ c⁴
    participation_fraction: float  # PR / N
    bits: float  # per weight at the target error
    step: float
    rel_error: float  # achieved

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in self.__dict__.items()}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def moments(c: np.ndarray, *, n_total: int) -> tuple[float, float, float, float]:
    """(energy, max/rms, excess kurtosis, PR) of c plus n_total - c.size zeros; moments about zero, float64."""
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    e = c * c
    s2 = float(e.sum())
    s4 = float(np.dot(e, e))
    if s2 == 0.0:
        return 0.0, 0.0, math.nan, 0.0
    rms = math.sqrt(s2 / n_total)
    return s2, float(np.abs(c).max()) / rms, n_total * s4 / (s2 * s2) - 3.0, s2 * s2 / s4


def regime_stats(c: np.ndarray, *, n_total: int, rel_error: float, rms_w: float,
                 rng: np.random.Generator | None = None) -> RegimeStats:
    energy, mr, kurt, pr = moments(c, n_total=n_total)
    point, _ = quantize_point(c, rel_error=rel_error, rms=rms_w, n_total=n_total, rng=rng)
    return RegimeStats(energy=energy, max_over_rms=mr, excess_kurtosis=kurt, participation=pr,
                       participation_fraction=pr / n_total if n_total else 0.0, bits=point.bits,
                       step=point.step, rel_error=point.rel_error)


def rotation_specs(shape: tuple[int, int], seed: int) -> tuple[RotationSpec, RotationSpec]:
    """(rot_in, rot_out) of the rotated regime: construction 1, seeds derived from `seed` by side (0 in, 1 out)."""
    n_out, n_in = shape
    return RotationSpec(1, derive_seed(seed, 0), n_in), RotationSpec(1, derive_seed(seed, 1), n_out)


def rotated(w: np.ndarray, seed: int) -> np.ndarray:
    """Q_out · W · Q_inᵀ (float32)."""
    rot_in, rot_out = rotation_specs(w.shape, seed)
    return rotate(rotate(np.asarray(w, np.float32), rot_in, axis=1), rot_out, axis=0)


# ---- what the codec would do ------------------------------------------------------------------------------------------

@dataclass
class CodecChoice:
    """The cheapest ecsq coding frame at the target error: rotation, rank, step and its record's size."""

    rotation: str  # "none" | "both"
    rank: int
    step: float
    bits: float  # per weight: ANS block (estimate_bits) + f16 factors + params JSON
    rel_error: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def codec_frames(w: np.ndarray, svd: tuple[np.ndarray, np.ndarray, np.ndarray], *, seed: int,
                 ranks: Sequence[int]) -> Iterator[tuple[str, int, np.ndarray, dict[str, Any]]]:
    """(rotation, rank, residual (n_out, n_in) float32, params) for each frame ecsq could write.

    Mirrors ecsq.CodingFrame (factors √s·U and √s·Vᵀ in the coding frame, rounded to f16, the residual taken against
    the rounded factors) but reuses one SVD of W for every frame: the SVD of Q_out W Q_inᵀ is (Q_out U) S (Q_in V)ᵀ.
    tests/test_analyze.py checks the residuals against CodingFrame's.
    """
    u, s, vt = svd  # (n_out, m), (m,), (m, n_in), float64
    rot_in, rot_out = rotation_specs(w.shape, seed)
    m = s.size
    for rotation in ("none", "both"):
        t = np.asarray(w, np.float32) if rotation == "none" else rotated(w, seed)
        for r in sorted({min(int(r), m) for r in ranks}):
            res = t
            if r:
                root = np.sqrt(s[:r])
                uf, vf = u[:, :r] * root[None, :], root[:, None] * vt[:r]  # (n_out, r), (r, n_in)
                if rotation == "both":
                    uf, vf = rotate(uf, rot_out, axis=0), rotate(vf, rot_in, axis=1)
                res = t - to_f16(uf).astype(np.float32) @ to_f16(vf).astype(np.float32)
            params = {"step": 1.0, "rank": r, "row_scales": False, "col_scales": False,
                      "rot_in": rot_in.to_json() if rotation == "both" else None,
                      "rot_out": rot_out.to_json() if rotation == "both" else None}
            yield rotation, r, res, params


def codec_choice(w: np.ndarray, svd, *, rel_error: float, rms_w: float, seed: int, ranks: Sequence[int],
                 rng: np.random.Generator | None = None) -> CodecChoice:
    n_out, n_in = w.shape
    n = w.size
    best: CodecChoice | None = None
    for rotation, r, res, params in codec_frames(w, svd, seed=seed, ranks=ranks):
        point, codes = quantize_point(res, rel_error=rel_error, rms=rms_w, rng=rng)
        params = {**params, "step": point.step}
        side = Layout.of(n_out, n_in, params).codes
        bits = ans.estimate_bits(codes.astype(np.int32)) + 8 * (side + len(canonical_json(params)))
        cand = CodecChoice(rotation=rotation, rank=r, step=point.step, bits=bits / n, rel_error=point.rel_error)
        if best is None or cand.bits < best.bits:
            best = cand
    return best


# ---- one tensor, a whole model ----------------------------------------------------------------------------------------

@dataclass
class TensorAnalysis:
    name: str
    kind: str
    shape: tuple[int, int]
    rank_bound: int  # min(n_out, n_in)
    regimes: dict[str, RegimeStats]
    codec: CodecChoice | None
    hist: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)  # for plot only

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "rank_bound": self.rank_bound,
                "regimes": {k: v.to_json() for k, v in self.regimes.items()},
                "codec": None if self.codec is None else self.codec.to_json()}


def _hist(c: np.ndarray, rms: float, edges: np.ndarray, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Density of |c| / rms on the (log-spaced) bin edges, normalized by n_total: implicit zeros count in the total,
    in no bin, so the three regimes' curves are on one scale."""
    counts, _ = np.histogram(np.abs(np.asarray(c, np.float64).reshape(-1)) / rms, bins=edges)
    return edges, counts / (n_total * np.diff(edges))


def analyze_matrix(w: np.ndarray, *, name: str = "", rel_error: float = 0.01, seed: int = 0,
                   ranks: Sequence[int] | None = DEFAULT_RANKS, histograms: bool = False) -> TensorAnalysis:
    """The three regimes of one matrix W (n_out, n_in); `ranks=None` skips the codec-frame search."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"analyze_matrix takes a matrix, got shape {w.shape}")
    n = w.size
    rng = np.random.default_rng(seed)
    rms_w = math.sqrt(float(np.dot(w.reshape(-1).astype(np.float64), w.reshape(-1).astype(np.float64))) / n) \
        if n else 0.0
    svd = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    coefficients = {"original": w, "rotated": rotated(w, seed), "aligned": svd[1]}
    regimes = {k: regime_stats(c, n_total=n, rel_error=rel_error, rms_w=rms_w, rng=rng)
               for k, c in coefficients.items()}
    hist = {}
    if histograms and rms_w > 0:
        top = max(r.max_over_rms for r in regimes.values()) * 1.05
        edges = np.geomspace(HIST_FLOOR, top, HIST_BINS + 1)
        hist = {k: _hist(c, rms_w, edges, n) for k, c in coefficients.items()}
    codec = None if ranks is None else codec_choice(w, svd, rel_error=rel_error, rms_w=rms_w, seed=seed,
                                                    ranks=ranks, rng=rng)
    return TensorAnalysis(name=name, kind=layer_kind(name), shape=(int(w.shape[0]), int(w.shape[1])),
                          rank_bound=int(min(w.shape)), regimes=regimes, codec=codec, hist=hist)


def iter_matrices(src: str, *, pattern: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 matrix) for each 2-D tensor of a `.occ` file, HF directory or GGUF file, in file order;
    `pattern` is a shell-style glob on the Hugging Face names (fnmatch)."""
    from occrt.format import constants as C

    is_occ = False
    if os.path.isfile(src):
        with open(src, "rb") as f:
            is_occ = f.read(len(C.MAGIC)) == C.MAGIC
    want = (lambda name: fnmatch.fnmatchcase(name, pattern)) if pattern else (lambda name: True)  # noqa: E731
    if is_occ:
        from occrt.format.reader import OccFile

        with OccFile.open(src) as occ:
            for name, entry in occ.tensors.items():
                if len(entry.shape) == 2 and want(name):
                    yield name, np.array(occ.tensor(name), dtype=np.float32)
        return
    from occrt.converters.convert import open_source
    from occrt.converters.policy import as_f32

    source = open_source(src)
    try:
        for t in source.tensors():
            if t.data.ndim == 2 and want(t.name):
                yield t.name, as_f32(t)
    finally:
        source.close()


@dataclass
class Report:
    source: str
    rel_error: float
    seed: int
    ranks: tuple[int, ...] | None
    tensors: list[TensorAnalysis]

    def summary(self) -> list[dict[str, Any]]:
        """One row per layer type: medians of the distribution measures, parameter-weighted mean bits."""
        rows = []
        for kind in KINDS:
            ts = [t for t in self.tensors if t.kind == kind]
            if not ts:
                continue
            n = np.array([t.n_params for t in ts], dtype=np.float64)
            row: dict[str, Any] = {"kind": kind, "tensors": len(ts), "parameters": int(n.sum()), "regimes": {}}
            for reg in REGIMES:
                st = [t.regimes[reg] for t in ts]
                med = lambda key: _finite(float(np.nanmedian([getattr(s, key) for s in st])))  # noqa: E731
                row["regimes"][reg] = {
                    "max_over_rms": med("max_over_rms"), "excess_kurtosis": med("excess_kurtosis"),
                    "participation": med("participation"), "participation_fraction": med("participation_fraction"),
                    "bits": float(np.dot(n, [s.bits for s in st]) / n.sum()),
                    "energy_mismatch": max(_energy_mismatch(t) for t in ts)}
            row["effective_rank_fraction"] = _finite(float(np.median(
                [t.regimes["aligned"].participation / t.rank_bound for t in ts])))
            if all(t.codec is not None for t in ts):
                row["codec_bits"] = float(np.dot(n, [t.codec.bits for t in ts]) / n.sum())
                row["codec_ranks"] = sorted({t.codec.rank for t in ts})
                row["codec_rotations"] = sorted({t.codec.rotation for t in ts})
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "rel_error": self.rel_error, "seed": self.seed,
                "ranks": None if self.ranks is None else list(self.ranks),
                "tensors": [t.to_json() for t in self.tensors], "summary": self.summary()}


def _energy_mismatch(t: TensorAnalysis) -> float:
    """Largest relative difference of the energy between regimes (float32 rotation: ~1e-7)."""
    e = [t.regimes[r].energy for r in REGIMES]
    return (max(e) - min(e)) / max(max(e), 1e-300)


def analyze(src: str, *, pattern: str | None = None, rel_error: float = 0.01, seed: int = 0,
            ranks: Sequence[int] | None = DEFAULT_RANKS, histograms: bool = False,
            log: Callable[[str], None] | None = None) -> Report:
    """Analyze every 2-D tensor of `src` (matching `pattern`)."""
    if not 0 < rel_error <= 1:
        raise ValueError(f"rel_error must be in (0, 1], got {rel_error}")
    out = []
    for name, w in iter_matrices(src, pattern=pattern):
        out.append(analyze_matrix(w, name=name, rel_error=rel_error, seed=seed, ranks=ranks, histograms=histograms))
        if log:
            log(f"analyzed {name} {list(w.shape)}")
    return Report(source=src, rel_error=rel_error, seed=seed, ranks=None if ranks is None else tuple(ranks),
                  tensors=out)


# ---- text and figure ------------------------------------------------------------------------------------------------

_ABBR = {"original": "orig", "rotated": "rot", "aligned": "align"}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def render(report: Report) -> str:
    """Per-tensor rows, then the per-layer-type summary."""
    eps = f"{100 * report.rel_error:g}%"
    head = (f"{'':<52} {'max/rms':^20} {'excess kurtosis':^26} {'PR/N %':^13} {'eff.rank':>8} "
            f" {'bits/weight @ ' + eps + ' rms error':^45}\n"
            f"{'tensor':<42} {'shape':>9} {'orig':>6} {'rot':>6} {'align':>6} {'orig':>8} {'rot':>8} {'align':>8} "
            f"{'orig':>6} {'rot':>6} {'/min':>8}  {'orig':>6} {'rot':>6} {'align*':>7} {'codec':>6} {'frame':>11}\n")
    lines = [f"{report.source}: {len(report.tensors)} matrices; rotation seed {report.seed}\n", head]

    def row(label: str, shape: str, reg: dict[str, dict], rank_frac: float | None, codec: str, frame: str) -> str:
        o, r, a = (reg[k] for k in REGIMES)
        return (f"{label:<42} {shape:>9} {_fmt(o['max_over_rms'], '6.1f')} {_fmt(r['max_over_rms'], '6.1f')} "
                f"{_fmt(a['max_over_rms'], '6.0f')} {_fmt(o['excess_kurtosis'], '8.2f')} "
                f"{_fmt(r['excess_kurtosis'], '8.2f')} {_fmt(a['excess_kurtosis'], '8.0f')} "
                f"{_fmt(100 * o['participation_fraction'], '6.1f')} {_fmt(100 * r['participation_fraction'], '6.1f')} "
                f"{_fmt(rank_frac, '8.3f')}  {o['bits']:6.3f} {r['bits']:6.3f} {a['bits']:7.4f} {codec:>6} "
                f"{frame:>11}\n")

    for t in report.tensors:
        reg = {k: v.to_json() for k, v in t.regimes.items()}
        codec = "-" if t.codec is None else f"{t.codec.bits:.3f}"
        frame = "-" if t.codec is None else f"{t.codec.rotation}/r{t.codec.rank}"
        lines.append(row(t.name, f"{t.shape[0]}x{t.shape[1]}", reg,
                         t.regimes["aligned"].participation / t.rank_bound, codec, frame))
    lines.append("\nsummary per layer type (medians; bits: parameter-weighted means; shape: parameters)\n")
    lines.append(head.replace("tensor", "type  ", 1))
    for s in report.summary():
        codec = _fmt(s.get("codec_bits"), ".3f")
        frame = "-" if "codec_ranks" not in s else ("|".join(s["codec_rotations"]) + "/r" +
                                                    ",".join(str(r) for r in s["codec_ranks"]))
        lines.append(row(f"{s['kind']} ({s['tensors']})", _count(s["parameters"]), s["regimes"],
                         s["effective_rank_fraction"], codec, frame))
    mismatch = max((_energy_mismatch(t) for t in report.tensors), default=0.0)
    lines.append(f"\nenergy check: largest relative difference between regimes {mismatch:.1e}\n"
                 "PR/N: participation ratio of the coefficient energies over the count (= 1 / (kurtosis + 3))\n"
                 "eff.rank/min: participation ratio of the squared singular values over min(n_out, n_in)\n"
                 "align*: coefficient bits with the singular basis taken as given (the basis itself not counted)\n"
                 "codec: bits of the ecsq codec's cheapest frame (rotation none|both / rank r; f16 factors and side "
                 "data counted)\n")
    return "".join(lines)


def _pick(report: Report, k: int) -> list[TensorAnalysis]:
    """The first tensor of each layer type (in KINDS order), at most k, among those with histograms."""
    picked = []
    for kind in KINDS:
        t = next((t for t in report.tensors if t.kind == kind and t.hist), None)
        if t is not None:
            picked.append(t)
    return picked[:k]


def plot(report: Report, out: str) -> None:
    """Log-log density histograms of |c| / rms(W) in the three regimes for one tensor per layer type, and the summary.

    The tensors must have been analyzed with histograms=True."""
    try:
        import matplotlib
    except ImportError as e:
        raise OccError("--plot needs matplotlib: pip install 'occrt[plot]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = _pick(report, 8)
    summary = report.summary()
    n_cols = 4
    n_rows = max(1, -(-len(picks) // n_cols)) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.3 * n_rows), squeeze=False)
    colors = {"original": "tab:red", "rotated": "tab:blue", "aligned": "tab:green"}
    for ax in axes.reshape(-1):
        ax.set_visible(False)
    for ax, t in zip(axes.reshape(-1), picks):
        ax.set_visible(True)
        for reg in REGIMES:
            edges, dens = t.hist[reg]
            mid = np.sqrt(edges[1:] * edges[:-1])
            keep = dens > 0
            st = t.regimes[reg]
            label = f"{_ABBR[reg]}: kurt {_fmt(st.excess_kurtosis, '.1f')}, {st.bits:.2f} b"
            if reg == "aligned":
                label = f"align (s_i; +{t.n_params - t.rank_bound:,} zeros): {st.bits:.3f} b"
                ax.plot(mid[keep], dens[keep], "o", ms=2.5, color=colors[reg], label=label)
            else:
                ax.plot(mid[keep], dens[keep], "-", color=colors[reg], lw=1, label=label)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_title(f"{t.name.replace('model.', '')} {t.shape[0]}x{t.shape[1]}", fontsize=8)
        ax.set_xlabel("|coefficient| / rms(W)", fontsize=7)
        ax.set_ylabel("density (per weight)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5.5, loc="upper right")
    kinds = [s["kind"] for s in summary]
    x = np.arange(len(kinds))
    panels = (("excess_kurtosis", "excess kurtosis (median)", True), ("max_over_rms", "max/rms (median)", True),
              ("participation_fraction", "PR / N (median)", True), ("bits", f"bits/weight @ "
                                                                   f"{100 * report.rel_error:g}% rms error", False))
    for j, (key, title, logy) in enumerate(panels):
        ax = axes[-1, j]
        ax.set_visible(True)
        for i, reg in enumerate(REGIMES):
            vals = [s["regimes"][reg][key] for s in summary]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(x + (i - 1) * 0.27, vals, 0.27, color=colors[reg], label=_ABBR[reg])
        if key == "bits" and all("codec_bits" in s for s in summary):
            ax.plot(x, [s["codec_bits"] for s in summary], "k_", ms=14, mew=2, label="codec")
        if logy:
            ax.set_yscale("symlog" if key == "excess_kurtosis" else "log")
        ax.set_xticks(x, kinds, fontsize=7, rotation=30)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    fig.suptitle(f"{os.path.basename(report.source.rstrip('/'))}: coefficients in three coordinate systems",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
