"""The small per-layer steps of the decoder forward pass as numba kernels: norms (RMS, layer), rotary + KV-cache
write, attention (causal, optionally windowed and soft-capped), activations. Each replaces a handful of numpy calls:
decoding one token runs ~50 numpy operations per layer outside the matrix products, and at a few microseconds each
they cost ~3 ms a token on SmolLM2 (30 layers), a third of the step. Their numpy references are the functions in
occrt/model/decoder.py and occrt/model/rope.py (`rms_norm`, `layer_norm`, `silu`, `gelu_tanh`, `Rotary.apply`,
`DecoderModel._attention`); tests/test_layer_kernels.py checks them against it.

Shapes: T new tokens at positions start..start+T-1; D hidden; H query heads of d; KV key/value heads; the cache of one
layer is (KV, S_max, d). Float32 throughout; sums may be reassociated (vectorized), so results agree with the
references to float32 rounding.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_FAST = {"reassoc", "contract"}


@njit(nogil=True, cache=True, fastmath=_FAST)
def _add_row(x, delta, r):  # pragma: no cover (jit)
    """x[r] += delta[r] when delta has rows (a (0, D) delta adds nothing); returns the row x[r]."""
    xr = x[r]
    if delta.shape[0]:
        dr = delta[r]
        for j in range(xr.shape[0]):
            xr[j] += dr[j]
    return xr


@njit(nogil=True, cache=True, fastmath=_FAST)
def add_rms_norm(x, delta, w, eps, out):  # pragma: no cover (jit)
    """x += delta (if delta has rows; pass a (0, D) array for none), then out = x / sqrt(mean(x²) + eps) * w.
    x, delta, out (T, D); w (D,)."""
    t, n = x.shape
    for r in range(t):
        xr = _add_row(x, delta, r)
        ss = np.float32(0.0)
        for j in range(n):
            ss += xr[j] * xr[j]
        inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + np.float32(eps)))
        o = out[r]
        for j in range(n):
            o[j] = xr[j] * inv * w[j]


@njit(nogil=True, cache=True, fastmath=_FAST)
def add_layer_norm(x, delta, w, b, eps, out):  # pragma: no cover (jit)
    """x += delta (if delta has rows), then out = (x - mean(x)) / sqrt(var(x) + eps) * w + b (LayerNorm; var is
    the biased variance). x, delta, out (T, D); w, b (D,)."""
    t, n = x.shape
    for r in range(t):
        xr = _add_row(x, delta, r)
        total = np.float32(0.0)
        for j in range(n):
            total += xr[j]
        mean = total / np.float32(n)
        ss = np.float32(0.0)
        for j in range(n):
            c = xr[j] - mean
            ss += c * c
        inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + np.float32(eps)))
        o = out[r]
        for j in range(n):
            o[j] = (xr[j] - mean) * inv * w[j] + b[j]


@njit(inline="always")
def _rope_row(v, cos, sin, half):
    """v[:2·half] <- v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[half:2·half], v[:half]); the dims from
    2·half on (partial rotary) are left alone."""
    for i in range(half):
        a = v[i]
        b = v[i + half]
        v[i] = a * cos[i] - b * sin[i]
        v[i + half] = b * cos[i + half] + a * sin[i + half]


@njit(nogil=True, cache=True)
def rope_and_cache(q, k, v, cos, sin, start, cache_k, cache_v):  # pragma: no cover (jit)
    """Rotate q (T, H, d) in place; rotate k (T, KV, d) and write it and v (T, KV, d) into the layer's cache
    cache_k, cache_v (KV, S_max, d) at positions start..start+T-1. cos, sin: (positions, r) tables, r <= d the
    rotated dims."""
    t, n_heads, d = q.shape
    half = cos.shape[1] // 2
    for r in range(t):
        c = cos[start + r]
        s = sin[start + r]
        for h in range(n_heads):
            _rope_row(q[r, h], c, s, half)
        for h in range(k.shape[1]):
            kr = cache_k[h, start + r]
            kr[:] = k[r, h]
            _rope_row(kr, c, s, half)
            cache_v[h, start + r, :] = v[r, h]


@njit(nogil=True, cache=True)
def cache_write(k, v, start, cache_k, cache_v):  # pragma: no cover (jit)
    """Write k, v (T, KV, d) into the layer's cache (KV, S_max, d) at positions start..start+T-1 (no rotation:
    learned absolute positions)."""
    for r in range(k.shape[0]):
        for h in range(k.shape[1]):
            cache_k[h, start + r, :] = k[r, h]
            cache_v[h, start + r, :] = v[r, h]


@njit(nogil=True, cache=True, fastmath=_FAST)
def attention(q, cache_k, cache_v, start, scale, window, softcap, out):  # pragma: no cover (jit)
    """Causal grouped-query attention. q (T, H, d); cache (KV, S_max, d) holding positions < start + T; query head
    h reads kv head h // (H / KV); token r (position p = start + r) attends to positions s <= p, and with
    window > 0 only to p - window < s. Scores are q·k · scale, then softcap · tanh(score / softcap) if softcap > 0.
    out (T, H·d)."""
    t, n_heads, d = q.shape
    group = n_heads // cache_k.shape[0]
    p = np.empty(start + t, dtype=np.float32)
    for r in range(t):
        n_pos = start + r + 1
        first = max(0, n_pos - window) if window > 0 else 0
        for h in range(n_heads):
            keys = cache_k[h // group]
            values = cache_v[h // group]
            qh = q[r, h]
            top = -np.inf
            for s in range(first, n_pos):
                ks = keys[s]
                acc = np.float32(0.0)
                for i in range(d):
                    acc += qh[i] * ks[i]
                acc *= scale
                if softcap > 0:
                    acc = np.float32(softcap * math.tanh(acc / softcap))
                p[s] = acc
                top = max(top, acc)
            total = np.float32(0.0)
            for s in range(first, n_pos):
                e = np.float32(math.exp(p[s] - top))
                p[s] = e
                total += e
            o = out[r, h * d:(h + 1) * d]
            o[:] = 0.0
            for s in range(first, n_pos):
                ws = p[s] / total
                vs = values[s]
                for i in range(d):
                    o[i] += ws * vs[i]


# Activation ids the kernels take (ACTIVATIONS[cfg.hidden_act]).
SILU, GELU_TANH = 0, 1
ACTIVATIONS = {"silu": SILU, "gelu_tanh": GELU_TANH}
_GELU_C = np.float32(math.sqrt(2.0 / math.pi))  # gelu_tanh(a) = a/2 · (1 + tanh(√(2/π) · (a + 0.044715 a³)))


@njit(inline="always")
def _act(a, kind):
    if kind == GELU_TANH:
        return np.float32(0.5) * a * (np.float32(1.0) + np.float32(
            math.tanh(_GELU_C * (a + np.float32(0.044715) * a * a * a))))
    return a / (np.float32(1.0) + np.float32(math.exp(-a)))


@njit(nogil=True, cache=True, fastmath=_FAST)
def act_mul(g, u, kind):  # pragma: no cover (jit)
    """g <- act(g) * u in place (gated MLP); g, u (T, F); kind SILU or GELU_TANH."""
    t, n = g.shape
    for r in range(t):
        gr = g[r]
        ur = u[r]
        for j in range(n):
            gr[j] = _act(gr[j], kind) * ur[j]


@njit(nogil=True, cache=True, fastmath=_FAST)
def act_inplace(x, kind):  # pragma: no cover (jit)
    """x <- act(x) in place (plain MLP); x (T, F)."""
    t, n = x.shape
    for r in range(t):
        xr = x[r]
        for j in range(n):
            xr[j] = _act(xr[j], kind)
