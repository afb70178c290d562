"""The decoder-only transformer on numpy, with a KV cache: one forward pass for every family, its differences
switched by the config's feature keys (occrt/model/config.py, format_spec/occ.md 4.1).

One forward step, top to bottom (shapes: T new tokens, D hidden, H query heads, KV key/value heads, d head_dim,
F intermediate; bracketed steps run only when their feature is on):

    x = embed[tokens] · embedding_scale                # (T, D)
    [position_type learned]  x += embed_positions[start:start+T]
    for each layer i:
        h = norm(x; attn_norm)                         # rms: x/rms(x)·w;  layer: (x-mean)/std·w + b
        q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ (+ biases)       # (T, H·d), (T, KV·d), (T, KV·d)
        [qk_norm]  q, k = rmsnorm(q; q_norm), rmsnorm(k; k_norm)   # per head, over its d values
        [position_type rope]  q, k = rope_i(q), rope_i(k)   # rotate-half on the leading rotary_dim dims;
                                                       # rope_i = rope_local on sliding layers when given
        cache[i] <- k, v                               # (KV, S, d), S = start + T
        s = q kᵀ · scale                               # scale = query_pre_attn_scalar^-½ (default d^-½)
        [attn_logit_softcapping c]  s = c·tanh(s/c)
        a = softmax(s + causal mask) v                 # grouped: H/KV query heads share one kv head; sliding
                                                       # layers see only the last `sliding_window` positions
        y = a Woᵀ;  [sandwich_norms] y = norm(y; attn_out_norm);  x = x + y
        h = norm(x; mlp_norm)
        m = down(act(gate(h)) ⊙ up(h))   (gated)   or   down(act(up(h)))   (plain);   act silu | gelu_tanh
        [sandwich_norms] m = norm(m; mlp_out_norm);  x = x + m
    logits = norm(x; final) · Wheadᵀ                   # (T, vocab)
    [final_logit_softcapping c]  logits = c·tanh(logits/c)

Linear layers are objects with `__call__(x (T, n_in)) -> (T, n_out)` and `rows(ids)` (occrt/model/linear.py: the
dense and the compact forms); the embedding is one of them (rows dequantized on lookup) and a tied head is the same
object. q/k/v read one `Activation` and gate/up another, so an input rotation they share is computed once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from occrt.kernels import layers as kernels
from occrt.model.config import ModelConfig
from occrt.model.linear import Activation, DenseLinear
from occrt.model.rope import Rotary

__all__ = ["Activation", "DecoderModel", "DenseLinear", "KVCache", "LayerWeights", "Linear", "Norm"]


class Linear(Protocol):
    n_in: int
    n_out: int

    def __call__(self, x: np.ndarray | Activation) -> np.ndarray: ...

    def rows(self, ids: np.ndarray) -> np.ndarray: ...


@dataclass
class Norm:
    """A norm's parameters: w (n,) the multiplier, b (n,) the LayerNorm bias (None for RMSNorm)."""

    w: np.ndarray
    b: np.ndarray | None = None


@dataclass
class LayerWeights:
    attn_norm: Norm  # before attention (HF: input_layernorm)
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    mlp_norm: Norm  # before the MLP (HF: post_attention_layernorm; Gemma: pre_feedforward_layernorm)
    up: Linear
    down: Linear
    gate: Linear | None = None  # mlp_type gated
    q_norm: Norm | None = None  # qk_norm: (d,) per-head RMSNorm
    k_norm: Norm | None = None
    attn_out_norm: Norm | None = None  # sandwich_norms: on the attention output (Gemma: post_attention_layernorm)
    mlp_out_norm: Norm | None = None  # sandwich_norms: on the MLP output (Gemma: post_feedforward_layernorm)


