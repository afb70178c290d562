"""The Phi-3 family in the converter (Phi-3 / Phi-3.5 mini and medium, Phi-4-mini): HF checkpoints and GGUF files.

Phi-3 is Llama with two fused projections, split here at conversion:
    self_attn.qkv_proj (H·d + 2·KV·d, D)  ->  q_proj, k_proj, v_proj   (rows in that order)
    mlp.gate_up_proj   (2·F, D)           ->  gate_proj, up_proj      (transformers: gate, up = chunk(2))
and optionally
    - a sliding window on every layer (`sliding_window`, e.g. 2047 for Phi-3-mini-4k);
    - LongRoPE (`rope_scaling.type` longrope, or the legacy su / yarn names): per-frequency short and long factors;
      the attention factor, when not given, is √(1 + ln(s) / ln(L₀)) with s = max_position_embeddings / L₀ and
      L₀ = original_max_position_embeddings (transformers' rule);
    - partial rotary (`partial_rotary_factor`, Phi-4-mini 0.75): only the first int(head_dim · factor) dims rotate.
llama.cpp's phi3 GGUF keeps both projections fused under `attn_qkv` and `ffn_up` (gate first), with q/k rows in HF's
order (NEOX rope); its LongRoPE factors are tensors (`rope_factors_long/short`), which this reader does not take.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from occrt.converters.arch_llama import (GGUF_LAYER, check_activation, common_from_gguf, common_from_hf,
                                         common_hf_config, gguf_get, gguf_name, validated)
from occrt.converters.tensor_rules import TensorRule
from occrt.errors import UnsupportedModelError
from occrt.model.config import ModelConfig
from occrt.model.loader import tensor_shapes

HF_ARCHITECTURES = {"Phi3ForCausalLM": "phi3"}
HF_MODEL_TYPES = {"phi3": "phi3"}
GGUF_ARCHITECTURES = {"phi3": "phi3"}
HF_CLASSES = {"phi3": ("Phi3ForCausalLM", "phi3")}

_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
_GGUF_FUSED = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


def _rope(hf: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind in ("su", "yarn"):  # Phi3Config's legacy names for LongRoPE
        kind = "longrope"
    if kind == "default":
        return {"type": "default", "theta": theta}
    if kind != "longrope":
        raise UnsupportedModelError(f"Phi-3 rope type {kind!r} is not supported (supported: default, longrope)")
    original = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                   or 4096)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    rope = {"type": "longrope", "theta": theta, "original_max_position_embeddings": original,
            "attention_factor": float(attention_factor)}
    for key in ("short_factor", "long_factor"):
        factors = params.get(key)
        if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
            raise UnsupportedModelError(f"Phi-3 longrope needs {key} with {rotary_dim // 2} numbers, got "
                                        f"{factors!r:.80}")
        rope[key] = [float(f) for f in factors]
    return rope


def config_from_hf(hf: dict[str, Any], architecture: str) -> ModelConfig:
    check_activation(hf, "Phi-3")
    hf_rope = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling")}
    kw = common_from_hf(hf_rope, architecture)  # rope: default here, the real one below
    params = hf.get("rope_parameters") or {}
    partial = float(params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)
    rotary_dim = int(kw["head_dim"] * partial)
    if rotary_dim != kw["head_dim"]:
        kw["rotary_dim"] = rotary_dim
    kw["rope"] = _rope(hf, rotary_dim)
    if hf.get("sliding_window") is not None:  # transformers' Phi3Model: every layer slides when it is set
        kw.update(sliding_window=int(hf["sliding_window"]), layer_types=["sliding_attention"] * kw[
            "num_hidden_layers"])
    return validated(ModelConfig(**kw))


def config_from_gguf(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]], architecture: str) -> ModelConfig:
    if "rope_factors_long.weight" in shapes or "rope_factors_short.weight" in shapes:
        raise UnsupportedModelError("Phi-3 GGUF files with LongRoPE factor tensors (the 128k-context models) are "
                                    "not supported; convert the Hugging Face checkpoint instead")
    kw = common_from_gguf(fields, shapes, architecture)
    get = gguf_get(fields, fields["general.architecture"])
    rotary = get("rope.dimension_count")
    if rotary and int(rotary) != kw["head_dim"]:
        kw["rotary_dim"] = int(rotary)
    window = get("attention.sliding_window")
    if window:
        kw.update(sliding_window=int(window), layer_types=["sliding_attention"] * kw["num_hidden_layers"])
    return validated(ModelConfig(**kw))


_MEMBER = {p: f for f, parts in _FUSED.items() for p in parts}  # "self_attn.q_proj" -> "self_attn.qkv_proj"
_LAYER = re.compile(r"(model\.layers\.\d+)\.(.+)\.(weight|bias)")


def _fused_rules(cfg: ModelConfig, source_name: Callable[[str], str]) -> list[TensorRule]:
    """Rules in occrt's tensor order, each fused group read from one checkpoint tensor; `source_name` gives the
    checkpoint's name for an occrt-style name (fused modules named as in HF)."""
    rules, done = [], set()
    for name in tensor_shapes(cfg):
        m = _LAYER.fullmatch(name)
        fused = _MEMBER.get(m.group(2)) if m else None
        if fused is None:
            rules.append(TensorRule(source_name(name), (name,)))
            continue
        layer, kind = m.group(1), m.group(3)
        if (layer, fused, kind) not in done:
            done.add((layer, fused, kind))
            rules.append(TensorRule(source_name(f"{layer}.{fused}.{kind}"),
                                    tuple(f"{layer}.{p}.{kind}" for p in _FUSED[fused])))
    return rules


def hf_rules(cfg: ModelConfig) -> list[TensorRule]:
    return _fused_rules(cfg, lambda name: name)


def gguf_rules(cfg: ModelConfig) -> list[TensorRule]:
    table = {**GGUF_LAYER, **_GGUF_FUSED}
    table.pop("ffn_gate")  # no separate gate in phi3 files

    def name(hf_name: str) -> str:
        source = gguf_name(hf_name, table)
        if source is None:
            raise UnsupportedModelError(f"tensor {hf_name!r} has no GGUF name in the phi3 family")
        return source

    return _fused_rules(cfg, name)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    # pad_token_id: Phi3Config's default (32000) would index past a smaller vocabulary; padding does not change
    # the forward pass, and the .occ file does not record a pad token
    out = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **common_hf_config(cfg),
           "sliding_window": cfg.sliding_window, "partial_rotary_factor": cfg.rotary_dims / cfg.head_dim,
           "pad_token_id": None}
    if cfg.rope["type"] == "longrope":
        out["original_max_position_embeddings"] = cfg.rope["original_max_position_embeddings"]
    return out
