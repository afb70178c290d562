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
from occrt.progress import Progress
from occrt.model.config import ModelConfig
from occrt.model.linear import FORMS, PARALLEL_MIN_WEIGHTS, DenseLinear, available_cpus
from occrt.model.decoder import DecoderModel, LayerWeights, Norm


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the config's model needs, with its shape, in Hugging Face's state-dict order (the converter,
    the loader and the exporter all use this table; format_spec/occ.md 4.2 lists the names)."""
    d_model, d_ff, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    layer_norm = cfg.norm_type == "layer"  # LayerNorm has a bias beside each weight

    def norm(name: str, n: int = d_model) -> dict[str, tuple[int, ...]]:
        return {name + ".weight": (n,), **({name + ".bias": (n,)} if layer_norm else {})}

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d_model)}
    if cfg.position_type == "learned":
        shapes["model.embed_positions.weight"] = (cfg.max_position_embeddings, d_model)
    shapes.update(norm("model.norm"))
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d_model)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(norm(p + "input_layernorm"))
        shapes.update(norm(p + "post_attention_layernorm"))
        if cfg.sandwich_norms:
            shapes.update(norm(p + "pre_feedforward_layernorm"))
            shapes.update(norm(p + "post_feedforward_layernorm"))
        shapes.update({
            p + "self_attn.q_proj.weight": (q_out, d_model),
            p + "self_attn.k_proj.weight": (kv_out, d_model),
            p + "self_attn.v_proj.weight": (kv_out, d_model),
            p + "self_attn.o_proj.weight": (d_model, q_out),
        })
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if cfg.mlp_type == "gated":
            shapes[p + "mlp.gate_proj.weight"] = (d_ff, d_model)
        shapes.update({p + "mlp.up_proj.weight": (d_ff, d_model), p + "mlp.down_proj.weight": (d_model, d_ff)})
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if cfg.has_o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d_model,)
        if cfg.mlp_bias:
            if cfg.mlp_type == "gated":
                shapes[p + "mlp.gate_proj.bias"] = (d_ff,)
            shapes.update({p + "mlp.up_proj.bias": (d_ff,), p + "mlp.down_proj.bias": (d_model,)})
    return shapes




def check_tensors(occ: OccFile, cfg: ModelConfig) -> None:
    """The file holds every tensor the config implies, with that shape (before anything is decoded)."""
    for name, shape in tensor_shapes(cfg).items():
        entry = occ.tensors.get(name)
        if entry is None:
            raise FormatError(f"model needs tensor {name!r}, which the file lacks", path=occ.path)
        if entry.shape != shape:
            raise FormatError(f"tensor {name!r} has shape {list(entry.shape)}, the config implies {list(shape)}",
                              path=occ.path)


# Raw tensors below this size (norms, biases) are copied out of the mapping: reading a few bytes maps a whole
# page-cache folio (up to 2 MB on ext4), so sixty norm vectors held as views could keep ~100 MB of the file resident.
# Larger raw f32 tensors (weight matrices) stay zero-copy views of the file.
RAW_COPY_MAX = 1 << 16


def _f32(occ: OccFile, name: str) -> np.ndarray:
    a = occ.tensor(name)
    if a.dtype != np.float32:
        return a.astype(np.float32)
    return a.copy() if occ.tensors[name].length < RAW_COPY_MAX else a


def decode_forms(occ: OccFile, names: list[str], *, threads: int, progress: bool = False) -> dict[str, Any]:
    """The runtime form of each named matrix. Raw tensors are views; the others are decoded on `threads` threads in
    file order (so the file's pages are read, and released, as one moving window); a tensor holding more than its
    share of the work also spreads its ANS chunks over threads. `progress`: a bar on stderr over the decoded ones."""
    forms: dict[str, Any] = {}
    coded = []
    for name in names:
        entry = occ.tensors[name]
        if entry.codec == 0:
            forms[name] = DenseLinear(_f32(occ, name))
        else:
            coded.append(name)
    coded.sort(key=lambda n: occ.tensors[n].offset)
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
        bar.done(entry.n_elements, entry.length, name)
        return form

    with Progress("decode", total, enabled=progress and bool(coded)) as bar:
        if threads <= 1 or len(coded) <= 1:
            forms.update((name, one(name)) for name in coded)
            return forms
        with ThreadPoolExecutor(max_workers=threads) as pool:
            forms.update(zip(coded, pool.map(one, coded)))
    return forms


def load_model(occ: OccFile, cfg: ModelConfig, *, threads: int | None = None,
               parallel_kernels: bool = False, progress: bool = False) -> DecoderModel:
    """The model in its runtime form. `threads`: decoding threads (default: every CPU this process may use).
    `parallel_kernels`: spread the rows of large matrices (>= linear.PARALLEL_MIN_WEIGHTS weights) over numba's
    threads when decoding a token (off by default: see linear.PARALLEL_MIN_WEIGHTS). `progress`: a bar on stderr
    while the compressed tensors decode."""
    shapes = tensor_shapes(cfg)
    check_tensors(occ, cfg)
    views = [e for e in occ.tensors.values() if e.codec == 0 and e.dtype == "f32" and e.length >= RAW_COPY_MAX]
    # vectors (norms, biases) first, then their pages released: the mapping is then only read by the decoders,
    # whose window of pages moves through the file and is released behind them
    vectors = {name: _f32(occ, name) for name, shape in shapes.items() if len(shape) == 1}
    occ.release_all(keep=views)
    matrices = [name for name, shape in shapes.items() if len(shape) == 2]
    forms = decode_forms(occ, matrices, threads=threads or available_cpus(), progress=progress)
    occ.release_all(keep=views)
    if parallel_kernels:
        for form in forms.values():
            if hasattr(form, "parallel") and form.n_out * form.n_in >= PARALLEL_MIN_WEIGHTS:
                form.parallel = True

    def linear(prefix: str):
        form = forms[prefix + ".weight"]
        form.b = vectors.get(prefix + ".bias")
        return form

    def norm(prefix: str) -> Norm:
        return Norm(vectors[prefix + ".weight"], vectors.get(prefix + ".bias"))

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sandwich = cfg.sandwich_norms  # Gemma's names: post_attention_layernorm is the attention output's norm
        layers.append(LayerWeights(
            attn_norm=norm(p + "input_layernorm"),
            q=linear(p + "self_attn.q_proj"), k=linear(p + "self_attn.k_proj"),
            v=linear(p + "self_attn.v_proj"), o=linear(p + "self_attn.o_proj"),
            mlp_norm=norm(p + ("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm")),
            up=linear(p + "mlp.up_proj"), down=linear(p + "mlp.down_proj"),
            gate=linear(p + "mlp.gate_proj") if cfg.mlp_type == "gated" else None,
            q_norm=norm(p + "self_attn.q_norm") if cfg.qk_norm else None,
            k_norm=norm(p + "self_attn.k_norm") if cfg.qk_norm else None,
            attn_out_norm=norm(p + "post_attention_layernorm") if sandwich else None,
            mlp_out_norm=norm(p + "post_feedforward_layernorm") if sandwich else None,
        ))
    embed = forms["model.embed_tokens.weight"]
    head = embed if cfg.tie_word_embeddings else linear("lm_head")
    positions = forms.get("model.embed_positions.weight")
    return DecoderModel(cfg, embed=embed, layers=layers, norm=norm("model.norm"), head=head, positions=positions)
