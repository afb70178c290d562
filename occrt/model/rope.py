"""Rotary position embeddings: inverse frequencies for each scaling rule, and the rotation itself.

Conventions follow Hugging Face's Llama ("rotate half": the head dimension is split into two halves that rotate as
pairs (i, i + d/2)), because the converter stores q/k projections in that layout. Frequencies and angles are
computed in float32 as the reference implementation does, so positions match it bit for bit in the common cases.
"""
from __future__ import annotations

import math

import numpy as np

from occrt.errors import FormatError


def inverse_frequencies(rope: dict, head_dim: int, *, long: bool = False) -> tuple[np.ndarray, float]:
    """Return (inv_freq (head_dim/2,) float32, attention scaling factor applied to cos and sin).

    `head_dim` is the number of dimensions that rotate (the head's leading `rotary_dim` under partial rotary).
    `long` picks longrope's long factors (the context exceeds its original_max_position_embeddings)."""
    theta = float(rope["theta"])
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)  # (head_dim/2,)
    kind = rope["type"]
    scaling = 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    elif kind == "freq_factors":
        factors = np.asarray(rope["factors"], dtype=np.float32)
        if factors.shape != inv_freq.shape:
            raise FormatError(f"rope.factors has {factors.size} entries, head_dim/2 is {inv_freq.size}")
        inv_freq = (inv_freq / factors).astype(np.float32)
    elif kind == "longrope":
        # LongRoPE (Ding et al. 2024, Phi-3): per-frequency rescale factors, one list for contexts within the
        # original training length and one beyond it; cos and sin scaled by attention_factor either way
        factors = np.asarray(rope["long_factor" if long else "short_factor"], dtype=np.float32)
        if factors.shape != inv_freq.shape:
            raise FormatError(f"rope factors have {factors.size} entries, rotated dims/2 is {inv_freq.size}")
        inv_freq = (np.float32(1.0) / (factors * (np.float32(theta) ** exponents))).astype(np.float32)
        scaling = float(rope["attention_factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, rope)
    elif kind == "yarn":
        inv_freq, scaling = _yarn(rope, head_dim)
    else:
        raise FormatError(f"unsupported rope type {kind!r}")
    return inv_freq, scaling


def _llama3(inv_freq: np.ndarray, rope: dict) -> np.ndarray:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    factor = np.float32(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: dict, head_dim: int) -> tuple[np.ndarray, float]:
    # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, ramp between; scale attention.
    theta, factor = float(rope["theta"]), float(rope["factor"])
    old_len = float(rope["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rope.get("beta_fast", 32.0)), float(rope.get("beta_slow", 1.0))
    mscale = rope.get("attention_factor")
    if mscale is None:
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(n_rot: float) -> float:
        return head_dim * math.log(old_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(mscale)


class Rotary:
    """Precomputed cos/sin tables for positions [0, max_positions), extended on demand. `head_dim`: the dimensions
    that rotate (the leading ones of each head; the rest pass through `apply` unchanged)."""

    def __init__(self, rope: dict, head_dim: int, *, long: bool = False):
        self.head_dim = head_dim
        self.inv_freq, self.scaling = inverse_frequencies(rope, head_dim, long=long)
        self.cos = np.empty((0, head_dim), np.float32)
        self.sin = np.empty((0, head_dim), np.float32)

    def ensure(self, n_positions: int) -> None:
        if n_positions <= self.cos.shape[0]:
            return
        n = max(n_positions, 2 * self.cos.shape[0], 256)
        angles = np.arange(n, dtype=np.float32)[:, None] * self.inv_freq[None, :]  # (n, head_dim/2)
        emb = np.concatenate([angles, angles], axis=1)  # (n, head_dim)
        self.cos = (np.cos(emb) * np.float32(self.scaling)).astype(np.float32)
        self.sin = (np.sin(emb) * np.float32(self.scaling)).astype(np.float32)

    def apply(self, x: np.ndarray, start: int) -> np.ndarray:
        """Rotate the leading `head_dim` dims of x (T, n_heads, d >= head_dim) for positions start..start+T-1;
        returns a new array."""
        t, r = x.shape[0], self.head_dim
        self.ensure(start + t)
        cos = self.cos[start:start + t, None, :]  # (T, 1, r)
        sin = self.sin[start:start + t, None, :]
        half = r // 2
        xr = x[..., :r]
        rotated = np.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
        return np.concatenate([xr * cos + rotated * sin, x[..., r:]], axis=-1)
