"""The model configuration stored in a `.occ` file (metadata key `model.config`), and its validation.

The keys follow Hugging Face's names where one exists, so a reader who knows `config.json` knows this. `rope` is
normalized: `{"type": ..., "theta": ..., <type's own parameters>}` (format_spec/occ.md, "Model configuration").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from occrt.errors import FormatError

SUPPORTED_ARCHITECTURES = ("llama",)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "freq_factors")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict[str, Any] = field(default_factory=lambda: {"type": "default", "theta": 10000.0})
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: Any) -> "ModelConfig":
        if not isinstance(d, dict):
            raise FormatError("metadata 'model.config' is not an object")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise FormatError(f"metadata 'model.config' lacks {missing}")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive_int(name: str, hi: int = 1 << 24) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise FormatError(f"model.config.{name} must be an integer in [1, {hi}], got {v!r}")

        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise FormatError(f"model.config.architecture {self.architecture!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            positive_int(name)
        positive_int("max_position_embeddings", 1 << 30)
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise FormatError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not isinstance(self.rms_norm_eps, (int, float)) or not 0 < self.rms_norm_eps < 1:
            raise FormatError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"model.config.{name} must be true or false")
        if self.hidden_act != "silu":
            raise FormatError(f"hidden_act {self.hidden_act!r} is not supported (supported: silu)")
        rope = self.rope
        if not isinstance(rope, dict) or rope.get("type") not in ROPE_TYPES:
            raise FormatError(f"model.config.rope.type must be one of {ROPE_TYPES}, got {rope!r:.100}")
        theta = rope.get("theta")
        if not _number(theta) or not 1 < theta < _F32_MAX:
            raise FormatError(f"model.config.rope.theta must be a number in (1, 3.4e38), got {theta!r:.40}")
        _validate_rope_params(rope, self.head_dim)

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


_F32_MAX = 3.4e38  # rotary frequencies are computed in float32: larger values would become infinities


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_rope_params(rope: dict[str, Any], head_dim: int) -> None:
    """Each rope type's own parameters (format_spec/occ.md 4.1): present, finite, in the range the formula needs."""

    def positive(key: str, *, required: bool = True) -> None:
        if key not in rope and not required:
            return
        v = rope.get(key)
        if not _number(v) or not 0 < v < _F32_MAX:
            raise FormatError(f"model.config.rope.{key} must be a positive number for rope type "
                              f"{rope['type']!r}, got {v!r:.40}")

    kind = rope["type"]
    if kind == "linear":
        positive("factor")
    elif kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            positive(key)
        if not rope["low_freq_factor"] < rope["high_freq_factor"]:
            raise FormatError("model.config.rope: low_freq_factor must be below high_freq_factor")
    elif kind == "yarn":
        positive("factor")
        positive("original_max_position_embeddings")
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            positive(key, required=False)
    elif kind == "freq_factors":
        factors = rope.get("factors")
        if (not isinstance(factors, list) or len(factors) != head_dim // 2
                or not all(_number(f) and 0 < f < _F32_MAX for f in factors)):
            raise FormatError(f"model.config.rope.factors must be {head_dim // 2} positive numbers (head_dim/2)")
