"""The forward pass's numba kernels (occrt.kernels.layers) against their numpy references in occrt.model, and the
whole `forward` against `reference_forward`."""
from __future__ import annotations

import numpy as np
import pytest

import occrt
from occrt.kernels import layers as K
from occrt.model.decoder import attention, gelu_tanh, layer_norm, rms_norm, silu
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


@pytest.mark.parametrize("t", [1, 5])
def test_add_layer_norm(t):
    rng = np.random.default_rng(t)
    x = (3 + rng.standard_normal((t, 48))).astype(np.float32)  # an offset mean, which LayerNorm removes
    delta = rng.standard_normal((t, 48)).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(48)).astype(np.float32)
    b = (0.2 * rng.standard_normal(48)).astype(np.float32)
    out = np.empty_like(x)
    ref_x = x + delta
    K.add_layer_norm(x, delta, w, b, np.float32(1e-5), out)
    assert np.array_equal(x, ref_x)
    _close(out, layer_norm(ref_x, w, b, 1e-5), 1e-5)
    K.add_layer_norm(x, x[:0], w, b, np.float32(1e-5), x)  # in place, no delta
    _close(x, layer_norm(ref_x, w, b, 1e-5), 1e-5)


@pytest.mark.parametrize("act,ref", [(K.SILU, silu), (K.GELU_TANH, gelu_tanh)])
def test_activations(act, ref):
    rng = np.random.default_rng(0)
    g = (4 * rng.standard_normal((3, 40))).astype(np.float32)
    u = rng.standard_normal((3, 40)).astype(np.float32)
    want = ref(g) * u
    x = g.copy()
    K.act_inplace(x, act)
    _close(x, ref(g))
    K.act_mul(g, u, act)
    _close(g, want)


def test_gelu_tanh_is_the_tanh_approximation():
    # GELU(x) = x·Φ(x); the tanh form is within 1e-3 of it (Hendrycks & Gimpel 2016)
    import math

    x = np.linspace(-5, 5, 101).astype(np.float32)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    assert np.abs(gelu_tanh(x) - exact).max() < 1e-3
    assert gelu_tanh(np.float32([1.0]))[0] == pytest.approx(0.8411920, abs=1e-6)


@pytest.mark.parametrize("start,t,window,cap,rotated", [(0, 1, 0, 0, 16), (0, 6, 0, 0, 16), (5, 1, 0, 0, 16),
                                                        (5, 4, 0, 0, 16), (5, 4, 3, 0, 16), (0, 6, 2, 0, 8),
                                                        (5, 1, 4, 1.5, 16), (5, 4, 0, 1.5, 12)])
