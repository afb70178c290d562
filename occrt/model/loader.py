"""Build a runnable model from an open `.occ` file: tensor names -> the forward pass's weights.

Tensor names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...); format_spec/occ.md lists them.
Each weight matrix gets the runtime form its codec registers in `occrt.model.linear.FORMS` (compact codes for ecsq,
a zero-copy float32 view for raw f32); compressed tensors are decoded on a thread pool over all cores (the ANS
decoder releases the GIL), largest first, and their file pages are released once decoded.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from occrt.errors import FormatError
from occrt.format.reader import OccFile
from occrt.model.config import ModelConfig
from occrt.model.linear import FORMS, PARALLEL_MIN_WEIGHTS, DenseLinear, available_cpus
from occrt.model.llama import LayerWeights, LlamaModel

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


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


def _f32(occ: OccFile, name: str) -> np.ndarray:
    a = occ.tensor(name)
    return a if a.dtype == np.float32 else a.astype(np.float32)


def decode_forms(occ: OccFile, names: list[str], *, threads: int) -> dict[str, Any]:
    """The runtime form of each named matrix. Raw tensors are views; the others are decoded on `threads` threads,
    largest first; a tensor holding more than its share of the work also spreads its ANS chunks over threads."""
    forms: dict[str, Any] = {}
    coded = []
    for name in names:
        entry = occ.tensors[name]
        if entry.codec == 0:
            forms[name] = DenseLinear(_f32(occ, name))
        else:
            coded.append(name)
    coded.sort(key=lambda n: -occ.tensors[n].n_elements)
    total = sum(occ.tensors[n].n_elements for n in coded)

    def one(name: str) -> Any:
        entry = occ.tensors[name]
        build = FORMS.get(entry.codec)
        if build is None:  # no compact form: decoded to float32 (e.g. lossless planes)
            form = DenseLinear(_f32(occ, name))
        else:
            chunk_threads = max(1, min(threads, -(-entry.n_elements * threads // max(total, 1))))
            payload = occ.payload(entry)
            try:
                form = build(payload, shape=entry.shape, params=entry.params, threads=chunk_threads)
            except FormatError as e:
                raise FormatError(f"tensor {name!r}: {e.reason}",
                                  None if e.offset is None else entry.offset + e.offset, path=occ.path) from None
        occ.release(entry)
        return form

    if threads <= 1 or len(coded) <= 1:
        forms.update((name, one(name)) for name in coded)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            forms.update(zip(coded, pool.map(one, coded)))
    return forms


def load_llama(occ: OccFile, cfg: ModelConfig, *, threads: int | None = None,
               parallel_kernels: bool = False) -> LlamaModel:
    """The model in its runtime form. `threads`: decoding threads (default: every CPU this process may use).
    `parallel_kernels`: spread the rows of large matrices (>= linear.PARALLEL_MIN_WEIGHTS weights) over numba's
    threads when decoding a token (off by default: see linear.PARALLEL_MIN_WEIGHTS)."""
    check_llama_tensors(occ, cfg)
    names = ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    names += [f"model.layers.{i}.{p}.weight" for i in range(cfg.num_hidden_layers) for p in _PROJECTIONS]
    forms = decode_forms(occ, names, threads=threads or available_cpus())
    if parallel_kernels:
        for form in forms.values():
            if hasattr(form, "parallel") and form.n_out * form.n_in >= PARALLEL_MIN_WEIGHTS:
                form.parallel = True

    def linear(prefix: str, with_bias: bool):
        form = forms[prefix + ".weight"]
        if with_bias:
            form.b = _f32(occ, prefix + ".bias")
        return form

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        ab, mb = cfg.attention_bias, cfg.mlp_bias
        layers.append(LayerWeights(
            input_norm=_f32(occ, p + "input_layernorm.weight"),
            q=linear(p + "self_attn.q_proj", ab), k=linear(p + "self_attn.k_proj", ab),
            v=linear(p + "self_attn.v_proj", ab), o=linear(p + "self_attn.o_proj", ab),
            post_norm=_f32(occ, p + "post_attention_layernorm.weight"),
            gate=linear(p + "mlp.gate_proj", mb), up=linear(p + "mlp.up_proj", mb),
            down=linear(p + "mlp.down_proj", mb),
        ))
    embed = forms["model.embed_tokens.weight"]
    head = embed if cfg.tie_word_embeddings else linear("lm_head", False)
    return LlamaModel(cfg, embed=embed, layers=layers, norm=_f32(occ, "model.norm.weight"), head=head)
