"""The numpy runtime against transformers on tiny random Llama models: logits at every position, greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest

import occrt
from occrt.converters.convert import ConvertOptions, convert
from tests.conftest import hf_greedy, hf_logits, make_llama_dir

IDS = [1, 17, 5, 93, 200, 41, 7, 7, 150, 3, 64, 250, 11, 90, 120, 33]


def occrt_logits(path: str, ids: list[int]) -> np.ndarray:
    model = occrt.load(path)
    cache = model.new_cache(len(ids))
    return model.forward(np.asarray(ids), cache, all_logits=True)


def test_logits_match_transformers_at_every_position(tiny_llama_dir, tiny_occ):
    ref = hf_logits(tiny_llama_dir, IDS)
    got = occrt_logits(tiny_occ, IDS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(ref).max() > 1.0  # the check is not vacuous: logits are far from zero


def test_incremental_decode_matches_full_prefill(tiny_occ):
    model = occrt.load(tiny_occ)
    full = occrt_logits(tiny_occ, IDS)
    cache = model.new_cache(len(IDS))
    model.forward(np.asarray(IDS[:5]), cache)
    steps = [model.forward(np.asarray([t]), cache) for t in IDS[5:]]
    assert np.abs(np.stack(steps) - full[5:]).max() < 1e-4


def test_greedy_generation_is_token_identical(tiny_llama_dir, tiny_occ):
    prompt = IDS[:6]
    ref = hf_greedy(tiny_llama_dir, prompt, 24)
    model = occrt.load(tiny_occ)
    got = list(occrt.generate.generate_tokens(model.network, prompt, max_new_tokens=24,
                                              sampling=occrt.generate.SamplingParams()))
    assert got == ref


ROPE_VARIANTS = {
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    "tied_mha_theta": {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_theta": 500000.0},
    "biases_headdim": {"attention_bias": True, "mlp_bias": True, "head_dim": 24},
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_config_variants_match_transformers(variant, tmp_path):
    src = make_llama_dir(tmp_path / "src", seed=3, **ROPE_VARIANTS[variant])
    out = str(tmp_path / "m.occ")
    convert(src, out, log=lambda msg: None)
    ids = IDS * 3  # 48 positions: past the 64/factor boundaries of the scaled variants' low frequencies
    ref = hf_logits(src, ids)
    got = occrt_logits(out, ids)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("storage", ["f16", "bf16"])
def test_half_precision_storage_is_exact_for_half_checkpoints(storage, tmp_path):
    torch_dtype = {"f16": "float16", "bf16": "bfloat16"}[storage]
    src = make_llama_dir(tmp_path / "src", seed=5, dtype=torch_dtype)
    out = str(tmp_path / "m.occ")
    convert(src, out, log=lambda msg: None)
    with occrt.format.OccFile.open(out) as f:
        assert {e.dtype for e in f.tensors.values()} == {storage}
        import torch
        from safetensors.torch import load_file

        ref = load_file(f"{src}/model.safetensors")
        name = "model.layers.1.mlp.down_proj.weight"
        assert np.array_equal(f.tensor(name).astype(np.float32), ref[name].float().numpy())
    # the runtime computes in float32 from the exact half weights, as transformers does in float32
    ref_logits = _hf_logits_upcast(src, IDS)
    assert np.abs(occrt_logits(out, IDS) - ref_logits).max() < 1e-4


def _hf_logits_upcast(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_storage_dtype_option_converts(tiny_llama_dir, tmp_path):
    out = str(tmp_path / "m16.occ")
    convert(tiny_llama_dir, out, ConvertOptions(dtype="f16"), log=lambda msg: None)
    got = occrt_logits(out, IDS)
    ref = hf_logits(tiny_llama_dir, IDS)
    assert 1e-6 < np.abs(got - ref).max() < 0.05  # rounded to f16: close, not exact
