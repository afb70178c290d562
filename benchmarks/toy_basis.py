"""The toy basis experiment (DESIGN.md, "The toy experiment"): one function, two representations, three coordinate
systems for the network's weights -- and the bits each needs under occrt's codec for the same function error.

    target      f(x) = exp(sin 2πx) + 0.4 / (1.15 - cos 2π(x - 0.3)) on [0, 1), periodic and analytic, scaled to
                unit RMS on the grid x_i = i / 2048 (the error is measured on this grid: RMS of f̂ - f)
    Fourier     f̂ = a_0 + Σ_{k<=K} a_k cos 2πkx + b_k sin 2πkx, coefficients from the FFT; K the smallest with
                truncation error <= FIT (and a second expansion with K = 1023, every frequency the grid resolves:
                2047 coefficients, most of them ~0)
    MLP         1 -> 64 -> 64 -> 1, tanh, float64, Adam then L-BFGS, stopped once its error is <= FIT
    coding      every parameter (or coefficient) of a representation is quantized with one uniform step Δ
                (codes = rint(p / Δ)), the codes go through occrt.codecs.ans.encode_symbols as one block, and the
                representation is rebuilt from the codes and evaluated. Bits = 8 · block bytes + 32 (Δ as f32).
                For each representation the step is scanned upwards on a 2^(1/8) grid and the cheapest encoding
                before the first step whose function error exceeds BOUND is reported (see `cheapest` for why).
    MLP frames  original   the parameters as trained
                rotated    each weight matrix / bias stored as Q_out W Q_inᵀ (seeded randomized Hadamard rotations,
                           occrt.codecs.rotation construction 1, sides of length > 1), quantized there, rotated back
                aligned    the hidden 64x64 matrix stored in its singular basis at rank r: A = U_r √S_r,
                           B = √S_r V_rᵀ and the residual W - AB, all quantized with the same step (r from 0..64,
                           the cheapest); the other tensors as trained

Run:  python benchmarks/toy_basis.py [--seeds 0,1,2,3,4] [--plot benchmarks/toy_basis.png]
It prints the tables of benchmarks/toy_basis_results.md (one block per seed, then the spread over seeds).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from occrt.analyze import analyze_matrix, moments
from occrt.codecs import ans
from occrt.codecs.rotation import RotationSpec, derive_seed, rotate, unrotate

N_GRID = 2048
FIT = 0.005  # both representations are fitted to this RMS function error (f has unit RMS)
BOUND = 0.01  # ... and coded so that the error stays at or below this
HIDDEN = 64
STEP_GRID = 2.0 ** (np.arange(-18 * 8, 3 * 8 + 1) / 8)  # steps relative to the representation's parameter RMS
RANKS = (0, 1, 2, 4, 8, 16, 32, 64)
STEP_BITS = 32  # the step, stored as f32


def grid() -> np.ndarray:
    return np.arange(N_GRID) / N_GRID


def target(x: np.ndarray) -> np.ndarray:
    f = np.exp(np.sin(2 * np.pi * x)) + 0.4 / (1.15 - np.cos(2 * np.pi * (x - 0.3)))
    f0 = np.exp(np.sin(2 * np.pi * grid())) + 0.4 / (1.15 - np.cos(2 * np.pi * (grid() - 0.3)))
    return f / np.sqrt(np.mean(f0 ** 2))


def rms_error(fhat: np.ndarray, f: np.ndarray) -> float:
    return float(np.sqrt(np.mean((fhat - f) ** 2)))


# ---- Fourier ----------------------------------------------------------------------------------------------------------

def fourier_coefficients(f: np.ndarray, K: int) -> np.ndarray:
    """(2K+1,) [a_0, a_1, b_1, ..., a_K, b_K] of f sampled on the grid (exact for K < N_GRID/2)."""
    F = np.fft.rfft(f) / N_GRID  # (N/2+1,)
    c = [F[0].real]
    for k in range(1, K + 1):
        c += [2 * F[k].real, -2 * F[k].imag]
    return np.array(c)


def fourier_eval(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    K = (c.size - 1) // 2
    k = np.arange(1, K + 1)
    ph = 2 * np.pi * np.outer(x, k)  # (n, K)
    return c[0] + np.cos(ph) @ c[1::2] + np.sin(ph) @ c[2::2]


# ---- MLP --------------------------------------------------------------------------------------------------------------

NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")  # shapes (64, 1), (64,), (64, 64), (64,), (1, 64), (1,)


def mlp_eval(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.tanh((2 * x - 1)[:, None] @ p["w1"].T + p["b1"])  # (n, 64)
    h = np.tanh(h @ p["w2"].T + p["b2"])  # (n, 64)
    return (h @ p["w3"].T + p["b3"])[:, 0]  # (n,)


def train_mlp(seed: int, f: np.ndarray, x: np.ndarray) -> tuple[dict[str, np.ndarray], float, int]:
    """Train until RMS error <= FIT (checked every step); returns parameters, achieved error, steps taken."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                              torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)).double()
    xt = torch.tensor(2 * x - 1)[:, None]
    ft = torch.tensor(f)[:, None]
    loss_fn = lambda: torch.mean((net(xt) - ft) ** 2)  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = 0
    for steps in range(1, 6001):
        opt.zero_grad()
        loss = loss_fn()
        if math.sqrt(loss.item()) <= FIT:
            break
        loss.backward()
        opt.step()
    lbfgs = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=1, history_size=50, line_search_fn="strong_wolfe")
    while math.sqrt(loss_fn().item()) > FIT and steps < 12000:
        def closure():
            lbfgs.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        lbfgs.step(closure)
        steps += 1
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    p = {}
    for i, m in enumerate(layers, start=1):
        p[f"w{i}"] = m.weight.detach().numpy().copy()
        p[f"b{i}"] = m.bias.detach().numpy().copy()
    return p, rms_error(mlp_eval(p, x), f), steps


