"""The Gemma family (Gemma 2, Gemma 3 text) in the converter: config mapping from HF `config.json` and GGUF keys,
tensor names, and the one weight convention that differs from Llama.

What a Gemma decoder does beyond Llama (transformers' Gemma2/Gemma3 modeling code and llama.cpp agree on all of it):

    x = embed[tokens] * sqrt(D)                      # scaled embedding; the scale is rounded to float32 first
    each layer:
        h = norm_in(x);  q, k, v = h Wq, h Wk, h Wv
        q, k = q_norm(q), k_norm(k)                  # Gemma 3: RMSNorm over each head's d values
        q, k = rope(q), rope(k)                      # Gemma 3: base `rope_local` on sliding layers
        s = q kᵀ / sqrt(query_pre_attn_scalar)       # not always head_dim
        s = cap · tanh(s / cap)                      # Gemma 2: attention soft-cap
        sliding layers: key j visible to query i iff i - W < j <= i
        x = x + norm_post_attn(softmax(s) v Wo)      # "sandwich": the sublayer's output is normed too
        x = x + norm_post_ffw(Wd (gelu_tanh(norm_pre_ffw(x) Wg) ⊙ norm_pre_ffw(x) Wu))
    logits = norm(x) Whead;  Gemma 2: cap · tanh(logits / cap)

Every RMSNorm of Gemma scales by (1 + w): Hugging Face checkpoints store w, llama.cpp's GGUF files store 1 + w
(its converter adds the 1). The `.occ` file stores the multiplier itself, so HF norm weights get the 1 added (a
rule's `offset`, in float32 as transformers computes `1.0 + weight.float()`; export subtracts it again), GGUF norm
weights are taken as they are, and the runtime's RMSNorm is the plain one.

Gemma 3's attention soft-cap: the config carries `attn_logit_softcapping`, but neither transformers nor llama.cpp
apply it (Gemma 3 replaced it with q/k norms), so it is ignored here too.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from occrt.converters.arch_llama import (GGUF_LAYER, common_from_gguf, common_from_hf, common_hf_config, gguf_get,
                                         gguf_rules_by_table, need, rope_from_hf, validated)
from occrt.converters.tensor_rules import TensorRule
from occrt.errors import ConversionError, UnsupportedModelError
from occrt.model.config import LAYER_TYPES, ModelConfig
from occrt.model.loader import tensor_shapes

# HF `architectures[0]` / `model_type`, GGUF `general.architecture` -> occrt architecture. model_type "gemma3" is the
# multimodal Gemma 3: listed only so that config_from_hf can say what to do instead.
HF_ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
HF_MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GGUF_ARCHITECTURES = {"gemma2": "gemma2", "gemma3": "gemma3"}
HF_CLASSES = {"gemma2": ("Gemma2ForCausalLM", "gemma2"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}

# Where a config omits a key: transformers' Gemma2Config / Gemma3TextConfig defaults.
_SLIDING_PERIOD = {"gemma2": 2, "gemma3": 6}  # every n-th layer is global, the others sliding
_HF_DEFAULTS = {
    "gemma2": {"max_position_embeddings": 8192, "rope_theta": 10000.0, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    "gemma3": {"max_position_embeddings": 131072, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "final_logit_softcapping": None},
}
_HEAD_DIM = 256  # Gemma2Config / Gemma3TextConfig default
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
# llama.cpp's 27B models scale scores by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim); GGUF files do not record
# query_pre_attn_scalar, so it recognizes them by their layer count. We follow it.
_GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def embedding_scale(hidden: int) -> float:
    # transformers builds the scale as a float32 tensor from hidden**0.5 (llama.cpp: sqrtf(n_embd))
    return float(np.float32(math.sqrt(hidden)))


def default_layer_types(architecture: str, n_layers: int, period: int | None = None) -> list[str]:
    n = period or _SLIDING_PERIOD[architecture]
    return ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(n_layers)]


def _gemma_config(architecture: str, kw: dict[str, Any], *, layer_types: Any, sliding_window: Any,
                  rope_local: dict[str, Any] | None, query_pre_attn_scalar: float,
                  attn_cap: float | None, final_cap: float | None, where: str) -> ModelConfig:
    n = kw["num_hidden_layers"]
    if (not isinstance(layer_types, list) or len(layer_types) != n
            or not all(t in LAYER_TYPES for t in layer_types)):
        raise ConversionError(f"{where}: layer_types must name one of {', '.join(LAYER_TYPES)} for each of the {n} "
                              f"layers, got {layer_types!r:.200}")
    sliding = "sliding_attention" in layer_types
    if sliding and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1):
        raise ConversionError(f"{where}: sliding layers need a positive integer sliding_window, got "
                              f"{sliding_window!r:.40}")
    return validated(ModelConfig(
        **kw,
        hidden_act="gelu_tanh",
        qk_norm=architecture == "gemma3",
        sandwich_norms=True,
        embedding_scale=embedding_scale(kw["hidden_size"]),
        layer_types=list(layer_types),
        sliding_window=int(sliding_window) if sliding else None,
        rope_local=rope_local,
        query_pre_attn_scalar=float(query_pre_attn_scalar),
        attn_logit_softcapping=None if attn_cap is None else float(attn_cap),
        final_logit_softcapping=None if final_cap is None else float(final_cap),
    ))


# -- config.json ----------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], architecture: str) -> ModelConfig:
    if hf.get("model_type") == "gemma3" or "Gemma3ForConditionalGeneration" in (hf.get("architectures") or []):
        raise UnsupportedModelError(
            "Gemma3ForConditionalGeneration (Gemma 3 with its vision tower) is not supported: convert a text-only "
            "checkpoint (Gemma3ForCausalLM: gemma-3-270m, gemma-3-1b) or the model's GGUF file, which holds the "
            "text decoder alone")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("Gemma with use_bidirectional_attention (an encoder) is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"Gemma activation {act!r} is not supported (supported: gelu_pytorch_tanh)")
    defaults = _HF_DEFAULTS[architecture]
    hf = {"head_dim": _HEAD_DIM, "max_position_embeddings": defaults["max_position_embeddings"],
          "tie_word_embeddings": True, **{k: v for k, v in hf.items() if v is not None or k.endswith("softcapping")}}
    n_layers = int(need(hf, "num_hidden_layers", "config.json"))
    layer_types = hf.get("layer_types") or default_layer_types(architecture, n_layers,
                                                               hf.get("sliding_window_pattern"))
    rope_params = hf.get("rope_parameters") or {}
    if architecture == "gemma3":
        # transformers >= 5 writes one rope per layer type; older configs rope_theta (+ rope_scaling) for the global
        # layers and rope_local_base_freq for the sliding ones
        if "full_attention" in rope_params or "sliding_attention" in rope_params:
            rope = rope_from_hf({"rope_parameters": rope_params.get("full_attention"),
                                 "rope_theta": defaults["rope_theta"]})
            rope_local = rope_from_hf({"rope_parameters": rope_params.get("sliding_attention"),
                                       "rope_theta": defaults["rope_local_base_freq"]})
        else:
            rope = rope_from_hf({"rope_scaling": hf.get("rope_scaling"),
                                 "rope_theta": hf.get("rope_theta", defaults["rope_theta"])})
            rope_local = {"type": "default",
                          "theta": float(hf.get("rope_local_base_freq", defaults["rope_local_base_freq"]))}
        attn_cap = None  # see the module docstring
    else:
        rope = rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", defaults["rope_theta"])})
        rope_local = None  # sliding layers use the same rope
        attn_cap = hf.get("attn_logit_softcapping", defaults["attn_logit_softcapping"])
    # the common keys, with the rope read above (common_from_hf knows only one flat rope)
    kw = {**common_from_hf({**hf, "rope_parameters": None, "rope_scaling": None}, architecture), "rope": rope,
          "attention_bias": bool(hf.get("attention_bias"))}
    return _gemma_config(architecture, kw, layer_types=layer_types, sliding_window=hf.get("sliding_window", 4096),
                         rope_local=rope_local, query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                         attn_cap=attn_cap,
                         final_cap=hf.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
                         where="config.json")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """Gemma2ForCausalLM / Gemma3ForCausalLM `config.json` for cfg (export)."""
    arch, model_type = HF_CLASSES[cfg.architecture]
    out = {"architectures": [arch], "model_type": model_type, **common_hf_config(cfg)}
    del out["hidden_act"]
    scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.head_dim
    out.update(hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.attention_bias,
               query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
               sliding_window=cfg.sliding_window, layer_types=cfg.layer_types or
               ["full_attention"] * cfg.num_hidden_layers,
               attn_logit_softcapping=cfg.attn_logit_softcapping,
               final_logit_softcapping=cfg.final_logit_softcapping)
    if cfg.architecture == "gemma3":
        local = cfg.rope_local or cfg.rope
        if local["type"] != "default":
            raise UnsupportedModelError(f"Gemma 3's local rope of type {local['type']!r} has no config.json key")
        out["rope_local_base_freq"] = float(local["theta"])
    return out


def hf_rules(cfg: ModelConfig) -> list[TensorRule]:
    """HF Gemma checkpoints use occrt's names; their norm weights hold w for the multiplier 1 + w."""
    return [TensorRule(n, (n,), offset=1.0 if n.endswith("norm.weight") else 0.0) for n in tensor_shapes(cfg)]


