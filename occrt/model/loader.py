"""Build a runnable model from an open `.occ` file: tensor names -> the forward pass's weights.

Tensor names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...); format_spec/occ.md lists them.
"""
from __future__ import annotations

import numpy as np

from occrt.errors import FormatError
from occrt.format.reader import OccFile
from occrt.model.config import ModelConfig
from occrt.model.llama import DenseLinear, LayerWeights, LlamaModel


def llama_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama-family model needs, with its shape (the converter and the loader both check these)."""
    d_model, d_ff, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d_model),
                                          "model.norm.weight": (d_model,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d_model)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d_model,),
            p + "post_attention_layernorm.weight": (d_model,),
            p + "self_attn.q_proj.weight": (q_out, d_model),
            p + "self_attn.k_proj.weight": (kv_out, d_model),
            p + "self_attn.v_proj.weight": (kv_out, d_model),
            p + "self_attn.o_proj.weight": (d_model, q_out),
            p + "mlp.gate_proj.weight": (d_ff, d_model),
            p + "mlp.up_proj.weight": (d_ff, d_model),
            p + "mlp.down_proj.weight": (d_model, d_ff),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,), p + "self_attn.o_proj.bias": (d_model,)})
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (d_ff,), p + "mlp.up_proj.bias": (d_ff,),
                           p + "mlp.down_proj.bias": (d_model,)})
    return shapes


def check_llama_tensors(occ: OccFile, cfg: ModelConfig) -> None:
    """The file holds every tensor the config implies, with that shape (before anything is decoded)."""
    for name, shape in llama_tensor_shapes(cfg).items():
        entry = occ.tensors.get(name)
        if entry is None:
            raise FormatError(f"model needs tensor {name!r}, which the file lacks", path=occ.path)
        if entry.shape != shape:
            raise FormatError(f"tensor {name!r} has shape {list(entry.shape)}, the config implies {list(shape)}",
                              path=occ.path)


def load_llama(occ: OccFile, cfg: ModelConfig) -> LlamaModel:
    check_llama_tensors(occ, cfg)

    def f32(name: str) -> np.ndarray:
        a = occ.tensor(name)
        return a if a.dtype == np.float32 else a.astype(np.float32)

    def linear(prefix: str, with_bias: bool) -> DenseLinear:
        return DenseLinear(f32(prefix + ".weight"), f32(prefix + ".bias") if with_bias else None)

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        ab, mb = cfg.attention_bias, cfg.mlp_bias
        layers.append(LayerWeights(
            input_norm=f32(p + "input_layernorm.weight"),
            q=linear(p + "self_attn.q_proj", ab), k=linear(p + "self_attn.k_proj", ab),
            v=linear(p + "self_attn.v_proj", ab), o=linear(p + "self_attn.o_proj", ab),
            post_norm=f32(p + "post_attention_layernorm.weight"),
            gate=linear(p + "mlp.gate_proj", mb), up=linear(p + "mlp.up_proj", mb),
            down=linear(p + "mlp.down_proj", mb),
        ))
    embed = f32("model.embed_tokens.weight")
    head = DenseLinear(embed) if cfg.tie_word_embeddings else linear("lm_head", False)
    return LlamaModel(cfg, embed=embed, layers=layers, norm=f32("model.norm.weight"), head=head)
