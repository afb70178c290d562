"""`occrt export --to hf`: transformers loads the folder and computes occrt's logits (f32 within 1e-4), for raw and
lossy-coded files, each rope type (GGUF's freq_factors through longrope), sharded or not; tokenizer, chat template and
generation config come along; the output is deterministic, and an existing folder is replaced only on request."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")

import occrt  # noqa: E402
from occrt.cli import main  # noqa: E402
from occrt.converters.convert import ConvertOptions, convert  # noqa: E402
from occrt.errors import OccError  # noqa: E402
from occrt.export import ExportOptions, export_hf, rope_scaling_to_hf  # noqa: E402
from tests.conftest import hf_logits, make_llama_dir  # noqa: E402

IDS = [1, 17, 5, 93, 200, 41, 7, 7, 150, 3, 64, 250, 11, 90, 120, 33]


def occrt_logits(path: str, ids=IDS) -> np.ndarray:
    model = occrt.load(path)
    try:
        return model.forward(np.asarray(ids), model.new_cache(len(ids)), all_logits=True)  # (T, vocab)
    finally:
        model.close()


def quiet(msg: str) -> None:
    pass


def digest(folder: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


def test_export_loads_in_transformers_with_the_same_logits(tiny_occ, tmp_path):
    out = str(tmp_path / "hf")
    summary = export_hf(tiny_occ, out, log=quiet)
    assert summary["dtype"] == "f32" and summary["files"] == ["model.safetensors"]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    ref = occrt_logits(tiny_occ)
    got = hf_logits(out, IDS)
    assert np.abs(got - ref).max() < 1e-4 and np.abs(ref).max() > 1.0


def test_tokenizer_template_and_generation_config_come_along(tiny_occ, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = str(tmp_path / "hf")
    export_hf(tiny_occ, out, log=quiet)
    model = occrt.load(tiny_occ)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("the cat sat") == model.tokenizer.encode("the cat sat")
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        model.tokenizer.apply_chat_template(messages)
    assert tok.eos_token_id in model.tokenizer.eos_token_ids and tok.bos_token_id == model.tokenizer.bos_token_id
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == model.tokenizer.eos_token_ids[0] and gen.bos_token_id == 1
    model.close()


def test_safetensors_hold_the_decoded_tensors_and_are_deterministic(tiny_occ, tmp_path):
    from safetensors.numpy import load_file

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    export_hf(tiny_occ, a, log=quiet)
    export_hf(tiny_occ, b, log=quiet)
    assert digest(a) == digest(b)
    tensors = load_file(os.path.join(a, "model.safetensors"))
    with occrt.format.reader.OccFile.open(tiny_occ) as occ:
        assert set(tensors) == set(occ.tensors)
        for name, w in tensors.items():
            assert np.array_equal(w, occ.tensor(name)), name


def test_dtypes_and_shards(tiny_occ, tmp_path):
    from safetensors import safe_open

    out = str(tmp_path / "bf16")
    summary = export_hf(tiny_occ, out, ExportOptions(dtype="bf16", max_shard_bytes=40_000), log=quiet)
    assert len(summary["files"]) > 2 and summary["files"][-1] == "model.safetensors.index.json"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(summary["files"][:-1])
    with occrt.format.reader.OccFile.open(tiny_occ) as occ:
        name = "model.layers.1.mlp.down_proj.weight"
        with safe_open(os.path.join(out, index["weight_map"][name]), "pt") as f:
            w = f.get_tensor(name)
        assert str(w.dtype) == "torch.bfloat16"
        want = occ.tensor(name)
        assert np.abs(w.float().numpy() - want).max() <= np.abs(want).max() * 2 ** -8  # bf16 rounding
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    f16 = str(tmp_path / "f16")
    export_hf(tiny_occ, f16, ExportOptions(dtype="f16", max_shard_bytes=40_000), log=quiet)
    ref = occrt_logits(tiny_occ)
    got = hf_logits(f16, IDS)  # sharded, f16 weights widened to f32 by transformers
    assert np.abs(got - ref).max() < 0.05


def test_lossy_codec_exports_what_occrt_computes(tiny_llama_dir, tmp_path):
    src = str(tmp_path / "lossy.occ")
    convert(tiny_llama_dir, src, ConvertOptions(bpw=3, rotate="both", ranks=(0, 4)), log=quiet)
    out = str(tmp_path / "hf")
    assert export_hf(src, out, log=quiet)["dtype"] == "f32"  # auto: lossy codecs' decoded values need f32
    ref = occrt_logits(src)
    got = hf_logits(out, IDS)
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(got - hf_logits(tiny_llama_dir, IDS)).max() > 1e-3  # the export is the lossy model, not the source


ROPES = {
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 16.0}},
    "linear_tied": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True,
                    "attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("variant", sorted(ROPES))
def test_rope_scaling_maps_back(variant, tmp_path):
    src = make_llama_dir(tmp_path / "src", seed=5, **ROPES[variant])
    occ = str(tmp_path / "m.occ")
    convert(src, occ, log=quiet)
    out = str(tmp_path / "hf")
    export_hf(occ, out, log=quiet)
    ids = (IDS * 8)[:100]  # past original_max_position_embeddings, where the scaled frequencies matter
    assert np.abs(hf_logits(out, ids) - occrt_logits(occ, ids)).max() < 1e-4


def test_rope_dicts_round_trip_through_the_converter():
    from occrt.converters.arch_llama import rope_from_hf

    for rope in ({"type": "default", "theta": 10000.0},
                 {"type": "linear", "theta": 1e4, "factor": 2.0},
                 {"type": "llama3", "theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
                 {"type": "yarn", "theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768,
                  "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.2}):
        hf = {"rope_theta": rope["theta"], "rope_scaling": rope_scaling_to_hf(rope, 131072)}
        assert rope_from_hf(hf) == rope


def test_gguf_freq_factors_export_as_longrope(tiny_occ, tmp_path):
    """A GGUF Llama 3 file's rope_freqs become rope type freq_factors; HF's longrope with equal factors matches."""
    from occrt.codecs.raw import RawCodec
    from occrt.format.reader import OccFile
    from occrt.format.writer import OccWriter

    path = str(tmp_path / "ff.occ")
    with OccFile.open(tiny_occ) as occ, OccWriter(path) as w:
        meta = dict(occ.metadata)
        config = dict(meta["model.config"])
        half = config["head_dim"] // 2
        config["rope"] = {"type": "freq_factors", "theta": 10000.0,
                          "factors": [float(f) for f in np.linspace(1.0, 8.0, half)]}
        meta["model.config"] = config
        for key, value in meta.items():
            w.set_metadata(key, value)
        w.add_blob("tokenizer.json", occ.blob("tokenizer.json"))
        for name in occ.tensors:
            w.add_tensor(name, RawCodec.encode(np.array(occ.tensor(name)), dtype="f32"))
        w.finish()
    out = str(tmp_path / "hf")
    export_hf(path, out, log=quiet)
    scaling = json.load(open(os.path.join(out, "config.json")))["rope_scaling"]
    assert scaling["rope_type"] == "longrope" and scaling["short_factor"] == scaling["long_factor"]
    ids = (IDS * 20)[:250]  # on both sides of original_max_position_embeddings
    assert np.abs(hf_logits(out, ids) - occrt_logits(path, ids)).max() < 1e-4


@pytest.mark.parametrize("family", ["mistral_sliding", "qwen2_sliding", "qwen3", "phi3_longrope", "gpt2_untied"])
def test_other_families_export_as_their_own_class(family, tmp_path):
    """The export writes the family's own config and tensor layout (Phi-3's fused q/k/v and gate/up, GPT-2's Conv1D
    weights); transformers loads it and computes occrt's logits, also from a lossy file (the split projections
    coded separately are fused back exactly as decoded)."""
    from tests.test_families import FAMILIES, make_family_dir

    src = make_family_dir(tmp_path / "src", family, seed=5)
    ids = (IDS * 2)[:24]  # past the sliding windows (4) and LongRoPE's original context (16)
    for options in (ConvertOptions(), ConvertOptions(bpw=4.0)):
        occ = str(tmp_path / "m.occ")
        convert(src, occ, options, log=quiet)
        out = str(tmp_path / "hf")
        export_hf(occ, out, ExportOptions(overwrite=True), log=quiet)
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["architectures"] == [FAMILIES[family][1]]
        assert np.abs(hf_logits(out, ids) - occrt_logits(occ, ids)).max() < 1e-4
        os.remove(occ)
    if family == "phi3_longrope":
        from safetensors import safe_open

        with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
            assert "model.layers.0.self_attn.qkv_proj.weight" in f.keys()
            assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()


def test_existing_folders_are_kept_unless_forced(tiny_occ, tmp_path, capsys):
    out = str(tmp_path / "hf")
    assert main(["export", tiny_occ, "--to", "hf", out]) == 0
    before = digest(out)
    assert main(["export", tiny_occ, "--to", "hf", out]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", tiny_occ, "--to", "hf", out, "--force", "--dtype", "f16"]) == 0
    assert digest(out) != before and json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float16"
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    assert main(["export", tiny_occ, "--to", "hf", out, "--force"]) == 2
    assert "notes.txt" in capsys.readouterr().err and os.path.exists(os.path.join(out, "notes.txt"))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temporary folder left behind
    with pytest.raises(OccError, match="dtype"):
        export_hf(tiny_occ, str(tmp_path / "x"), ExportOptions(dtype="int8"), log=quiet)


@pytest.mark.slow
def test_real_smollm2_export_matches(smollm2_gguf, tmp_path):
    """The real SmolLM2-135M-Instruct: GGUF -> .occ -> HF folder; transformers' logits and chat template agree."""
    from transformers import AutoTokenizer

    occ = str(tmp_path / "smol.occ")
    convert(smollm2_gguf, occ, log=quiet)
    out = str(tmp_path / "hf")
    export_hf(occ, out, log=quiet)
    model = occrt.load(occ)
    ids = model.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")
    ref = model.forward(np.asarray(ids), model.new_cache(len(ids)), all_logits=True)
    got = hf_logits(out, ids)
    assert np.abs(got - ref).max() < 1e-3 and np.abs(ref).max() > 10
    messages = [{"role": "user", "content": "Hi!"}]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        model.tokenizer.apply_chat_template(messages)
    model.close()
