"""The model configuration stored in a `.occ` file (metadata key `model.config`), and its validation.

The keys follow Hugging Face's names where one exists, so a reader who knows `config.json` knows this. `rope` is
normalized: `{"type": ..., "theta": ..., <type's own parameters>}` (format_spec/occ.md, "Model configuration").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from occrt.errors import FormatError

# Labels of the families a file may come from (`general.architecture`). The forward pass is given by the config's
# feature keys, not by this label; it tells `occrt export` which Hugging Face class to write.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma2", "gemma3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "freq_factors", "longrope")
HIDDEN_ACTS = ("silu", "gelu_tanh")
NORM_TYPES = ("rms", "layer")
MLP_TYPES = ("gated", "plain")
POSITION_TYPES = ("rope", "learned")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape and features. Fields after `rope` are optional in the file: their defaults give the
    Llama forward pass, and `to_json` leaves out the ones at their default (format_spec/occ.md 4.1)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float  # epsilon of every norm, RMSNorm or LayerNorm (norm_type)
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict[str, Any] = field(default_factory=lambda: {"type": "default", "theta": 10000.0})
    attention_bias: bool = False  # q, k, v projections (and o unless attention_out_bias says otherwise) have biases
    mlp_bias: bool = False
    hidden_act: str = "silu"  # silu | gelu_tanh (GELU, tanh approximation)
    attention_out_bias: bool | None = None  # o projection's bias; None: as attention_bias (Qwen2: q/k/v only)
    norm_type: str = "rms"  # rms: x / rms(x) * w;  layer: (x - mean) / std * w + b (LayerNorm, with biases)
    mlp_type: str = "gated"  # gated: down(act(gate(h)) * up(h));  plain: down(act(up(h)))
    position_type: str = "rope"  # rope: rotary q/k;  learned: model.embed_positions rows added to the embedding
    rotary_dim: int | None = None  # leading dims of each head that rotate (partial rotary); None: head_dim
    qk_norm: bool = False  # RMSNorm over each head's head_dim values of q and k, before rope (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # Gemma: norms on each sublayer's output before the residual add, pre-FF norm
    embedding_scale: float = 1.0  # embedding rows are multiplied by this (Gemma: sqrt(hidden_size))
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c)
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c)
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5; None: head_dim ** -0.5
    sliding_window: int | None = None  # sliding layers see the last `sliding_window` positions (the current one too)
    layer_types: list[str] | None = None  # per layer: full_attention | sliding_attention; None: all full
    rope_local: dict[str, Any] | None = None  # rope of sliding layers; None: `rope`

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value == _OPTIONAL[f.name]:
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, d: Any) -> "ModelConfig":
        if not isinstance(d, dict):
            raise FormatError("metadata 'model.config' is not an object")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise FormatError(f"metadata 'model.config' lacks {missing}")
        unknown = sorted(k for k in d if k not in cls.__dataclass_fields__)
        if unknown:
            # every key changes the computation: ignoring one would run a different model
            raise FormatError(f"metadata 'model.config' has keys this reader does not know: {unknown[:5]} "
                              f"(written by a newer occrt?)")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive_int(name: str, hi: int = 1 << 24) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise FormatError(f"model.config.{name} must be an integer in [1, {hi}], got {v!r}")

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in allowed:
                raise FormatError(f"model.config.{name} {v!r:.40} is not supported (supported: {', '.join(allowed)})")

        def optional_positive(name: str) -> None:
            v = getattr(self, name)
            if v is not None and (not _number(v) or not 0 < v < _F32_MAX):
                raise FormatError(f"model.config.{name} must be a positive number or null, got {v!r:.40}")

        one_of("architecture", SUPPORTED_ARCHITECTURES)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            positive_int(name)
        positive_int("max_position_embeddings", 1 << 30)
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if not isinstance(self.rms_norm_eps, (int, float)) or not 0 < self.rms_norm_eps < 1:
            raise FormatError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "qk_norm", "sandwich_norms"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"model.config.{name} must be true or false")
        if self.attention_out_bias is not None and not isinstance(self.attention_out_bias, bool):
            raise FormatError("model.config.attention_out_bias must be true, false or null")
        one_of("hidden_act", HIDDEN_ACTS)
        one_of("norm_type", NORM_TYPES)
        one_of("mlp_type", MLP_TYPES)
        one_of("position_type", POSITION_TYPES)
        if not _number(self.embedding_scale) or not 0 < self.embedding_scale < _F32_MAX:
            raise FormatError(f"model.config.embedding_scale must be a positive number, got "
                              f"{self.embedding_scale!r:.40}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            optional_positive(name)
        self._validate_attention_span()
        if self.position_type == "rope":
            if self.rotary_dim is not None:
                positive_int("rotary_dim")
            if self.rotary_dims % 2 or self.rotary_dims > self.head_dim:
                raise FormatError(f"the rotated dimensions ({self.rotary_dims}) must be even and at most head_dim "
                                  f"{self.head_dim}")
            for name in ("rope", "rope_local"):
                rope = getattr(self, name)
                if rope is None and name == "rope_local":
                    continue
                if not isinstance(rope, dict) or rope.get("type") not in ROPE_TYPES:
                    raise FormatError(f"model.config.{name}.type must be one of {ROPE_TYPES}, got {rope!r:.100}")
                theta = rope.get("theta")
                if not _number(theta) or not 1 < theta < _F32_MAX:
                    raise FormatError(f"model.config.{name}.theta must be a number in (1, 3.4e38), got "
                                      f"{theta!r:.40}")
                _validate_rope_params(rope, self.rotary_dims, name)
        elif self.rotary_dim is not None or self.rope_local is not None:
            raise FormatError("model.config.rotary_dim and rope_local need position_type rope")

    def _validate_attention_span(self) -> None:
        types = self.layer_types
        if types is not None and (not isinstance(types, list) or len(types) != self.num_hidden_layers
                                  or any(t not in LAYER_TYPES for t in types)):
            raise FormatError(f"model.config.layer_types must list one of {', '.join(LAYER_TYPES)} for each of the "
                              f"{self.num_hidden_layers} layers, got {types!r:.100}")
        sliding = types is not None and "sliding_attention" in types
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 1 << 30):
            raise FormatError(f"model.config.sliding_window must be an integer in [1, 2^30] or null, got {w!r:.40}")
        if sliding and w is None:
            raise FormatError("model.config.layer_types has sliding layers but sliding_window is null")

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dims(self) -> int:
        """How many leading dimensions of each head rotate."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    def window(self, layer: int) -> int:
        """The attention span of `layer` in positions (the current one included); 0 for unbounded."""
        if self.layer_types is not None and self.layer_types[layer] == "sliding_attention":
            return int(self.sliding_window)
        return 0

    def layer_rope(self, layer: int) -> dict[str, Any]:
        if self.rope_local is not None and self.window(layer):
            return self.rope_local
        return self.rope

    @property
    def attention_scale(self) -> float:
        scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return float(scalar) ** -0.5


