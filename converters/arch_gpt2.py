"""The GPT-2 family in the converter: GPT2LMHeadModel checkpoints (and llama.cpp's gpt2 GGUF files).

GPT-2 differs from Llama almost everywhere, and every difference is a config key of occrt's decoder:
    learned absolute positions (`wpe`)            position_type "learned", model.embed_positions
    LayerNorm with bias, eps layer_norm_epsilon   norm_type "layer" (`rms_norm_eps` holds the epsilon)
    MLP c_fc -> gelu_new -> c_proj                mlp_type "plain", hidden_act "gelu_tanh" (gelu_new is the tanh form)
    biases on every projection                    attention_bias, mlp_bias
    multi-head attention, scores / √d             num_key_value_heads = heads; scale_attn_weights false: scale 1
    tied head                                     tie_word_embeddings (default true)
Its weights are Conv1D: stored (in, out), so transposed here; `c_attn` holds q, k, v side by side and is split.
Names (checkpoint -> occrt; `transformer.` is absent from some older checkpoints):
    transformer.wte / wpe / ln_f            model.embed_tokens / model.embed_positions / model.norm
    transformer.h.{i}.ln_1 / ln_2           model.layers.{i}.input_layernorm / post_attention_layernorm
    transformer.h.{i}.attn.c_attn           model.layers.{i}.self_attn.{q,k,v}_proj    (transposed, split)
    transformer.h.{i}.attn.c_proj           model.layers.{i}.self_attn.o_proj          (transposed)
    transformer.h.{i}.mlp.c_fc / c_proj     model.layers.{i}.mlp.up_proj / down_proj   (transposed)
llama.cpp's GGUF files hold the same tensors already as (out, in), fused `attn_qkv` included.
"""
from __future__ import annotations

import re
from typing import Any

from occrt.converters.arch_llama import common_from_gguf, gguf_get, need, validated
from occrt.converters.tensor_rules import TensorRule
from occrt.errors import UnsupportedModelError
from occrt.model.config import ModelConfig

HF_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2"}
HF_MODEL_TYPES = {"gpt2": "gpt2"}
GGUF_ARCHITECTURES = {"gpt2": "gpt2"}
HF_CLASSES = {"gpt2": ("GPT2LMHeadModel", "gpt2")}
# causal-mask buffers older checkpoints saved with the weights
HF_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation, three spellings


def normalize_hf_name(name: str) -> str:
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def config_from_hf(hf: dict[str, Any], architecture: str) -> ModelConfig:
    where = "config.json"
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"GPT-2 activation {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    for key, why in (("scale_attn_by_inverse_layer_idx", "scores scaled by 1/(layer+1)"),
                     ("add_cross_attention", "cross-attention (an encoder-decoder model)")):
        if hf.get(key):
            raise UnsupportedModelError(f"GPT-2 with {key} ({why}) is not supported")
    hidden = int(hf.get("n_embd") or need(hf, "hidden_size", where))
    heads = int(hf.get("n_head") or need(hf, "num_attention_heads", where))
    return validated(ModelConfig(
        architecture=architecture,
        vocab_size=int(need(hf, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        num_hidden_layers=int(hf.get("n_layer") or need(hf, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(hf.get("n_positions") or need(hf, "max_position_embeddings", where)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True,
        mlp_bias=True,
        hidden_act="gelu_tanh",
        norm_type="layer",
        mlp_type="plain",
        position_type="learned",
        query_pre_attn_scalar=None if hf.get("scale_attn_weights", True) else 1.0,
    ))


def config_from_gguf(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]], architecture: str) -> ModelConfig:
    kw = common_from_gguf(fields, shapes, architecture)
    get = gguf_get(fields, fields["general.architecture"])
    kw.update(rms_norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)), num_key_value_heads=kw[
        "num_attention_heads"], head_dim=kw["hidden_size"] // kw["num_attention_heads"])
    return validated(ModelConfig(**kw, attention_bias=True, mlp_bias=True, hidden_act="gelu_tanh", norm_type="layer",
                                 mlp_type="plain", position_type="learned"))


def _layer_rules(i: int, src: str, *, conv1d: bool, qkv: str, o: str, up: str, down: str,
                 norms: tuple[str, str]) -> list[TensorRule]:
    occ = f"model.layers.{i}."
    rules = []
    for kind in ("weight", "bias"):
        rules.append(TensorRule(f"{src}{norms[0]}.{kind}", (f"{occ}input_layernorm.{kind}",)))
    for kind in ("weight", "bias"):
        t = conv1d and kind == "weight"
        rules += [TensorRule(f"{src}{qkv}.{kind}", tuple(f"{occ}self_attn.{p}_proj.{kind}" for p in "qkv"), t),
                  TensorRule(f"{src}{o}.{kind}", (f"{occ}self_attn.o_proj.{kind}",), t)]
    for kind in ("weight", "bias"):
        rules.append(TensorRule(f"{src}{norms[1]}.{kind}", (f"{occ}post_attention_layernorm.{kind}",)))
    for kind in ("weight", "bias"):
        t = conv1d and kind == "weight"
        rules += [TensorRule(f"{src}{up}.{kind}", (f"{occ}mlp.up_proj.{kind}",), t),
                  TensorRule(f"{src}{down}.{kind}", (f"{occ}mlp.down_proj.{kind}",), t)]
    return rules


def hf_rules(cfg: ModelConfig) -> list[TensorRule]:
    """transformers' GPT2LMHeadModel state dict, in its order."""
    rules = [TensorRule("transformer.wte.weight", ("model.embed_tokens.weight",)),
             TensorRule("transformer.wpe.weight", ("model.embed_positions.weight",))]
    for i in range(cfg.num_hidden_layers):
        rules += _layer_rules(i, f"transformer.h.{i}.", conv1d=True, qkv="attn.c_attn", o="attn.c_proj",
                              up="mlp.c_fc", down="mlp.c_proj", norms=("ln_1", "ln_2"))
    rules += [TensorRule("transformer.ln_f.weight", ("model.norm.weight",)),
              TensorRule("transformer.ln_f.bias", ("model.norm.bias",))]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head.weight",)))
    return rules


def gguf_rules(cfg: ModelConfig) -> list[TensorRule]:
    rules = [TensorRule("token_embd.weight", ("model.embed_tokens.weight",)),
             TensorRule("position_embd.weight", ("model.embed_positions.weight",)),
             TensorRule("output_norm.weight", ("model.norm.weight",)),
             TensorRule("output_norm.bias", ("model.norm.bias",))]
    for i in range(cfg.num_hidden_layers):
        rules += _layer_rules(i, f"blk.{i}.", conv1d=False, qkv="attn_qkv", o="attn_output", up="ffn_up",
                              down="ffn_down", norms=("attn_norm", "ffn_norm"))
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("output.weight", ("lm_head.weight",)))
    return rules


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.num_key_value_heads != cfg.num_attention_heads or cfg.head_dim * cfg.num_attention_heads != \
            cfg.hidden_size:
        raise UnsupportedModelError("GPT-2 has multi-head attention with head_dim = hidden / heads")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_hidden_layers, "n_head": cfg.num_attention_heads,
            "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.rms_norm_eps,
            "scale_attn_weights": cfg.query_pre_attn_scalar is None, "tie_word_embeddings": cfg.tie_word_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
