"""The Llama family in the converter: Llama 2/3 (rope scaling included), SmolLM2, TinyLlama, and Mistral (with its
sliding window): RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied embeddings.

Also the pieces the other families share: reading the common `config.json` keys and rope settings, llama.cpp's
GGUF tensor names, and the common keys of an exported `config.json`.
"""
from __future__ import annotations

import re
from typing import Any

from occrt.converters.tensor_rules import TensorRule, same_names
from occrt.errors import ConversionError, FormatError, UnsupportedModelError
from occrt.model.config import ModelConfig
from occrt.model.loader import tensor_shapes

# HF `architectures[0]` / `model_type`, GGUF `general.architecture` -> occrt architecture
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral"}
GGUF_ARCHITECTURES = {"llama": "llama"}
GGUF_IGNORED = frozenset({"rope_freqs.weight"})  # folded into the rope config (type freq_factors) by the GGUF reader
# occrt architecture -> (HF class, model_type) an export writes
HF_CLASSES = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral")}


# -- config.json ----------------------------------------------------------------------------------------------------
def need(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConversionError(f"{where} lacks {key!r}")
    return d[key]


def validated(cfg: ModelConfig) -> ModelConfig:
    try:
        cfg.validate()
    except FormatError as e:
        raise ConversionError(f"model config: {e.reason}") from None
    return cfg


def common_from_hf(hf: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The ModelConfig keys every Llama-like `config.json` spells the same way."""
    where = "config.json"
    heads = int(need(hf, "num_attention_heads", where))
    hidden = int(need(hf, "hidden_size", where))
    return dict(
        architecture=architecture,
        vocab_size=int(need(hf, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(need(hf, "intermediate_size", where)),
        num_hidden_layers=int(need(hf, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=rope_from_hf(hf),
    )


def check_activation(hf: dict[str, Any], family: str) -> None:
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise UnsupportedModelError(f"activation {act!r} is not supported for the {family} family (only silu)")


def config_from_hf(hf: dict[str, Any], architecture: str) -> ModelConfig:
    check_activation(hf, "Llama")
    kw = common_from_hf(hf, architecture)
    if architecture == "mistral" and hf.get("sliding_window") is not None:
        # every Mistral layer attends to the last `sliding_window` positions (transformers' MistralModel)
        kw.update(sliding_window=int(hf["sliding_window"]), layer_types=["sliding_attention"] * kw[
            "num_hidden_layers"])
    return validated(ModelConfig(**kw, attention_bias=bool(hf.get("attention_bias", False)),
                                 mlp_bias=bool(hf.get("mlp_bias", False))))


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


def rope_scaling_to_hf(rope: dict[str, Any], max_position_embeddings: int) -> dict[str, Any] | None:
    """occrt's rope dict (format_spec/occ.md 4.1) -> HF `rope_scaling`, the inverse of `rope_from_hf`.

    "freq_factors" (GGUF's rope_freqs: inv_freq_i / factors_i) has no HF type of its own; HF's "longrope" with the
    same list as short and long factors and attention_factor 1 computes exactly inv_freq_i / factors_i at every
    length (the two lists are chosen between by length, and here they are equal)."""
    kind = rope["type"]
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": rope["factor"]}
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                "high_freq_factor": rope["high_freq_factor"],
                "original_max_position_embeddings": rope["original_max_position_embeddings"]}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": rope["factor"],
               "original_max_position_embeddings": rope["original_max_position_embeddings"]}
        out.update({k: rope[k] for k in ("beta_fast", "beta_slow", "attention_factor") if k in rope})
        return out
    if kind == "freq_factors":
        factors = [float(f) for f in rope["factors"]]
        return {"rope_type": "longrope", "short_factor": factors, "long_factor": factors, "factor": 1.0,
                "attention_factor": 1.0, "original_max_position_embeddings": max_position_embeddings}
    if kind == "longrope":
        return {"rope_type": "longrope", "short_factor": list(rope["short_factor"]),
                "long_factor": list(rope["long_factor"]), "attention_factor": rope["attention_factor"],
                "original_max_position_embeddings": rope["original_max_position_embeddings"]}
    raise UnsupportedModelError(f"rope type {kind!r} has no Hugging Face equivalent to export to")


def common_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` keys of a Llama-like checkpoint with `cfg`'s forward pass. The legacy `rope_theta` +
    `rope_scaling` form is written because every engine reads it (transformers >= 5 converts it)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "rope_theta": float(cfg.rope["theta"]),
        "rope_scaling": rope_scaling_to_hf(cfg.rope, cfg.max_position_embeddings),
    }


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    arch, model_type = HF_CLASSES[cfg.architecture]
    out = {"architectures": [arch], "model_type": model_type, **common_hf_config(cfg),
           "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias, "pretraining_tp": 1}
    if cfg.architecture == "mistral":
        del out["mlp_bias"], out["pretraining_tp"], out["attention_bias"]
        out["sliding_window"] = cfg.sliding_window
    return out


def hf_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Llama and Mistral checkpoints use occrt's names as they are."""
    return same_names(tensor_shapes(cfg))


# -- GGUF -----------------------------------------------------------------------------------------------------------
# llama.cpp's tensor names -> occrt's (Llama meaning: ffn_norm is the norm before the MLP). Other families reuse it.
GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "position_embd": "model.embed_positions",
               "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_OCC_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OCC_GLOBAL = re.compile(r"(model\.embed_tokens|model\.embed_positions|model\.norm|lm_head)\.(weight|bias)")


def gguf_name(occ_name: str, layer_table: dict[str, str] = GGUF_LAYER) -> str | None:
    """llama.cpp's name for occrt tensor `occ_name` (None if the table has none)."""
    m = _OCC_LAYER.fullmatch(occ_name)
    if m:
        inverse = {v: k for k, v in layer_table.items()}
        return f"blk.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}" if m.group(2) in inverse else None
    m = _OCC_GLOBAL.fullmatch(occ_name)
    inverse = {v: k for k, v in GGUF_GLOBAL.items()}
    return f"{inverse[m.group(1)]}.{m.group(2)}" if m else None


def gguf_rules_by_table(cfg: ModelConfig, layer_table: dict[str, str] = GGUF_LAYER) -> list[TensorRule]:
    """One rule per occrt tensor, each read from its llama.cpp name (families whose GGUF tensors are not fused)."""
    rules = []
    for name in tensor_shapes(cfg):
        source = gguf_name(name, layer_table)
        if source is None:
            raise UnsupportedModelError(f"tensor {name!r} has no GGUF name in the {cfg.architecture} family")
        rules.append(TensorRule(source, (name,)))
    return rules


def gguf_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Llama GGUF files hold q/k rows permuted per head (llama.cpp's rope rotates adjacent pairs): undone here."""
    def heads(name: str) -> int:
        if ".self_attn.q_proj." in name:
            return cfg.num_attention_heads
        return cfg.num_key_value_heads if ".self_attn.k_proj." in name else 0

    return [TensorRule(r.source, r.parts, permute_heads=heads(r.parts[0])) for r in gguf_rules_by_table(cfg)]


def gguf_get(fields: dict[str, Any], arch: str):
    def get(key: str, default: Any = None) -> Any:
        v = fields.get(f"{arch}.{key}")
        return default if v is None else v
    return get


def gguf_rope(fields: dict[str, Any], arch: str) -> dict[str, Any]:
    get = gguf_get(fields, arch)
    rope: dict[str, Any] = {"type": "default", "theta": float(get("rope.freq_base", 10000.0))}
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        rope.update(type="linear", factor=float(get("rope.scaling.factor")))
    elif scaling == "yarn":
        rope.update(type="yarn", factor=float(get("rope.scaling.factor")),
                    original_max_position_embeddings=int(get("rope.scaling.original_context_length")))
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
    return rope


def common_from_gguf(fields: dict[str, Any], tensor_shapes_: dict[str, tuple[int, ...]],
                     architecture: str) -> dict[str, Any]:
    """The ModelConfig keys every llama.cpp architecture records the same way."""
    arch = fields.get("general.architecture")
    where = "GGUF metadata"
    get = gguf_get(fields, arch)
    heads = int(need(fields, f"{arch}.attention.head_count", where))
    hidden = int(need(fields, f"{arch}.embedding_length", where))
    vocab = get("vocab_size") or tensor_shapes_.get("token_embd.weight", (None,))[0]
    return dict(
        architecture=architecture,
        vocab_size=int(need({"vocab": vocab}, "vocab", where)),
        hidden_size=hidden,
        intermediate_size=int(need(fields, f"{arch}.feed_forward_length", where)),
        num_hidden_layers=int(need(fields, f"{arch}.block_count", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv") or heads),
        head_dim=int(get("attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_shapes_,
        rope=gguf_rope(fields, arch),
    )


def config_from_gguf(fields: dict[str, Any], tensor_shapes_: dict[str, tuple[int, ...]],
                     architecture: str) -> ModelConfig:
    """`fields`: GGUF key -> Python value; `tensor_shapes_`: GGUF tensor name -> numpy-order shape."""
    kw = common_from_gguf(fields, tensor_shapes_, architecture)
    get = gguf_get(fields, fields.get("general.architecture"))
    if not get("attention.key_length"):
        kw["head_dim"] = int(get("rope.dimension_count") or kw["head_dim"])
    return validated(ModelConfig(**kw, attention_bias="blk.0.attn_q.bias" in tensor_shapes_))
