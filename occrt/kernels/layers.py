"""The small per-layer steps of the Llama forward pass as numba kernels: norm, rotary + KV-cache write, attention,
gated activation. Each replaces a handful of numpy calls: decoding one token runs ~50 numpy operations per layer
outside the matrix products, and at a few microseconds each they cost ~3 ms a token on SmolLM2 (30 layers), a third
of the step. Their numpy references are the functions in occrt/model/llama.py and occrt/model/rope.py
(`rms_norm`, `silu`, `Rotary.apply`, `LlamaModel._attention`); tests/test_layer_kernels.py checks them against it.

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
def add_rms_norm(x, delta, w, eps, out):  # pragma: no cover (jit)
    """x += delta (if delta has rows; pass a (0, D) array for none), then out = x / sqrt(mean(x²) + eps) * w.
    x, delta, out (T, D); w (D,)."""
    t, n = x.shape
    for r in range(t):
        xr = x[r]
        if delta.shape[0]:
            dr = delta[r]
            for j in range(n):
                xr[j] += dr[j]
        ss = np.float32(0.0)
        for j in range(n):
            ss += xr[j] * xr[j]
        inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + np.float32(eps)))
        o = out[r]
        for j in range(n):
            o[j] = xr[j] * inv * w[j]


@njit(inline="always")
def _rope_row(v, cos, sin, half):
    """v (d,) <- v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[half:], v[:half])."""
    for i in range(half):
        a = v[i]
        b = v[i + half]
        v[i] = a * cos[i] - b * sin[i]
        v[i + half] = b * cos[i + half] + a * sin[i + half]


@njit(nogil=True, cache=True)
def rope_and_cache(q, k, v, cos, sin, start, cache_k, cache_v):  # pragma: no cover (jit)
    """Rotate q (T, H, d) in place; rotate k (T, KV, d) and write it and v (T, KV, d) into the layer's cache
    cache_k, cache_v (KV, S_max, d) at positions start..start+T-1. cos, sin: (positions, d) tables."""
    t, n_heads, d = q.shape
    half = d // 2
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


@njit(nogil=True, cache=True, fastmath=_FAST)
def attention(q, cache_k, cache_v, start, scale, out):  # pragma: no cover (jit)
    """Causal grouped-query attention. q (T, H, d); cache (KV, S_max, d) holding positions < start + T; query head
    h reads kv head h // (H / KV); token r attends to positions <= start + r. out (T, H·d)."""
    t, n_heads, d = q.shape
    group = n_heads // cache_k.shape[0]
    p = np.empty(start + t, dtype=np.float32)
    for r in range(t):
        n_pos = start + r + 1
        for h in range(n_heads):
            keys = cache_k[h // group]
            values = cache_v[h // group]
            qh = q[r, h]
            top = -np.inf
            for s in range(n_pos):
                ks = keys[s]
                acc = np.float32(0.0)
                for i in range(d):
                    acc += qh[i] * ks[i]
                acc *= scale
                p[s] = acc
                top = max(top, acc)
            total = np.float32(0.0)
            for s in range(n_pos):
                e = np.float32(math.exp(p[s] - top))
                p[s] = e
                total += e
            o = out[r, h * d:(h + 1) * d]
            o[:] = 0.0
            for s in range(n_pos):
                ws = p[s] / total
                vs = values[s]
                for i in range(d):
                    o[i] += ws * vs[i]


@njit(nogil=True, cache=True, fastmath=_FAST)
def silu_mul(g, u):  # pragma: no cover (jit)
    """g <- silu(g) * u = g / (1 + exp(-g)) * u, in place; g, u (T, F)."""
    t, n = g.shape
    for r in range(t):
        gr = g[r]
        ur = u[r]
        for j in range(n):
            a = gr[j]
            gr[j] = a / (np.float32(1.0) + np.float32(math.exp(-a))) * ur[j]