# -- GGUF -----------------------------------------------------------------------------------------------------------
# llama.cpp's Gemma tensors: ffn_norm is the norm before the MLP, and the sandwich norms have their own names. The q/k
# rows are not permuted: llama.cpp runs Gemma with NEOX-style rope, which rotates halves as HF does.
GGUF_LAYER_GEMMA = {**GGUF_LAYER, "ffn_norm": "pre_feedforward_layernorm",
                    "post_attention_norm": "post_attention_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm"}


def gguf_rules(cfg: ModelConfig) -> list[TensorRule]:
    return gguf_rules_by_table(cfg, GGUF_LAYER_GEMMA)


def config_from_gguf(fields: dict[str, Any], tensor_shapes_: dict[str, tuple[int, ...]],
                     architecture: str) -> ModelConfig:
    """`fields`: GGUF key -> Python value; `tensor_shapes_`: GGUF tensor name -> numpy-order shape.

    Gemma GGUF files do not record what llama.cpp hard-codes: Gemma 2 alternates sliding and global layers, Gemma 3
    makes every sixth layer global with local rope base 10000, and scores are scaled by 1/sqrt(head_dim) except on
    27B models. Newer files may carry `attention.sliding_window_pattern` (a period, or a flag per layer: true =
    sliding) and `rope.freq_base_swa`; they are read when present.
    """
    arch = fields.get("general.architecture")
    where = "GGUF metadata"
    get = gguf_get(fields, arch)
    kw = common_from_gguf(fields, tensor_shapes_, architecture)
    kw["rms_norm_eps"] = float(get("attention.layer_norm_rms_epsilon", 1e-6))
    if kw["rope"]["type"] not in ("default", "linear"):
        raise UnsupportedModelError(f"GGUF rope scaling {kw['rope']['type']!r} is not supported for Gemma "
                                    f"(only linear)")
    if int(get("attention.value_length", kw["head_dim"])) != kw["head_dim"]:
        raise UnsupportedModelError("Gemma GGUF files with value_length != key_length are not supported")
    n_layers = kw["num_hidden_layers"]
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ConversionError(f"{where}: attention.sliding_window_pattern has {len(pattern)} flags for "
                                  f"{n_layers} layers")
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        layer_types = default_layer_types(architecture, n_layers, int(pattern) if pattern else None)
    if architecture == "gemma3":
        rope_local = {"type": "default", "theta": float(get("rope.freq_base_swa", 10000.0))}
        attn_cap, final_cap = None, get("final_logit_softcapping")
    else:
        rope_local = None
        attn_cap, final_cap = get("attn_logit_softcapping", 50.0), get("final_logit_softcapping", 30.0)
    if get("rope.freq_base") is None:
        kw["rope"]["theta"] = _HF_DEFAULTS[architecture]["rope_theta"]
    hidden, heads = kw["hidden_size"], kw["num_attention_heads"]
    scalar = hidden // heads if n_layers == _GGUF_27B_LAYERS[architecture] else kw["head_dim"]
    kw["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes_
    return _gemma_config(architecture, kw, layer_types=layer_types,
                         sliding_window=int(need(fields, f"{arch}.attention.sliding_window", where)),
                         rope_local=rope_local, query_pre_attn_scalar=scalar, attn_cap=attn_cap,
                         final_cap=final_cap, where=where)