class KVCache:
    """Keys and values of every layer for positions [0, capacity), allocated once. Sliding layers keep every
    position too (the attention skips the ones outside the window), so one index serves all layers."""

    def __init__(self, cfg: ModelConfig, capacity: int):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)  # (L, KV, S_max, d)
        self.v = np.zeros(shape, np.float32)
        self.capacity = capacity
        self.length = 0  # positions filled

    def reset(self) -> None:
        self.length = 0


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(variance + np.float32(eps))) * w


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = np.mean(x, axis=-1, keepdims=True, dtype=np.float32)
    c = x - mean
    variance = np.mean(c * c, axis=-1, keepdims=True, dtype=np.float32)  # biased, as torch's LayerNorm
    return c / np.sqrt(variance + np.float32(eps)) * w + b


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (HF's gelu_new / gelu_pytorch_tanh)."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    if cap is None:
        return x
    c = np.float32(cap)
    return (np.tanh(x / c) * c).astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, scale: float, *, window: int = 0,
              cap: float | None = None) -> np.ndarray:
    """q (T, H, d); k, v (KV, S, d) with S = start + T. Query head j uses kv head j // (H/KV). Token i (position
    start + i) sees positions s <= start + i, and with window > 0 only s > start + i - window. Returns (T, H·d)."""
    t, n_heads, d = q.shape
    n_kv, s = k.shape[0], k.shape[1]
    qg = q.reshape(t, n_kv, n_heads // n_kv, d).transpose(1, 2, 0, 3)  # (KV, G, T, d)
    scores = softcap((qg @ k[:, None].transpose(0, 1, 3, 2)) * np.float32(scale), cap)  # (KV, G, T, S)
    pos = (start + np.arange(t))[:, None]  # (T, 1)
    hidden = np.arange(s)[None, :] > pos  # (T, S)
    if window:
        hidden |= np.arange(s)[None, :] <= pos - window
    scores = np.where(hidden, np.float32(-np.inf), scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ v[:, None]  # (KV, G, T, d)
    return out.transpose(2, 0, 1, 3).reshape(t, n_heads * d)


def _rows(y: np.ndarray) -> np.ndarray:
    """A linear layer's output as the kernels need it: C-contiguous float32 (a no-op for the runtime forms)."""
    return np.ascontiguousarray(y, dtype=np.float32)


class DecoderModel:
    def __init__(self, cfg: ModelConfig, *, embed: Linear | np.ndarray, layers: list[LayerWeights],
                 norm: Norm | np.ndarray, head: Linear, positions: Linear | np.ndarray | None = None):
        self.cfg = cfg
        self.embed = DenseLinear(embed) if isinstance(embed, np.ndarray) else embed  # (vocab, D): rows(tokens)
        self.positions = DenseLinear(positions) if isinstance(positions, np.ndarray) else positions  # (P, D)
        if (cfg.position_type == "learned") != (self.positions is not None):
            raise ValueError("learned positions need the position embedding, and only they do")
        self.layers = layers
        self.norm = norm if isinstance(norm, Norm) else Norm(norm)  # final norm (D,)
        self.head = head  # D -> vocab
        self.scale = np.float32(cfg.attention_scale)
        self.windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
        self.act = kernels.ACTIVATIONS[cfg.hidden_act]
        self._ropes = [cfg.layer_rope(i) for i in range(cfg.num_hidden_layers)]
        self._rotaries: dict[tuple[int, bool], Rotary] = {}  # (id of the rope dict, long context) -> tables

    def rotary(self, layer: int, cache: KVCache) -> Rotary:
        """The rotary tables of `layer` (global or local rope) for a cache's context: longrope picks its long
        factors when the cache holds more than the original training length (the context is set up front, as
        llama.cpp does, so every position of one sequence rotates with the same frequencies)."""
        rope = self._ropes[layer]
        long = rope["type"] == "longrope" and cache.capacity > rope["original_max_position_embeddings"]
        key = (id(rope), long)
        r = self._rotaries.get(key)
        if r is None:
            r = self._rotaries[key] = Rotary(rope, self.cfg.rotary_dims, long=long)
        return r

    def new_cache(self, capacity: int) -> KVCache:
        capacity = min(capacity, self.cfg.max_position_embeddings)
        return KVCache(self.cfg, capacity)

    def _check(self, tokens: np.ndarray, cache: KVCache) -> tuple[np.ndarray, int, int]:
        tokens = np.asarray(tokens, dtype=np.int64)
        t, start = tokens.shape[0], cache.length
        if start + t > cache.capacity:
            raise ValueError(f"context of {start + t} tokens exceeds the cache capacity {cache.capacity}")
        if t == 0:
            raise ValueError("forward needs at least one token")
        return tokens, t, start

    def _embed(self, tokens: np.ndarray, start: int) -> np.ndarray:
        x = np.array(self.embed.rows(tokens), dtype=np.float32)  # (T, D) a fresh array: the residual stream
        if self.cfg.embedding_scale != 1.0:
            x *= np.float32(self.cfg.embedding_scale)
        if self.positions is not None:
            x += self.positions.rows(np.arange(start, start + tokens.shape[0]))
        return x

    # -- the kernel path ------------------------------------------------------------------------------------------
    def _add_norm(self, x: np.ndarray, delta: np.ndarray, norm: Norm, out: np.ndarray) -> None:
        """x += delta (none if it has no rows), out = norm(x)."""
        eps = np.float32(self.cfg.rms_norm_eps)
        if norm.b is None:
            kernels.add_rms_norm(x, delta, norm.w, eps, out)
        else:
            kernels.add_layer_norm(x, delta, norm.w, norm.b, eps, out)

    def _norm_inplace(self, y: np.ndarray, norm: Norm) -> None:
        self._add_norm(y, y[:0], norm, y)  # elementwise after the row's statistics: out may alias x

    def forward(self, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` (T,) after the cache's contents. Returns logits (T, vocab) if all_logits else (vocab,).

        The steps between the matrix products run as numba kernels (occrt.kernels.layers); `reference_forward` is
        the same computation in numpy. The residual stream x is updated in place; each norm feeds the next layers."""
        cfg = self.cfg
        tokens, t, start = self._check(tokens, cache)
        h_, kv_, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = self._embed(tokens, start)  # (T, D) the residual stream
        h = np.empty_like(x)
        self._add_norm(x, x[:0], self.layers[0].attn_norm, h)
        for i, layer in enumerate(self.layers):
            act = Activation(h)  # read by q, k and v
            q = _rows(layer.q(act)).reshape(t, h_, d)  # (T, H, d)
            k = _rows(layer.k(act)).reshape(t, kv_, d)  # (T, KV, d)
            v = _rows(layer.v(act)).reshape(t, kv_, d)
            if layer.q_norm is not None:
                self._norm_inplace(q.reshape(t * h_, d), layer.q_norm)
                self._norm_inplace(k.reshape(t * kv_, d), layer.k_norm)
            if cfg.position_type == "rope":
                rotary = self.rotary(i, cache)
                rotary.ensure(start + t)
                kernels.rope_and_cache(q, k, v, rotary.cos, rotary.sin, start, cache.k[i], cache.v[i])
            else:
                kernels.cache_write(k, v, start, cache.k[i], cache.v[i])
            a = np.empty((t, h_ * d), dtype=np.float32)  # (T, H·d)
            kernels.attention(q, cache.k[i], cache.v[i], start, self.scale, self.windows[i],
                              np.float32(cfg.attn_logit_softcapping or 0.0), a)
            y = _rows(layer.o(a))  # (T, D)
            if layer.attn_out_norm is not None:
                self._norm_inplace(y, layer.attn_out_norm)
            h = np.empty_like(x)
            self._add_norm(x, y, layer.mlp_norm, h)  # x += y, h = mlp_norm(x)
            act = Activation(h)  # read by gate and up
            u = _rows(layer.up(act))  # (T, F)
            if layer.gate is not None:
                g = _rows(layer.gate(act))
                kernels.act_mul(g, u, self.act)  # g <- act(g) * u
                u = g
            else:
                kernels.act_inplace(u, self.act)
            y = _rows(layer.down(u))  # (T, D)
            if layer.mlp_out_norm is not None:
                self._norm_inplace(y, layer.mlp_out_norm)
            h = np.empty_like(x)
            norm = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            self._add_norm(x, y, norm, h)  # x += y, h = next norm(x)
        cache.length = start + t
        logits = softcap(self.head(h if all_logits else h[-1:]), cfg.final_logit_softcapping)  # (T or 1, vocab)
        return logits if all_logits else logits[0]

    # -- the numpy reference --------------------------------------------------------------------------------------
    def _norm(self, x: np.ndarray, norm: Norm) -> np.ndarray:
        eps = self.cfg.rms_norm_eps
        return rms_norm(x, norm.w, eps) if norm.b is None else layer_norm(x, norm.w, norm.b, eps)

    def reference_forward(self, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """`forward` in plain numpy (the reference its kernels are tested against)."""
        cfg = self.cfg
        tokens, t, start = self._check(tokens, cache)
        x = self._embed(tokens, start)  # (T, D) float32
        h_, kv_, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        act = ACTIVATIONS[cfg.hidden_act]
        for i, layer in enumerate(self.layers):
            h = Activation(self._norm(x, layer.attn_norm))  # read by q, k and v
            q = layer.q(h).reshape(t, h_, d)  # (T, H, d)
            k = layer.k(h).reshape(t, kv_, d)  # (T, KV, d)
            v = layer.v(h).reshape(t, kv_, d)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            if cfg.position_type == "rope":
                rotary = self.rotary(i, cache)
                q, k = rotary.apply(q, start), rotary.apply(k, start)
            cache.k[i, :, start:start + t] = k.transpose(1, 0, 2)
            cache.v[i, :, start:start + t] = v.transpose(1, 0, 2)
            a = attention(q, cache.k[i, :, :start + t], cache.v[i, :, :start + t], start, self.scale,
                          window=self.windows[i], cap=cfg.attn_logit_softcapping)  # (T, H·d)
            y = layer.o(a)
            x = x + (y if layer.attn_out_norm is None else self._norm(y, layer.attn_out_norm))
            h = Activation(self._norm(x, layer.mlp_norm))  # read by gate and up
            m = act(layer.up(h)) if layer.gate is None else act(layer.gate(h)) * layer.up(h)
            y = layer.down(m)
            x = x + (y if layer.mlp_out_norm is None else self._norm(y, layer.mlp_out_norm))
        cache.length = start + t
        if not all_logits:
            x = x[-1:]
        logits = softcap(self.head(self._norm(x, self.norm)), cfg.final_logit_softcapping)  # (T or 1, vocab)
        return logits if all_logits else logits[0]