def test_rope_cache_and_attention(start, t, window, cap, rotated):
    rng = np.random.default_rng(start * 10 + t)
    n_heads, n_kv, d, s_max = 6, 2, 16, 12
    rotary = Rotary({"type": "yarn", "theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8},
                    rotated)
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
    if rotated < d:
        assert np.array_equal(q[..., rotated:], ref_q[..., rotated:])  # partial rotary: the rest passes through
    scale = np.float32(1 / np.sqrt(d))
    ref = attention(ref_q, ref_ck[:, :start + t], ref_cv[:, :start + t], start, scale, window=window,
                    cap=cap or None)
    out = np.empty((t, n_heads * d), np.float32)
    K.attention(q, cache_k, cache_v, start, scale, window, np.float32(cap), out)
    _close(out, ref, rtol=1e-5)


def test_sliding_window_hides_old_positions():
    """With window w a query sees exactly its last w positions: changing an older key or value changes nothing."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    k = rng.standard_normal((2, 10, 8)).astype(np.float32)
    v = rng.standard_normal((2, 10, 8)).astype(np.float32)
    out = [np.empty((1, 16), np.float32) for _ in range(3)]
    K.attention(q, k, v, 9, np.float32(0.3), 4, np.float32(0), out[0])  # position 9 sees 6..9
    k2, v2 = k.copy(), v.copy()
    k2[:, :6] += 5.0
    v2[:, :6] -= 5.0
    K.attention(q, k2, v2, 9, np.float32(0.3), 4, np.float32(0), out[1])
    assert np.array_equal(out[0], out[1])
    k2[:, 6] += 5.0
    K.attention(q, k2, v2, 9, np.float32(0.3), 4, np.float32(0), out[2])
    assert not np.allclose(out[0], out[2])


def test_cache_write_copies_without_rotation():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, 2, 8)).astype(np.float32)
    v = rng.standard_normal((3, 2, 8)).astype(np.float32)
    ck, cv = np.zeros((2, 6, 8), np.float32), np.zeros((2, 6, 8), np.float32)
    K.cache_write(k, v, 2, ck, cv)
    assert np.array_equal(ck[:, 2:5], k.transpose(1, 0, 2)) and np.array_equal(cv[:, 2:5], v.transpose(1, 0, 2))
    assert not ck[:, :2].any() and not ck[:, 5:].any()


def test_forward_matches_reference_forward(tiny_occ):
    model = occrt.load(tiny_occ)
    net = model.network
    ids = np.array([1, 17, 5, 93, 200, 41, 7, 7, 150, 3])
    c1, c2 = net.new_cache(16), net.new_cache(16)
    _close(net.forward(ids[:7], c1, all_logits=True), net.reference_forward(ids[:7], c2, all_logits=True), 1e-5)
    for token in ids[7:]:
        _close(net.forward([token], c1), net.reference_forward([token], c2), 1e-5)
    assert c1.length == c2.length == 10


def _random_decoder(seed: int, **features):
    """A DecoderModel on random weights with the given config features (no checkpoint needed)."""
    from occrt.model.config import ModelConfig
    from occrt.model.decoder import DecoderModel, DenseLinear, LayerWeights, Norm
    from occrt.model.loader import tensor_shapes

    cfg = ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=False, **features)
    cfg.validate()
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            w[name] = ((1 if name.endswith("norm.weight") else 0) + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)

    def lin(p):
        return DenseLinear(w[p + ".weight"], w.get(p + ".bias"))

    def norm(p):
        return Norm(w[p + ".weight"], w.get(p + ".bias")) if p + ".weight" in w else None

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sandwich = cfg.sandwich_norms
        layers.append(LayerWeights(
            attn_norm=norm(p + "input_layernorm"), q=lin(p + "self_attn.q_proj"), k=lin(p + "self_attn.k_proj"),
            v=lin(p + "self_attn.v_proj"), o=lin(p + "self_attn.o_proj"),
            mlp_norm=norm(p + ("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm")),
            up=lin(p + "mlp.up_proj"), down=lin(p + "mlp.down_proj"),
            gate=lin(p + "mlp.gate_proj") if cfg.mlp_type == "gated" else None,
            q_norm=norm(p + "self_attn.q_norm"), k_norm=norm(p + "self_attn.k_norm"),
            attn_out_norm=norm(p + "post_attention_layernorm") if sandwich else None,
            mlp_out_norm=norm(p + "post_feedforward_layernorm") if sandwich else None))
    return DecoderModel(cfg, embed=w["model.embed_tokens.weight"], layers=layers, norm=norm("model.norm"),
                        head=lin("lm_head"), positions=w.get("model.embed_positions.weight"))


FEATURES = {
    # Gemma-like: everything Gemma 2/3 switch on
    "gemma_like": dict(hidden_act="gelu_tanh", qk_norm=True, sandwich_norms=True, embedding_scale=5.656854,
                       attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=20.0,
                       sliding_window=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                       rope={"type": "default", "theta": 500.0}, rope_local={"type": "default", "theta": 50.0}),
    "gpt2_like": dict(norm_type="layer", mlp_type="plain", hidden_act="gelu_tanh", position_type="learned",
                      attention_bias=True, mlp_bias=True),
    "phi_like": dict(rotary_dim=8, sliding_window=4, layer_types=["sliding_attention"] * 3, attention_bias=True,
                     attention_out_bias=False,
                     rope={"type": "longrope", "theta": 1e4, "short_factor": [1.0, 1.5, 2.0, 3.0],
                           "long_factor": [2.0, 4.0, 8.0, 16.0], "original_max_position_embeddings": 8,
                           "attention_factor": 1.2}),
}


@pytest.mark.parametrize("features", sorted(FEATURES))
def test_every_feature_kernels_match_reference_and_torch(features):
    """Each feature switched on at once: the kernel forward, the numpy reference and the torch path agree on a
    prefill and on decode steps past the window; and each feature changes the logits (none is silently ignored)."""
    net = _random_decoder(0, **FEATURES[features])
    ids = np.array([3, 17, 5, 40, 22, 8, 8, 1, 30, 12, 49, 0])
    c1, c2 = net.new_cache(16), net.new_cache(16)
    _close(net.forward(ids[:5], c1, all_logits=True), net.reference_forward(ids[:5], c2, all_logits=True), 1e-5)
    for token in ids[5:]:
        _close(net.forward([token], c1), net.reference_forward([token], c2), 1e-5)
    full = net.forward(ids, net.new_cache(16), all_logits=True)
    torch = pytest.importorskip("torch")  # noqa: F841
    from occrt.model.decoder_torch import TorchDecoder

    tch = TorchDecoder.from_model(net, "cpu")
    _close(tch.forward(ids, tch.new_cache(16), all_logits=True), full, 1e-5)
    for key, value in FEATURES[features].items():
        if key in ("attention_bias", "mlp_bias", "norm_type", "mlp_type", "position_type", "layer_types",
                   "attention_out_bias"):
            continue  # these change which tensors exist: not switchable on the same weights
        off = {**FEATURES[features]}
        off.pop(key)
        if key == "sliding_window":
            off.pop("layer_types")
        if key == "rope" or (key == "rotary_dim" and "rope" in off):
            continue  # rope factors are sized by rotary_dim: not switchable alone
        other = _random_decoder(0, **off)
        assert np.abs(other.forward(ids, other.new_cache(16), all_logits=True) - full).max() > 1e-3, key
