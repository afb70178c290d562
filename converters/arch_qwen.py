"""The Qwen family in the converter: Qwen2 / Qwen2.5 and Qwen3 (dense), from HF checkpoints and llama.cpp GGUF files.

Both are Llama with:
    Qwen2    biases on the q, k and v projections (none on o: `attention_out_bias` false);
    Qwen3    RMSNorm over each head of q and k before rope (`qk_norm`, weights self_attn.{q,k}_norm), head_dim given
             explicitly (often != hidden / heads), biases on q/k/v/o only if `attention_bias`;
    both     optional sliding windows: with `use_sliding_window`, layers from `max_window_layers` on attend to the
             last `sliding_window` positions (transformers' `layer_types`; real checkpoints ship with it off).
Their HF checkpoints use occrt's names; their GGUF files llama.cpp's usual names with q/k rows NOT permuted (llama.cpp
runs qwen2/qwen3 with NEOX rope, which rotates halves as HF does).
"""
from __future__ import annotations

from typing import Any

from occrt.converters.arch_llama import (check_activation, common_from_gguf, common_from_hf, common_hf_config,
                                         gguf_get, gguf_rules_by_table, validated)
from occrt.converters.tensor_rules import TensorRule, same_names
from occrt.errors import ConversionError
from occrt.model.config import LAYER_TYPES, ModelConfig
from occrt.model.loader import tensor_shapes

HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
HF_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3"}
HF_CLASSES = {"qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}
GGUF_IGNORED = frozenset({"rope_freqs.weight"})  # folded into the rope config by the GGUF reader
_QWEN3_HEAD_DIM = 128  # Qwen3Config's default when config.json leaves head_dim out


def _sliding(hf: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """transformers' rule: a window only with use_sliding_window; then layer_types as given, or sliding from
    layer max_window_layers on."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return {}
    types = hf.get("layer_types")
    if types is None:
        first = int(hf.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ConversionError(f"config.json: layer_types must list one of {LAYER_TYPES} for each of the {n_layers} "
                              f"layers, got {types!r:.200}")
    if "sliding_attention" not in types:
        return {}
    return {"sliding_window": int(hf["sliding_window"]), "layer_types": list(types)}


def config_from_hf(hf: dict[str, Any], architecture: str) -> ModelConfig:
    check_activation(hf, "Qwen")
    if architecture == "qwen3" and not hf.get("head_dim"):
        hf = {**hf, "head_dim": _QWEN3_HEAD_DIM}
    kw = common_from_hf(hf, architecture)
    kw.update(_sliding(hf, kw["num_hidden_layers"]))
    if architecture == "qwen2":
        kw.update(attention_bias=True, attention_out_bias=False)
    else:
        kw.update(attention_bias=bool(hf.get("attention_bias", False)), qk_norm=True)
    return validated(ModelConfig(**kw))


def config_from_gguf(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]], architecture: str) -> ModelConfig:
    kw = common_from_gguf(fields, shapes, architecture)
    get = gguf_get(fields, fields["general.architecture"])
    window = get("attention.sliding_window")
    if window:
        raise ConversionError(f"GGUF {architecture} with attention.sliding_window {window}: llama.cpp does not "
                              f"record which layers slide; not supported")
    kw.update(attention_bias="blk.0.attn_q.bias" in shapes, attention_out_bias="blk.0.attn_output.bias" in shapes,
              qk_norm="blk.0.attn_q_norm.weight" in shapes)
    if kw["attention_out_bias"] == kw["attention_bias"]:
        kw["attention_out_bias"] = None
    return validated(ModelConfig(**kw))


def hf_rules(cfg: ModelConfig) -> list[TensorRule]:
    return same_names(tensor_shapes(cfg))


def gguf_rules(cfg: ModelConfig) -> list[TensorRule]:
    return gguf_rules_by_table(cfg)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    arch, model_type = HF_CLASSES[cfg.architecture]
    out = {"architectures": [arch], "model_type": model_type, **common_hf_config(cfg)}
    if cfg.architecture == "qwen3":
        out["attention_bias"] = cfg.attention_bias
    sliding = cfg.layer_types is not None and "sliding_attention" in cfg.layer_types
    out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window if sliding else None,
               max_window_layers=cfg.num_hidden_layers, layer_types=cfg.layer_types or
               ["full_attention"] * cfg.num_hidden_layers)
    return out
