"""The forward pass's numba kernels (occrt.kernels.layers) against their numpy references in occrt.model, and the
whole `forward` against `reference_forward`."""
from __future__ import annotations

import numpy as np
import pytest

import occrt
from occrt.kernels import layers as K
from occrt.model.llama import LlamaModel, rms_norm, silu
from occrt.model.rope import Rotary


def _close(got, ref, rtol=2e-6):
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= rtol * max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("t", [1, 5])
def test_add_rms_norm(t):
    rng = np.random.default_rng(t)
    x = rng.standard_normal((t, 48)).astype(np.float32)
    delta = rng.standard_normal((t, 48)).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(48)).astype(np.float32)
    out = np.empty_like(x)
    ref_x = x + delta
    K.add_rms_norm(x, delta, w, np.float32(1e-5), out)
    assert np.array_equal(x, ref_x)
    _close(out, rms_norm(ref_x, w, 1e-5))
    K.add_rms_norm(x, x[:0], w, np.float32(1e-5), out)  # no delta: only the norm
    assert np.array_equal(x, ref_x)
    _close(out, rms_norm(ref_x, w, 1e-5))


def test_silu_mul():
    rng = np.random.default_rng(0)
    g = (4 * rng.standard_normal((3, 40))).astype(np.float32)
    u = rng.standard_normal((3, 40)).astype(np.float32)
    ref = silu(g) * u
    K.silu_mul(g, u)
    _close(g, ref)


@pytest.mark.parametrize("start,t", [(0, 1), (0, 6), (5, 1), (5, 4)])
def test_rope_cache_and_attention(start, t):
    rng = np.random.default_rng(start * 10 + t)
    n_heads, n_kv, d, s_max = 6, 2, 16, 12
    rotary = Rotary({"type": "yarn", "theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8}, d)
    rotary.ensure(start + t)
    cache_k = rng.standard_normal((n_kv, s_max, d)).astype(np.float32)  # positions < start: earlier tokens
    cache_v = rng.standard_normal((n_kv, s_max, d)).astype(np.float32)
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    k = rng.standard_normal((t, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((t, n_kv, d)).astype(np.float32)
    ref_q, ref_k = rotary.apply(q, start), rotary.apply(k, start)
    ref_ck, ref_cv = cache_k.copy(), cache_v.copy()
    ref_ck[:, start:start + t] = ref_k.transpose(1, 0, 2)
    ref_cv[:, start:start + t] = v.transpose(1, 0, 2)
    K.rope_and_cache(q, k, v, rotary.cos, rotary.sin, start, cache_k, cache_v)
    _close(q, ref_q)
    _close(cache_k, ref_ck)
    assert np.array_equal(cache_v, ref_cv)
    scale = np.float32(1 / np.sqrt(d))
    model = LlamaModel.__new__(LlamaModel)  # only _attention's scale is needed
    model.scale = scale
    ref = model._attention(ref_q, ref_ck[:, :start + t], ref_cv[:, :start + t], start)
    out = np.empty((t, n_heads * d), np.float32)
    K.attention(q, cache_k, cache_v, start, scale, out)
    _close(out, ref, rtol=1e-5)


def test_forward_matches_reference_forward(tiny_occ):
    model = occrt.load(tiny_occ)
    net = model.network
    ids = np.array([1, 17, 5, 93, 200, 41, 7, 7, 150, 3])
    c1, c2 = net.new_cache(16), net.new_cache(16)
    _close(net.forward(ids[:7], c1, all_logits=True), net.reference_forward(ids[:7], c2, all_logits=True), 1e-5)
    for token in ids[7:]:
        _close(net.forward([token], c1), net.reference_forward([token], c2), 1e-5)
    assert c1.length == c2.length == 10
