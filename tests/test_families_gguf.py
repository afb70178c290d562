"""GGUF files of the new families (llama.cpp's layout, float32 tensors, written here with gguf.GGUFWriter from a tiny
transformers model): every name the writer uses is one llama.cpp defines for the architecture (gguf-py's own
tables), transformers' GGUF reader loads the file into the source's logits where it supports the architecture, and
occrt's conversion of the file computes the source's logits and holds exactly the tensors of the HF conversion."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import occrt
from occrt.converters.convert import convert
from tests.conftest import hf_logits
from tests.test_families import IDS, make_family_dir
from tests.tiny_gguf import add_tokenizer, new_writer, write_tensors_and_close

gguf = pytest.importorskip("gguf")

# HF layer module -> llama.cpp block tensor, as llama.cpp's converter names them
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
           "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{kind}"
    parts = stem.split(".")  # model.layers.{i}.<module> or transformer.h.{i}.<module>
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}.{kind}"


def write_gguf(src: str, path: str, arch: str) -> list[str]:
    """The checkpoint in `src` as llama.cpp lays out a GGUF of `arch` (no q/k permutation: these architectures
    use NEOX rope); returns the tensor names written."""
    hf = json.load(open(os.path.join(src, "config.json")))
    tok = json.load(open(os.path.join(src, "tokenizer.json")))
    if arch == "gpt2":
        g = new_writer(path, arch, context=hf["n_positions"], embedding=hf["n_embd"], blocks=hf["n_layer"],
                       feed_forward=hf["n_inner"] or 4 * hf["n_embd"], heads=hf["n_head"])
        g.add_layer_norm_eps(hf["layer_norm_epsilon"])
    else:
        g = new_writer(path, arch, context=hf["max_position_embeddings"], embedding=hf["hidden_size"],
                       blocks=hf["num_hidden_layers"], feed_forward=hf["intermediate_size"],
                       heads=hf["num_attention_heads"], heads_kv=hf["num_key_value_heads"])
        g.add_layer_norm_rms_eps(hf["rms_norm_eps"])
        g.add_rope_freq_base((hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        g.add_key_length(head_dim)
        g.add_value_length(head_dim)
        g.add_rope_dimension_count(head_dim)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    add_tokenizer(g, "gpt2", [t for t, _ in vocab],
                  [3 if t.startswith("<") and t.endswith(">") else 1 for t, _ in vocab], bos=1, eos=2, pad=0,
                  pre="default", merges=[m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])

    def transform(name: str, a: np.ndarray) -> np.ndarray:
        # llama.cpp stores GPT-2's Conv1D weights as (out, in)
        return np.ascontiguousarray(a.T) if name.endswith(_CONV1D) else a

    return write_tensors_and_close(g, src, gguf_name, transform)


def llama_cpp_names(arch: str, n_layers: int) -> set[str]:
    """The tensor names gguf-py (llama.cpp's own Python package) defines for `arch`."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    model_arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)
    return {TENSOR_NAMES[t].format(bid=i) + suffix for t in MODEL_TENSORS[model_arch] for i in range(n_layers)
            for suffix in (".weight", ".bias")}


# test family -> (GGUF architecture, does transformers' GGUF reader load it as the source?)
# (its qwen3 reader takes head_dim from the config's default, 128, not from attention.key_length)
CASES = {"qwen2": ("qwen2", True), "qwen3": ("qwen3", False), "phi3": ("phi3", True), "gpt2_untied": ("gpt2", True)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gguf_conversion_matches_the_source(name, tmp_path):
    arch, transformers_reads_it = CASES[name]
    # transformers' GGUF reader takes GPT-2's context from its default config (1024), not from the file
    src = make_family_dir(tmp_path / "hf", name, seed=9, **({"n_positions": 1024} if arch == "gpt2" else {}))
    path = str(tmp_path / "m.gguf")
    names = write_gguf(src, path, arch)
    n_layers = json.load(open(os.path.join(src, "config.json"))).get("num_hidden_layers") or 3
    assert set(names) <= llama_cpp_names(arch, n_layers)
    ref = hf_logits(src, IDS)
    if transformers_reads_it:  # an independent reading of the written layout
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
        with torch.no_grad():
            assert np.abs(model(torch.tensor([IDS])).logits[0].numpy() - ref).max() < 1e-4
    from_gguf, from_hf = str(tmp_path / "gguf.occ"), str(tmp_path / "hf.occ")
    convert(path, from_gguf, log=lambda msg: None)
    convert(src, from_hf, log=lambda msg: None)
    model = occrt.load(from_gguf)
    got = model.forward(np.asarray(IDS), model.new_cache(len(IDS)), all_logits=True)
    assert np.abs(got - ref).max() < 1e-4
    assert model.config.architecture == occrt.load(from_hf).config.architecture
    with occrt.format.OccFile.open(from_gguf) as a, occrt.format.OccFile.open(from_hf) as b:
        assert set(a.tensors) == set(b.tensors)
        for t in a.tensors:
            assert np.array_equal(a.tensor(t), b.tensor(t)), t
    model.close()
