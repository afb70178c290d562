"""The CUDA path: the same forward pass as occrt/model/decoder.py (every family's feature keys), in torch, from the
same compact weights.

`TorchDecoder.from_model(model, device)` moves a loaded `DecoderModel` to a torch device: compact codes go over as they
are (int8/int16 tensors, int4 still packed two per byte), with their row/column multipliers, structural factors and
rotation specs; raw weights as float32 tensors. Per call, a compact layer computes

    x_r = Q_in x (TorchHadamard, memoized per spec in the step's Activation);   x_b = b ⊙ x_r
    y   = Q_outᵀ ((x_b Cᵀ) ⊙ m + (x_r Vᵀ) Uᵀ) + bias

where x_b Cᵀ is a GEMM on codes widened to float32 a tile of rows at a time (a bounded scratch, never the whole
float matrix). Everything is float32, so logits agree with the numpy runtime to float32 rounding. The tests run this
module with torch on the CPU (device "torch-cpu" of `occrt.load`), so it is covered where no GPU is.

torch is imported here only; the numpy runtime never imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from occrt.kernels.hadamard import TorchHadamard
from occrt.model.config import ModelConfig
from occrt.model.decoder import DecoderModel, Norm
from occrt.model.linear import Activation, DenseLinear, EcsqLinear
from occrt.model.rope import Rotary

TILE_ELEMENTS = 1 << 22  # codes widened to float32 per GEMM tile (16 MB)


def _tensor(a: np.ndarray | None, device) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.array(a)).to(device)  # np.array: a writable copy


def _input(x) -> Activation:
    return x if isinstance(x, Activation) else Activation(x)


class TorchDense:
    def __init__(self, form: DenseLinear, device):
        self.w = _tensor(np.asarray(form.w, dtype=np.float32), device)  # (n_out, n_in)
        self.b = _tensor(form.b, device)
        self.n_out, self.n_in = form.n_out, form.n_in

    def __call__(self, x) -> torch.Tensor:
        y = _input(x).x @ self.w.T
        return y if self.b is None else y + self.b

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w[ids]


class TorchEcsq:
    def __init__(self, form: EcsqLinear, device, hadamards: dict):
        self.kind = form.kind
        self.codes = _tensor(form.codes, device)  # (n_out, n_in) int8/16/32, or (n_out, ceil(n_in/2)) uint8 packed
        self.n_out, self.n_in = form.n_out, form.n_in
        self.m = _tensor(form.m, device)  # (n_out,)
        self.col = _tensor(form.col, device)
        self.u, self.v = _tensor(form.u, device), _tensor(form.v, device)
        self.b = _tensor(form.b, device)
        self.rot_in, self.rot_out = form.rot_in, form.rot_out
        self._q_in = None if form.rot_in is None else hadamards.setdefault(form.rot_in,
                                                                          TorchHadamard(form.rot_in, device))
        self._q_out = None if form.rot_out is None else hadamards.setdefault(form.rot_out,
                                                                            TorchHadamard(form.rot_out, device))
        self._tile = max(1, TILE_ELEMENTS // max(self.n_in, 1))

    def _dequantized(self, r0: int, r1: int) -> torch.Tensor:
        """m ⊙ C[r0:r1] as float32 (rows, n_in)."""
        c = self.codes[r0:r1]
        if self.kind == "int4":
            low = (c << 4).view(torch.int8) >> 4  # uint8 << 4 wraps: the low nibble at the top, then sign-extended
            high = c.view(torch.int8) >> 4
            c = torch.cat([low, high], dim=1)[:, :self.n_in]
        return c.to(torch.float32) * self.m[r0:r1, None]

    def __call__(self, x) -> torch.Tensor:
        act = _input(x)
        x_r = act.x if self._q_in is None else act.rotated(self.rot_in, self._q_in.rotate)  # (T, n_in)
        x_b = x_r if self.col is None else x_r * self.col
        y = torch.cat([x_b @ self._dequantized(r0, min(r0 + self._tile, self.n_out)).T
                       for r0 in range(0, self.n_out, self._tile)], dim=1)  # (T, n_out)
        if self.u is not None:
            y = y + (x_r @ self.v.T) @ self.u.T
        if self._q_out is not None:
            y = self._q_out.unrotate(y)
        return y if self.b is None else y + self.b

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self._q_out is not None:  # W[i] = (Q_out e_i)ᵀ W_r Q_in: a dense combination of all rows
            e = torch.zeros((ids.shape[0], self.n_out), dtype=torch.float32, device=ids.device)
            e[torch.arange(ids.shape[0], device=ids.device), ids] = 1.0
            e = self._q_out.rotate(e)
            w_r = sum(e[:, r0:r0 + self._tile] @ self._dequantized(r0, min(r0 + self._tile, self.n_out))
                      for r0 in range(0, self.n_out, self._tile))
            low_rank = None if self.u is None else (e @ self.u) @ self.v
        else:
            c = self.codes[ids]
            if self.kind == "int4":
                c = torch.cat([(c << 4).view(torch.int8) >> 4, c.view(torch.int8) >> 4], dim=1)[:, :self.n_in]
            w_r = c.to(torch.float32) * self.m[ids, None]
            low_rank = None if self.u is None else self.u[ids] @ self.v
        if self.col is not None:
            w_r = w_r * self.col
        if low_rank is not None:
            w_r = w_r + low_rank
        return w_r if self._q_in is None else self._q_in.unrotate(w_r)


def torch_form(form: Any, device, hadamards: dict):
    if isinstance(form, EcsqLinear):
        return TorchEcsq(form, device, hadamards)
    if isinstance(form, DenseLinear):
        return TorchDense(form, device)
    raise TypeError(f"no torch form for {type(form).__name__}")


class TorchKVCache:
    """Keys and values of every layer for positions [0, capacity), allocated once on the device."""

    def __init__(self, cfg: ModelConfig, capacity: int, device):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32, device=device)  # (L, KV, S_max, d)
        self.v = torch.zeros(shape, dtype=torch.float32, device=device)
        self.capacity = capacity
        self.length = 0

    def reset(self) -> None:
        self.length = 0


@dataclass
class TorchNorm:
    w: torch.Tensor  # (n,)
    b: torch.Tensor | None  # (n,) LayerNorm's bias, None for RMSNorm


def _norm(n: Norm | None, device) -> TorchNorm | None:
    return None if n is None else TorchNorm(_tensor(n.w, device), _tensor(n.b, device))


class TorchDecoder:
    """`DecoderModel`'s interface (new_cache, forward -> numpy logits) running on a torch device."""

    def __init__(self, cfg: ModelConfig, *, embed, layers: list[dict], norm: TorchNorm, head, positions, device):
        self.cfg, self.embed, self.layers, self.norm, self.head = cfg, embed, layers, norm, head
        self.positions = positions
        self.device = torch.device(device)
        self.scale = cfg.attention_scale
        self.windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
        self._ropes = [cfg.layer_rope(i) for i in range(cfg.num_hidden_layers)]
        self._tables: dict[tuple[int, bool], tuple[Rotary, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_model(cls, model: DecoderModel, device) -> "TorchDecoder":
        hadamards: dict = {}  # spec -> TorchHadamard, shared by the layers of one input space
        forms: dict[int, Any] = {}  # id(numpy form) -> torch form: a tied head stays the embedding's object

        def conv(form):
            if form is None:
                return None
            if id(form) not in forms:
                forms[id(form)] = torch_form(form, device, hadamards)
            return forms[id(form)]

        layers = [{**{n: _norm(getattr(lw, n), device) for n in ("attn_norm", "mlp_norm", "q_norm", "k_norm",
                                                                  "attn_out_norm", "mlp_out_norm")},
                   **{n: conv(getattr(lw, n)) for n in ("q", "k", "v", "o", "gate", "up", "down")}}
                  for lw in model.layers]
        return cls(model.cfg, embed=conv(model.embed), layers=layers, norm=_norm(model.norm, device),
                   head=conv(model.head), positions=conv(model.positions), device=device)

    def new_cache(self, capacity: int) -> TorchKVCache:
        capacity = min(capacity, self.cfg.max_position_embeddings)
        return TorchKVCache(self.cfg, capacity, self.device)

    def _rotary(self, layer: int, cache: TorchKVCache, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables (positions, rotary dims) of `layer` for `cache`'s context (as DecoderModel.rotary)."""
        rope = self._ropes[layer]
        long = rope["type"] == "longrope" and cache.capacity > rope["original_max_position_embeddings"]
        key = (id(rope), long)
        if key not in self._tables:
            self._tables[key] = (Rotary(rope, self.cfg.rotary_dims, long=long), None, None)
        rotary, cos, sin = self._tables[key]
        if cos is None or cos.shape[0] < n_positions:
            rotary.ensure(max(n_positions, cache.capacity))
            cos = torch.from_numpy(rotary.cos).to(self.device)
            sin = torch.from_numpy(rotary.sin).to(self.device)
            self._tables[key] = (rotary, cos, sin)
        return cos, sin

    def _norm(self, x: torch.Tensor, n: TorchNorm) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        if n.b is None:
            return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * n.w
        c = x - x.mean(dim=-1, keepdim=True)
        return c / torch.sqrt((c * c).mean(dim=-1, keepdim=True) + eps) * n.w + n.b

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.hidden_act == "gelu_tanh":
            return torch.nn.functional.gelu(x, approximate="tanh")
        return x * torch.sigmoid(x)

    @staticmethod
    def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
        return x if cap is None else torch.tanh(x / cap) * cap

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        """x (T, heads, d): rotate-half on the leading cos.shape[1] dims, as occrt.model.rope."""
        t, r = x.shape[0], cos.shape[1]
        half = r // 2
        c = cos[start:start + t, None, :]
        s = sin[start:start + t, None, :]
        xr = x[..., :r]
        rotated = xr * c + torch.cat([-xr[..., half:], xr[..., :half]], dim=-1) * s
        return torch.cat([rotated, x[..., r:]], dim=-1) if r < x.shape[-1] else rotated

    @torch.no_grad()
    def forward(self, tokens, cache: TorchKVCache, *, all_logits: bool = False) -> np.ndarray:
        cfg = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        t = tokens.shape[0]
        start = cache.length
        if start + t > cache.capacity:
            raise ValueError(f"context of {start + t} tokens exceeds the cache capacity {cache.capacity}")
        if t == 0:
            raise ValueError("forward needs at least one token")
        h_, kv_, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = self.embed.rows(torch.from_numpy(tokens).to(self.device))  # (T, D)
        if cfg.embedding_scale != 1.0:
            x = x * torch.tensor(cfg.embedding_scale, dtype=torch.float32)
        if self.positions is not None:
            x = x + self.positions.rows(torch.arange(start, start + t, device=self.device))
        for i, layer in enumerate(self.layers):
            h = Activation(self._norm(x, layer["attn_norm"]))
            q = layer["q"](h).reshape(t, h_, d)  # (T, H, d)
            k = layer["k"](h).reshape(t, kv_, d)  # (T, KV, d)
            v = layer["v"](h).reshape(t, kv_, d)
            if layer["q_norm"] is not None:
                q, k = self._norm(q, layer["q_norm"]), self._norm(k, layer["k_norm"])
            if cfg.position_type == "rope":
                cos, sin = self._rotary(i, cache, start + t)
                q, k = self._rope(q, cos, sin, start), self._rope(k, cos, sin, start)
            cache.k[i, :, start:start + t] = k.transpose(0, 1)
            cache.v[i, :, start:start + t] = v.transpose(0, 1)
            a = self._attention(q, cache.k[i, :, :start + t], cache.v[i, :, :start + t], start,
                                self.windows[i])  # (T, H·d)
            y = layer["o"](a)
            x = x + (y if layer["attn_out_norm"] is None else self._norm(y, layer["attn_out_norm"]))
            h = Activation(self._norm(x, layer["mlp_norm"]))
            if layer["gate"] is None:
                m = self._act(layer["up"](h))
            else:
                m = self._act(layer["gate"](h)) * layer["up"](h)
            y = layer["down"](m)
            x = x + (y if layer["mlp_out_norm"] is None else self._norm(y, layer["mlp_out_norm"]))
        cache.length = start + t
        if not all_logits:
            x = x[-1:]
        logits = self._softcap(self.head(self._norm(x, self.norm)), cfg.final_logit_softcapping)
        logits = logits.float().cpu().numpy()  # (T or 1, vocab)
        return logits if all_logits else logits[0]

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int) -> torch.Tensor:
        t, n_heads, d = q.shape
        n_kv, s = k.shape[0], k.shape[1]
        qg = q.reshape(t, n_kv, n_heads // n_kv, d).permute(1, 2, 0, 3)  # (KV, G, T, d)
        scores = self._softcap((qg @ k[:, None].transpose(-1, -2)) * self.scale,
                               self.cfg.attn_logit_softcapping)  # (KV, G, T, S)
        pos = torch.arange(s, device=q.device)[None, :]
        now = (start + torch.arange(t, device=q.device))[:, None]
        hidden = pos > now  # (T, S)
        if window:
            hidden |= pos <= now - window
        scores = scores.masked_fill(hidden, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out = p @ v[:, None]  # (KV, G, T, d)
        return out.permute(2, 0, 1, 3).reshape(t, n_heads * d)
