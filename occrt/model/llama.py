"""The Llama-family decoder (Llama 2/3, Mistral without sliding window, SmolLM2) on numpy, with a KV cache.

One forward step, top to bottom (shapes: T new tokens, D hidden, H query heads, KV key/value heads, d head_dim):

    x = embed[tokens]                                  # (T, D)
    for each layer:
        h = rmsnorm(x) * w_in                          # (T, D)
        q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ                  # (T, H·d), (T, KV·d), (T, KV·d)
        q, k = rope(q), rope(k)                        # rotate-half convention, positions start..start+T-1
        cache[layer] <- k, v                           # (KV, S, d), S = start + T
        a = softmax(q kᵀ/√d + causal) v                # grouped: H/KV query heads share one kv head
        x = x + a Woᵀ                                  # (T, D)
        h = rmsnorm(x) * w_post
        x = x + (silu(h Wgᵀ) ⊙ h Wuᵀ) Wdᵀ              # (T, D)
    logits = rmsnorm(x) * w_norm · Wheadᵀ              # (T, vocab)

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

__all__ = ["Activation", "DenseLinear", "KVCache", "LayerWeights", "Linear", "LlamaModel"]


class Linear(Protocol):
    n_in: int
    n_out: int

    def __call__(self, x: np.ndarray | Activation) -> np.ndarray: ...

    def rows(self, ids: np.ndarray) -> np.ndarray: ...


@dataclass
class LayerWeights:
    input_norm: np.ndarray  # (D,)
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: np.ndarray  # (D,)
    gate: Linear
    up: Linear
    down: Linear


class KVCache:
    """Keys and values of every layer for positions [0, capacity), allocated once."""

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


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def _rows(y: np.ndarray) -> np.ndarray:
    """A linear layer's output as the kernels need it: C-contiguous float32 (a no-op for the runtime forms)."""
    return np.ascontiguousarray(y, dtype=np.float32)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, *, embed: Linear | np.ndarray, layers: list[LayerWeights],
                 norm: np.ndarray, head: Linear):
        self.cfg = cfg
        self.embed = DenseLinear(embed) if isinstance(embed, np.ndarray) else embed  # (vocab, D): rows(tokens)
        self.layers = layers
        self.norm = norm  # (D,)
        self.head = head  # D -> vocab
        self.rotary = Rotary(cfg.rope, cfg.head_dim)
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))

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

    def forward(self, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` (T,) after the cache's contents. Returns logits (T, vocab) if all_logits else (vocab,).

        The steps between the matrix products run as numba kernels (occrt.kernels.layers); `reference_forward` is
        the same computation in numpy. The residual stream x is updated in place; each norm feeds the next layers."""
        cfg = self.cfg
        tokens, t, start = self._check(tokens, cache)
        h_, kv_, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = np.float32(cfg.rms_norm_eps)
        self.rotary.ensure(start + t)
        x = np.ascontiguousarray(self.embed.rows(tokens), dtype=np.float32)  # (T, D) the residual stream
        h = np.empty_like(x)
        kernels.add_rms_norm(x, x[:0], self.layers[0].input_norm, eps, h)
        for i, layer in enumerate(self.layers):
            act = Activation(h)  # read by q, k and v
            q = _rows(layer.q(act)).reshape(t, h_, d)  # (T, H, d)
            k = _rows(layer.k(act)).reshape(t, kv_, d)  # (T, KV, d)
            v = _rows(layer.v(act)).reshape(t, kv_, d)
            kernels.rope_and_cache(q, k, v, self.rotary.cos, self.rotary.sin, start, cache.k[i], cache.v[i])
            a = np.empty((t, h_ * d), dtype=np.float32)  # (T, H·d)
            kernels.attention(q, cache.k[i], cache.v[i], start, self.scale, a)
            h = np.empty_like(x)
            kernels.add_rms_norm(x, _rows(layer.o(a)), layer.post_norm, eps, h)  # x += o(a)
            act = Activation(h)  # read by gate and up
            g = _rows(layer.gate(act))  # (T, F)
            kernels.silu_mul(g, _rows(layer.up(act)))
            h = np.empty_like(x)
            norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            kernels.add_rms_norm(x, _rows(layer.down(g)), norm, eps, h)  # x += down(...), h = next norm
        cache.length = start + t
        logits = self.head(h if all_logits else h[-1:])  # (T or 1, vocab)
        return logits if all_logits else logits[0]

    def reference_forward(self, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """`forward` in plain numpy (the reference its kernels are tested against)."""
        cfg = self.cfg
        tokens, t, start = self._check(tokens, cache)
        x = self.embed.rows(tokens)  # (T, D) float32
        h_, kv_, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for i, layer in enumerate(self.layers):
            h = Activation(rms_norm(x, layer.input_norm, cfg.rms_norm_eps))  # read by q, k and v
            q = self.rotary.apply(layer.q(h).reshape(t, h_, d), start)  # (T, H, d)
            k = self.rotary.apply(layer.k(h).reshape(t, kv_, d), start)  # (T, KV, d)
            v = layer.v(h).reshape(t, kv_, d)
            cache.k[i, :, start:start + t] = k.transpose(1, 0, 2)
            cache.v[i, :, start:start + t] = v.transpose(1, 0, 2)
            a = self._attention(q, cache.k[i, :, :start + t], cache.v[i, :, :start + t], start)  # (T, H·d)
            x = x + layer.o(a)
            h = Activation(rms_norm(x, layer.post_norm, cfg.rms_norm_eps))  # read by gate and up
            x = x + layer.down(silu(layer.gate(h)) * layer.up(h))
        cache.length = start + t
        if not all_logits:
            x = x[-1:]
        logits = self.head(rms_norm(x, self.norm, cfg.rms_norm_eps))  # (T or 1, vocab)
        return logits if all_logits else logits[0]

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
        # q (T, H, d); k, v (KV, S, d) with S = start + T. Query head j uses kv head j // (H/KV).
        t, n_heads, d = q.shape
        n_kv, s = k.shape[0], k.shape[1]
        qg = q.reshape(t, n_kv, n_heads // n_kv, d).transpose(1, 2, 0, 3)  # (KV, G, T, d)
        scores = (qg @ k[:, None].transpose(0, 1, 3, 2)) * self.scale  # (KV, G, T, S)
        if t > 1:
            # token i (at position start+i) sees positions <= start+i
            mask = np.arange(s)[None, :] > (start + np.arange(t))[:, None]  # (T, S)
            scores = np.where(mask, np.float32(-np.inf), scores)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = p @ v[:, None]  # (KV, G, T, d)
        return out.transpose(2, 0, 1, 3).reshape(t, n_heads * d)