# Optional keys and their defaults (the Llama forward pass): `to_json` omits a key at its default, so a Llama file
# reads the same to readers older than these keys.
_OPTIONAL = {f.name: f.default for f in dataclasses.fields(ModelConfig)
             if f.default is not dataclasses.MISSING and f.name not in ("attention_bias", "mlp_bias", "hidden_act")}
_F32_MAX = 3.4e38  # rotary frequencies are computed in float32: larger values would become infinities


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_rope_params(rope: dict[str, Any], rotary_dim: int, where: str = "rope") -> None:
    """Each rope type's own parameters (format_spec/occ.md 4.1): present, finite, in the range the formula needs."""

    def positive(key: str, *, required: bool = True) -> None:
        if key not in rope and not required:
            return
        v = rope.get(key)
        if not _number(v) or not 0 < v < _F32_MAX:
            raise FormatError(f"model.config.{where}.{key} must be a positive number for rope type "
                              f"{rope['type']!r}, got {v!r:.40}")

    def factor_list(key: str) -> None:
        factors = rope.get(key)
        if (not isinstance(factors, list) or len(factors) != rotary_dim // 2
                or not all(_number(f) and 0 < f < _F32_MAX for f in factors)):
            raise FormatError(f"model.config.{where}.{key} must be {rotary_dim // 2} positive numbers "
                              f"(rotated dims / 2)")

    kind = rope["type"]
    if kind == "linear":
        positive("factor")
    elif kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            positive(key)
        if not rope["low_freq_factor"] < rope["high_freq_factor"]:
            raise FormatError(f"model.config.{where}: low_freq_factor must be below high_freq_factor")
    elif kind == "yarn":
        positive("factor")
        positive("original_max_position_embeddings")
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            positive(key, required=False)
    elif kind == "freq_factors":
        factor_list("factors")
    elif kind == "longrope":
        factor_list("short_factor")
        factor_list("long_factor")
        positive("original_max_position_embeddings")
        positive("attention_factor")
