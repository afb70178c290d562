"""The Llama family in the converter: config mapping from HF `config.json` and GGUF keys, and GGUF tensor names.

Covers Llama 2/3 (including rope scaling), Mistral and SmolLM2: RMSNorm, RoPE, grouped-query attention, SwiGLU,
tied or untied embeddings.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from occrt.errors import ConversionError, UnsupportedModelError
from occrt.model.config import ModelConfig

# HF `architectures[0]` / `model_type` -> our family name
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama"}
GGUF_ARCHITECTURES = {"llama": "llama"}


def supported_list() -> str:
    return ", ".join(sorted(set(HF_ARCHITECTURES) | {f"GGUF '{a}'" for a in GGUF_ARCHITECTURES}))


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConversionError(f"{where} lacks {key!r}")
    return d[key]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None) or HF_MODEL_TYPES.get(model_type)
    if family is None:
        name = archs[0] if archs else model_type
        raise UnsupportedModelError(f"architecture {name!r} is not supported; supported: {supported_list()}")
    where = "config.json"
    heads = int(_need(hf, "num_attention_heads", where))
    hidden = int(_need(hf, "hidden_size", where))
    sliding = hf.get("sliding_window")
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    if sliding is not None and hf.get("use_sliding_window", True) and int(sliding) < max_pos:
        raise UnsupportedModelError(f"sliding-window attention (window {sliding}) is not supported yet")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise UnsupportedModelError(f"activation {act!r} is not supported for the Llama family (only silu)")
    cfg = ModelConfig(
        architecture=family,
        vocab_size=int(_need(hf, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_need(hf, "intermediate_size", where)),
        num_hidden_layers=int(_need(hf, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=rope_from_hf(hf),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )
    _validate(cfg)
    return cfg


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    rope: dict[str, Any] = {"type": kind, "theta": theta}
    if kind == "default":
        return rope
    if kind == "linear":
        rope["factor"] = float(params["factor"])
    elif kind == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            rope[k] = float(params[k])
        rope["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    elif kind == "yarn":
        rope["factor"] = float(params["factor"])
        rope["original_max_position_embeddings"] = int(params.get("original_max_position_embeddings")
                                                       or hf.get("max_position_embeddings"))
        for k in ("beta_fast", "beta_slow", "attention_factor"):
            if params.get(k) is not None:
                rope[k] = float(params[k])
    else:
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported "
                                    f"(supported: default, linear, llama3, yarn)")
    return rope


def config_from_gguf(fields: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """`fields`: GGUF key -> Python value; `tensor_shapes`: GGUF tensor name -> numpy-order shape."""
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; supported: {supported_list()}")
    where = "GGUF metadata"

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    heads = int(_need(fields, f"{arch}.attention.head_count", where))
    hidden = int(_need(fields, f"{arch}.embedding_length", where))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
    vocab = get("vocab_size") or tensor_shapes.get("token_embd.weight", (None,))[0]
    rope: dict[str, Any] = {"type": "default", "theta": float(get("rope.freq_base", 10000.0))}
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        rope.update(type="linear", factor=float(get("rope.scaling.factor")))
    elif scaling == "yarn":
        rope.update(type="yarn", factor=float(get("rope.scaling.factor")),
                    original_max_position_embeddings=int(get("rope.scaling.original_context_length")))
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
    cfg = ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(_need({"vocab": vocab}, "vocab", where)),
        hidden_size=hidden,
        intermediate_size=int(_need(fields, f"{arch}.feed_forward_length", where)),
        num_hidden_layers=int(_need(fields, f"{arch}.block_count", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        rope=rope,
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
    )
    _validate(cfg)
    return cfg


def _validate(cfg: ModelConfig) -> None:
    from occrt.errors import FormatError

    try:
        cfg.validate()
    except FormatError as e:
        raise ConversionError(f"model config: {e.reason}") from None


# GGUF tensor names -> Hugging Face names (llama.cpp's convention for the llama architecture).
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_IGNORED = {"rope_freqs.weight"}  # folded into the rope config instead
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name_from_gguf(name: str) -> str | None:
    """The HF name of a GGUF tensor; None for tensors the converter folds elsewhere. Raises for unknown names."""
    if name in _GGUF_IGNORED:
        return None
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    raise UnsupportedModelError(f"GGUF tensor {name!r} has no place in the Llama family")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rope rotates adjacent pairs; HF's rotates halves).

    llama.cpp stores rows of each head as (half, pair) interleaved: row 2i and 2i+1 of a head are HF rows i and
    i + d/2. This puts them back: (H, d/2, 2, ...) -> (H, 2, d/2, ...).
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