def flat(p: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([p[k].reshape(-1) for k in NAMES])


# ---- coding -----------------------------------------------------------------------------------------------------------

@dataclass
class Coded:
    bits: int  # the whole block + the step
    payload_bits: int  # rANS words + escape bytes only (the rest: header, frequency table, chunk index)
    fixed_bits: int  # the same codes stored fixed-width, each tensor at its own width: Σ n_t · ceil(log2(range_t))
    #                  + the step (what a container without an entropy coder pays; widths' side data not counted)
    error: float
    step: float


def code(values: np.ndarray, step: float) -> tuple[np.ndarray, int, int]:
    """Quantize with one step, entropy-code with occrt's ANS block. Returns (reconstruction, bits, payload bits):
    payload = rANS words + escape bytes; the rest of the block is the header, frequency table and chunk index
    (format_spec/ans.md), a fixed cost that dominates for a few dozen symbols."""
    codes = np.rint(values / step).astype(np.int64)
    block = ans.encode_symbols(codes.astype(np.int32))
    fields = struct.unpack(ans.HEADER_FORMAT, block[:ans.HEADER_SIZE])
    n_chunks, table_bytes = fields[7], fields[10]
    index_offset = -(-(ans.HEADER_SIZE + table_bytes) // ans.TABLE_ALIGN) * ans.TABLE_ALIGN
    fixed = index_offset + ans.CHUNK_SIZE_BYTES * n_chunks
    return codes * step, 8 * len(block) + STEP_BITS, 8 * (len(block) - fixed)


def cheapest(rebuild, values: np.ndarray, f: np.ndarray, x: np.ndarray,
             sizes: list[int] | None = None) -> tuple[Coded | None, list[Coded]]:
    """Scan the step grid upwards; `rebuild(v̂)` turns quantized values into the function on x. Returns the cheapest
    point before the first step whose error exceeds BOUND, and the whole curve. `sizes`: the lengths of the tensors
    `values` concatenates (for the fixed-width count).

    Why "before the first failure" and not "the cheapest of all points within the bound": with a few dozen
    sensitive parameters (the MLP's output bias is one number) the error is a jagged function of the step, and the
    minimum over ~170 steps would pick lucky roundings -- a measurement of luck, not of the representation.
    """
    rms = float(np.sqrt(np.mean(values ** 2)))
    curve = []
    for rel in STEP_GRID:
        step = rms * rel
        vhat, bits, payload = code(values, step)
        codes = np.rint(values / step)
        fixed = STEP_BITS
        for part in np.split(codes, np.cumsum(sizes or [values.size])[:-1]):
            if part.size:
                fixed += part.size * math.ceil(math.log2(np.ptp(part) + 1))
        curve.append(Coded(bits=bits, payload_bits=payload, fixed_bits=fixed, error=rms_error(rebuild(vhat), f),
                           step=step))
    ok = []
    for c in curve:
        if c.error > BOUND:
            break
        ok.append(c)
    return (min(ok, key=lambda c: c.bits) if ok else None), curve


def cheapest_fixed(curve: list[Coded]) -> Coded | None:
    """As `cheapest`, for fixed-width storage of the codes."""
    ok = []
    for c in curve:
        if c.error > BOUND:
            break
        ok.append(c)
    return min(ok, key=lambda c: c.fixed_bits) if ok else None


def split(v: np.ndarray, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = v[pos:pos + n].reshape(shape)
        pos += n
    return out


def rotations(p: dict[str, np.ndarray], seed: int) -> dict[str, list[tuple[int, RotationSpec]]]:
    """Per tensor: (axis, spec) of each side longer than 1; a bias is a (n,) vector rotated along its one axis."""
    out = {}
    for j, name in enumerate(NAMES):
        sides = []
        for axis, n in enumerate(p[name].shape):
            if n > 1:
                sides.append((axis, RotationSpec(1, derive_seed(seed, j, axis), n)))
        out[name] = sides
    return out


def to_frame(p, rots):
    q = {}
    for name in NAMES:
        t = p[name]
        for axis, spec in rots[name]:
            t = rotate(t, spec, axis=axis)
        q[name] = t
    return q


def from_frame(q, rots):
    p = {}
    for name in NAMES:
        t = q[name]
        for axis, spec in reversed(rots[name]):
            t = unrotate(t, spec, axis=axis)
        p[name] = t
    return p


def stats(v: np.ndarray) -> dict[str, float]:
    energy, max_rms, kurt, pr = moments(v, n_total=v.size)
    return {"n": v.size, "kurtosis": kurt, "max_rms": max_rms, "pr_frac": pr / v.size}


# ---- one seed ---------------------------------------------------------------------------------------------------------

def run_seed(seed: int, f: np.ndarray, x: np.ndarray, fourier_rows: dict) -> dict:
    t0 = time.time()
    p, fit, steps = train_mlp(seed, f, x)
    train_s = time.time() - t0
    shapes = [(k, p[k].shape) for k in NAMES]
    rows = dict(fourier_rows)
    v = flat(p)
    sizes = [p[k].size for k in NAMES]
    best, curve = cheapest(lambda vh: mlp_eval(split(vh, shapes), x), v, f, x, sizes)
    rows["MLP, original axes"] = {**stats(v), "fit": fit, "coded": best, "curve": curve}

    rots = rotations(p, seed)
    vr = flat(to_frame(p, rots))
    best, curve = cheapest(lambda vh: mlp_eval(from_frame(split(vh, shapes), rots), x), vr, f, x, sizes)
    rows["MLP, rotated (Hadamard)"] = {**stats(vr), "fit": fit, "coded": best, "curve": curve}

    u, s, vt = np.linalg.svd(p["w2"])
    best_r, best_a, curve_a, va_best = None, None, None, None
    for r in RANKS:
        a, b = u[:, :r] * np.sqrt(s[:r]), np.sqrt(s[:r])[:, None] * vt[:r]  # (64, r), (r, 64)
        res = p["w2"] - a @ b
        others = [k for k in NAMES if k != "w2"]
        shapes_a = [(k, p[k].shape) for k in others] + [("a", a.shape), ("b", b.shape), ("res", res.shape)]
        va = np.concatenate([p[k].reshape(-1) for k in others] + [a.reshape(-1), b.reshape(-1), res.reshape(-1)])

        def rebuild(vh, shapes_a=shapes_a):
            q = split(vh, shapes_a)
            q["w2"] = q.pop("a") @ q.pop("b") + q.pop("res")
            return mlp_eval(q, x)

        cand, curve = cheapest(rebuild, va, f, x, [int(np.prod(shape)) for _, shape in shapes_a])
        if cand is not None and (best_a is None or cand.bits < best_a.bits):
            best_r, best_a, curve_a, va_best = r, cand, curve, va
    rows["MLP, aligned (SVD of W2)"] = {**stats(va_best), "fit": fit, "coded": best_a, "curve": curve_a,
                                        "rank": best_r}
    w2 = dict(analyze_matrix(p["w2"].astype(np.float32), seed=seed, ranks=None).regimes)
    return {"seed": seed, "rows": rows, "w2": w2, "train_steps": steps, "train_s": train_s, "mlp": p}


def fourier_rows(f: np.ndarray, x: np.ndarray, n_mlp: int) -> tuple[dict, int]:
    K = next(k for k in range(1, N_GRID // 2) if rms_error(fourier_eval(fourier_coefficients(f, k), x), f) <= FIT)
    rows = {}
    k_all = min((n_mlp - 1) // 2, N_GRID // 2 - 1)  # as many coefficients as the MLP has, up to what the grid resolves
    for label, k in ((f"Fourier, K = {K}", K), (f"Fourier, K = {k_all} (all the grid resolves)", k_all)):
        c = fourier_coefficients(f, k)
        best, curve = cheapest(lambda ch: fourier_eval(ch, x), c, f, x)
        rows[label] = {**stats(c), "fit": rms_error(fourier_eval(c, x), f), "coded": best, "curve": curve}
    return rows, K


# ---- output -----------------------------------------------------------------------------------------------------------

def table(result: dict) -> str:
    lines = ["| representation | params | excess kurtosis | max/rms | PR/N | fit error | bits at error <= "
             f"{BOUND} | bits/param | payload bits | step | fixed-width bits |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in result["rows"].items():
        c = r["coded"]
        fx = cheapest_fixed(r["curve"])
        extra = f" (rank {r['rank']})" if "rank" in r else ""
        lines.append(f"| {label}{extra} | {r['n']} | {r['kurtosis']:.2f} | {r['max_rms']:.1f} | {r['pr_frac']:.3f} | "
                     f"{r['fit']:.4f} | {c.bits} | {c.bits / r['n']:.2f} | {c.payload_bits} | {c.step:.3g} | "
                     f"{fx.fixed_bits} |")
    return "\n".join(lines)


def w2_table(results: list[dict]) -> str:
    lines = ["| seed | regime | excess kurtosis | max/rms | PR/N | bits/weight @ 1% rms error |", "|---|---|---:|---:|---:|---:|"]
    for res in results:
        for reg, st in res["w2"].items():
            lines.append(f"| {res['seed']} | {reg} | {st.excess_kurtosis:.2f} | {st.max_over_rms:.1f} | "
                         f"{st.participation_fraction:.4f} | {st.bits:.3f} |")
    return "\n".join(lines)


def spread(results: list[dict]) -> str:
    labels = list(results[0]["rows"])
    lines = [f"| representation | bits at error <= {BOUND}: mean ± sd (min–max) | fixed-width bits: mean ± sd | "
             "excess kurtosis: mean ± sd | max/rms: mean ± sd |", "|---|---:|---:|---:|---:|"]
    sd = lambda a: a.std(ddof=1) if a.size > 1 else 0.0  # noqa: E731
    for label in labels:
        b = np.array([r["rows"][label]["coded"].bits for r in results], float)
        fx = np.array([cheapest_fixed(r["rows"][label]["curve"]).fixed_bits for r in results], float)
        k = np.array([r["rows"][label]["kurtosis"] for r in results])
        m = np.array([r["rows"][label]["max_rms"] for r in results])
        lines.append(f"| {label} | {b.mean():.0f} ± {sd(b):.0f} ({b.min():.0f}–{b.max():.0f}) | "
                     f"{fx.mean():.0f} ± {sd(fx):.0f} | {k.mean():.2f} ± {sd(k):.2f} | {m.mean():.1f} ± {sd(m):.1f} |")
    ranks = [r["rows"]["MLP, aligned (SVD of W2)"]["rank"] for r in results]
    lines.append(f"\naligned ranks chosen per seed: {ranks}")
    return "\n".join(lines)


def plot(result: dict, f: np.ndarray, x: np.ndarray, out: str) -> None:
    """(a) the function and both fits, (b) log-density of the coded values / their RMS, (c) sorted magnitudes
    (concentration), (d) bits against function error as the step grows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    rows = result["rows"]
    p = result["mlp"]
    K = (rows[next(k for k in rows if k.startswith("Fourier"))]["n"] - 1) // 2
    ax = axes[0]
    ax.plot(x, f, "k", lw=2, label="target f")
    ax.plot(x, fourier_eval(fourier_coefficients(f, K), x), "--", label=f"Fourier K={K}")
    ax.plot(x, mlp_eval(p, x), ":", lw=2, label=f"MLP 1-64-64-1 (seed {result['seed']})")
    ax.set_title(f"(a) target and fits (RMS error <= {FIT})", fontsize=9)
    ax.legend(fontsize=7)

    rots = rotations(p, result["seed"])
    fourier_all = fourier_coefficients(f, N_GRID // 2 - 1)
    series = {"Fourier, K=1023": fourier_all, "MLP, original axes": flat(p),
              "MLP, rotated (Hadamard)": flat(to_frame(p, rots))}
    ax = axes[1]
    for label, v in series.items():
        z = v / np.sqrt(np.mean(v ** 2))
        edges = np.linspace(-16, 16, 129)
        cnt, _ = np.histogram(z, bins=edges)
        dens = cnt / (z.size * np.diff(edges))
        mid = 0.5 * (edges[1:] + edges[:-1])
        ax.step(mid[cnt > 0], dens[cnt > 0], where="mid", lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("value / rms (all parameters pooled, as one step codes them)", fontsize=8)
    ax.set_title("(b) parameter distributions (log density)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[2]
    series["MLP W2, singular basis (s_i, rest 0)"] = np.concatenate(
        [np.linalg.svd(p["w2"], compute_uv=False), np.zeros(p["w2"].size - HIDDEN)])
    for label, v in series.items():
        a = np.sort(np.abs(v))[::-1] / np.sqrt(np.mean(v ** 2))
        keep = a > 0
        ax.plot((np.arange(a.size) + 1)[keep] / a.size, a[keep], lw=1.2, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-8, 1e2)
    ax.set_xlabel("rank of |value| / count", fontsize=8)
    ax.set_ylabel("|value| / rms", fontsize=8)
    ax.set_title("(c) concentration: sorted magnitudes", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[3]
    for label, r in rows.items():
        curve = r["curve"]
        ax.plot([c.error for c in curve], [c.bits for c in curve], ".-", ms=2, lw=0.8, label=label)
    ax.axvline(BOUND, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("function RMS error after coding", fontsize=8)
    ax.set_ylabel("bits (ANS block + step)", fontsize=8)
    ax.set_title(f"(d) rate vs function error, step scanned (seed {result['seed']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    return (f"commit {commit}; {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs; "
            f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_basis.png"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    x = grid()
    f = target(x)
    n_mlp = 2 * HIDDEN + HIDDEN * HIDDEN + 2 * HIDDEN + 1 + HIDDEN
    rows_f, K = fourier_rows(f, x, n_mlp)
    results = []
    for seed in seeds:
        res = run_seed(seed, f, x, rows_f)
        results.append(res)
        print(f"### seed {seed} (MLP: {res['train_steps']} steps, {res['train_s']:.0f} s)\n\n{table(res)}\n",
              flush=True)
    print(f"### spread over seeds {seeds}\n\n{spread(results)}\n")
    print(f"### the hidden matrix W2 (64x64) in the three regimes of `occrt analyze`\n\n{w2_table(results)}\n")
    if args.plot:
        plot(results[0], f, x, args.plot)
        print(f"figure: {args.plot}")
    print(f"\n{machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
