"""Gemma 2 and Gemma 3 (text) against transformers on tiny random models built here: logits at every position,
greedy tokens, incremental decoding past the sliding window; the config mapping of HF configs and GGUF metadata;
a tiny Gemma 3 GGUF written here (llama.cpp's conventions: norm weights stored with +1) read by both sides.

The models are small enough to run in a second, but each Gemma feature bites: the sliding window (6) is shorter than
the sequences (32), the local and global rope bases differ, query_pre_attn_scalar differs from head_dim, head_dim
differs from hidden/heads, the norm weights are far from 0 (HF stores w, the model multiplies by 1 + w), and the
Gemma 2 soft-caps are small enough that tanh is far from linear. `test_each_feature_moves_the_reference` shows that
dropping any of them moves transformers' logits by far more than the parity tolerance.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

import occrt
from occrt.converters.convert import convert
from occrt.errors import ConversionError, UnsupportedModelError
from tests.conftest import build_tokenizer_json, hf_greedy, hf_logits
from tests.tiny_gguf import add_tokenizer, new_writer, write_tensors_and_close

IDS = [1, 17, 5, 93, 200, 41, 7, 7, 150, 3, 64, 250, 11, 90, 120, 33,
       8, 19, 301, 44, 45, 46, 2, 99, 180, 181, 60, 12, 13, 77, 250, 5]  # 32 tokens, window 6
WINDOW = 6

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.15)
FAMILIES = {
    # Gemma 2: alternate sliding/full layers, one rope, both soft-caps (transformers' defaults are 50 and 30, which
    # a tiny random model never reaches: these bite)
    "gemma2": dict(BASE, num_hidden_layers=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   rope_theta=500.0),
    # Gemma 3: q/k norms, local rope base for sliding layers, sliding pattern 3 (two local layers, one global)
    "gemma3": dict(BASE, num_hidden_layers=4, sliding_window_pattern=3, rope_theta=5000.0,
                   rope_local_base_freq=50.0),
}


def make_gemma_dir(path, family: str, *, seed: int = 0, **overrides) -> str:
    """Write a tiny random Gemma 2 / Gemma 3 text checkpoint (config, safetensors, tokenizer) to `path`."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    config_cls, model_cls = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                             "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    cfg = dict(FAMILIES[family])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg))
    with torch.no_grad():  # Gemma norms hold w with the scale 1 + w; spread w so 1 + w is far from 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.4 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(build_tokenizer_json(cfg["vocab_size"]))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)
    return str(path)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gemma(request, tmp_path_factory) -> tuple[str, str]:
    """(checkpoint dir, converted .occ) for each family."""
    root = tmp_path_factory.mktemp(request.param)
    src = make_gemma_dir(root / "src", request.param)
    out = str(root / "m.occ")
    convert(src, out, log=lambda msg: None)
    return src, out


def occrt_logits(path: str, ids: list[int]) -> np.ndarray:
    model = occrt.load(path)
    return model.forward(np.asarray(ids), model.new_cache(len(ids)), all_logits=True)


def test_logits_match_transformers_at_every_position(gemma):
    src, occ = gemma
    ref = hf_logits(src, IDS)
    got = occrt_logits(occ, IDS)
    assert got.shape == ref.shape == (len(IDS), 320)
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(ref).max() > 1.0  # not vacuous: logits far from zero


def test_reference_forward_matches_the_kernels(gemma):
    _, occ = gemma
    model = occrt.load(occ).network
    fast = model.forward(np.asarray(IDS), model.new_cache(len(IDS)), all_logits=True)
    slow = model.reference_forward(np.asarray(IDS), model.new_cache(len(IDS)), all_logits=True)
    assert np.abs(fast - slow).max() < 1e-4


def test_incremental_decode_past_the_window_matches_prefill(gemma):
    _, occ = gemma
    model = occrt.load(occ)
    full = occrt_logits(occ, IDS)
    cache = model.new_cache(len(IDS))
    model.forward(np.asarray(IDS[:3]), cache)  # shorter than the window, then one token at a time well past it
    steps = [model.forward(np.asarray([t]), cache) for t in IDS[3:]]
    assert np.abs(np.stack(steps) - full[3:]).max() < 1e-4
    # and in uneven chunks that straddle the window's edge
    cache = model.new_cache(len(IDS))
    chunks, at = [], 0
    for n in (5, 4, 9, 1, 13):
        logits = model.forward(np.asarray(IDS[at:at + n]), cache, all_logits=True)
        chunks.append(logits)
        at += n
    assert np.abs(np.concatenate(chunks) - full).max() < 1e-4


def test_greedy_generation_is_token_identical(gemma):
    src, occ = gemma
    prompt = IDS[:6]
    ref = hf_greedy(src, prompt, 24)  # 30 positions: five windows' worth
    model = occrt.load(occ)
    got = list(occrt.generate.generate_tokens(model.network, prompt, max_new_tokens=24,
                                              sampling=occrt.generate.SamplingParams()))
    assert got == ref


@pytest.mark.parametrize("family, change", [
    ("gemma2", {"sliding_window": 64}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 24}),
    ("gemma3", {"sliding_window": 64}),
    ("gemma3", {"rope_local_base_freq": 5000.0}),
])
def test_each_feature_moves_the_reference(family, change, tmp_path):
    """The parity tests above could not pass with any of these features missing or wrong in occrt."""
    a = hf_logits(make_gemma_dir(tmp_path / "a", family, seed=1), IDS)
    b = hf_logits(make_gemma_dir(tmp_path / "b", family, seed=1, **change), IDS)
    assert np.abs(a - b).max() > 1e-2


def test_variants_match_transformers(tmp_path):
    """Gemma 3 with untied head, linear rope scaling on the global layers, a final soft-cap, MQA, and an attention
    soft-cap in its config (which Gemma 3 does not apply); Gemma 2 with one layer per type."""
    cases = [("gemma3", dict(tie_word_embeddings=False, num_key_value_heads=1, final_logit_softcapping=4.0,
                             attn_logit_softcapping=1.0, rope_scaling={"rope_type": "linear", "factor": 4.0})),
             ("gemma2", dict(num_hidden_layers=2, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16))]
    for i, (family, change) in enumerate(cases):
        src = make_gemma_dir(tmp_path / f"src{i}", family, seed=7, **change)
        out = str(tmp_path / f"m{i}.occ")
        convert(src, out, log=lambda msg: None)
        assert np.abs(occrt_logits(out, IDS) - hf_logits(src, IDS)).max() < 1e-4, family


# --- the config mapping -------------------------------------------------------------------------------------------

def _gguf_fields(arch: str, **extra) -> dict:
    fields = {"general.architecture": arch, f"{arch}.context_length": 32768, f"{arch}.embedding_length": 640,
              f"{arch}.block_count": 18, f"{arch}.feed_forward_length": 2048, f"{arch}.attention.head_count": 4,
              f"{arch}.attention.head_count_kv": 1, f"{arch}.attention.key_length": 256,
              f"{arch}.attention.value_length": 256, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
              f"{arch}.rope.freq_base": 1e6, f"{arch}.attention.sliding_window": 512}
    fields.update(extra)
    return fields


def test_gguf_gemma3_config_follows_llama_cpp_defaults():
    from occrt.converters.arch_gemma import config_from_gguf

    cfg = config_from_gguf(_gguf_fields("gemma3"), {"token_embd.weight": (262144, 640)}, "gemma3")
    # llama.cpp's Gemma 3: every sixth layer global, local rope base 10000, scores scaled by 1/sqrt(head_dim)
    assert cfg.layer_types == ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    assert cfg.sliding_window == 512 and cfg.rope["theta"] == 1e6 and cfg.rope_local["theta"] == 10000.0
    assert cfg.query_pre_attn_scalar == 256 and cfg.qk_norm and cfg.sandwich_norms
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert cfg.embedding_scale == float(np.float32(math.sqrt(640)))
    assert cfg.tie_word_embeddings and cfg.vocab_size == 262144 and cfg.head_dim == 256


def test_gguf_gemma2_config_reads_the_soft_caps():
    from occrt.converters.arch_gemma import config_from_gguf

    fields = _gguf_fields("gemma2", **{"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
                                       "gemma2.block_count": 4, "gemma2.attention.sliding_window": 4096})
    cfg = config_from_gguf(fields, {"token_embd.weight": (256000, 640)}, "gemma2")
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
    assert not cfg.qk_norm and cfg.rope_local is None


def test_gguf_gemma_tensor_names():
    from occrt.converters.arch_gemma import config_from_gguf, gguf_rules

    cfg = config_from_gguf(_gguf_fields("gemma3", **{"gemma3.block_count": 2}), {"token_embd.weight": (262144, 640)},
                           "gemma3")
    source = {r.parts[0]: r.source for r in gguf_rules(cfg)}
    assert source["model.layers.1.pre_feedforward_layernorm.weight"] == "blk.1.ffn_norm.weight"
    assert source["model.layers.1.post_feedforward_layernorm.weight"] == "blk.1.post_ffw_norm.weight"
    assert source["model.layers.1.post_attention_layernorm.weight"] == "blk.1.post_attention_norm.weight"
    assert source["model.layers.0.self_attn.q_norm.weight"] == "blk.0.attn_q_norm.weight"
    assert source["model.norm.weight"] == "output_norm.weight"
    # no q/k row permutation (llama.cpp runs Gemma with rotate-half rope) and no norm offset (GGUF stores 1 + w)
    assert all(r.permute_heads == 0 and r.offset == 0 for r in gguf_rules(cfg))


def test_multimodal_gemma3_and_bad_configs_are_refused_clearly(tmp_path):
    from occrt.converters.architectures import config_from_hf

    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration.*text"):
        config_from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                        "text_config": {"hidden_size": 64}})
    good = json.load(open(os.path.join(make_gemma_dir(tmp_path / "g", "gemma2"), "config.json")))
    with pytest.raises(ConversionError, match="layer_types"):
        config_from_hf(dict(good, layer_types=["sliding_attention"]))  # 1 entry for 3 layers
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        config_from_hf(dict(good, use_bidirectional_attention=True))


# --- tiny Gemma GGUF files in llama.cpp's layout -------------------------------------------------------------------

_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gemma_gguf(src_dir: str, path: str) -> None:
    """The checkpoint in `src_dir` as llama.cpp's converter lays out a Gemma 2 / Gemma 3 GGUF: its tensor names,
    norm weights stored as 1 + w, Gemma 2's soft-caps, a sentencepiece-style vocabulary; float32 tensors. What the
    file cannot record (Gemma 2 alternates layers, Gemma 3 makes every sixth global with local rope base 10000,
    query_pre_attn_scalar = head_dim) must hold for `src_dir`'s config."""
    from tests.conftest import WORDS

    with open(os.path.join(src_dir, "config.json")) as f:
        hf = json.load(f)
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3"}[hf["model_type"]]
    g = new_writer(path, arch, context=hf["max_position_embeddings"], embedding=hf["hidden_size"],
                   blocks=hf["num_hidden_layers"], feed_forward=hf["intermediate_size"],
                   heads=hf["num_attention_heads"], heads_kv=hf["num_key_value_heads"])
    g.add_key_length(hf["head_dim"])
    g.add_value_length(hf["head_dim"])
    g.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    rope = hf["rope_parameters"]
    g.add_rope_freq_base(rope["full_attention"]["rope_theta"] if arch == "gemma3" else rope["rope_theta"])
    g.add_sliding_window(hf["sliding_window"])
    if arch == "gemma2":
        g.add_attn_logit_softcapping(hf["attn_logit_softcapping"])
        g.add_final_logit_softcapping(hf["final_logit_softcapping"])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + sorted(set("".join(WORDS)))
    pieces += sorted({"\u2581" + w for w in WORDS})
    pieces = (pieces + [f"<unused{i}>" for i in range(len(pieces), hf["vocab_size"])])[:hf["vocab_size"]]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(pieces) - 260)  # control, unknown, byte, normal
    add_tokenizer(g, "llama", pieces, types, bos=2, eos=1, pad=0, scores=[-float(i) for i in range(len(pieces))],
                  unk=3, add_bos=True)
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}

    def rename(name: str) -> str:
        if name in globals_:
            return globals_[name]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        return f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.{m.group(3)}"

    write_tensors_and_close(g, src_dir, rename,
                            lambda name, a: a + np.float32(1.0) if name.endswith("norm.weight") else a)


# transformers' GGUF reader takes Gemma 2's soft-caps from its config defaults (50, 30), not from the file
GGUF_CASES = {"gemma2": dict(num_hidden_layers=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
              "gemma3": dict(num_hidden_layers=6, sliding_window_pattern=6, rope_local_base_freq=10000.0)}


@pytest.mark.parametrize("family", sorted(GGUF_CASES))
def test_tiny_gguf_matches_transformers_on_the_same_file(family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = make_gemma_dir(tmp_path / "src", family, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                         query_pre_attn_scalar=256, seed=11, **GGUF_CASES[family])
    write_gemma_gguf(src, str(tmp_path / "tiny.gguf"))
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(ref - hf_logits(src, IDS)).max() < 1e-5  # the file says what the checkpoint says
    out = str(tmp_path / "m.occ")
    convert(str(tmp_path / "tiny.gguf"), out, log=lambda msg: None)
    with occrt.format.OccFile.open(out) as f:  # the multiplier 1 + w is stored, once
        stored = f.tensor("model.layers.0.pre_feedforward_layernorm.weight")
    assert np.abs(stored - ref_model.model.layers[0].pre_feedforward_layernorm.weight.detach().numpy() - 1).max() \
        < 1e-6
    assert np.abs(occrt_logits(out, IDS) - ref).max() < 1e-4


# --- the rest of the toolchain on Gemma ---------------------------------------------------------------------------

def test_export_writes_gemma_checkpoints_transformers_reads(gemma, tmp_path):
    """occrt export --to hf: the Gemma class and config (soft-caps, layer types, local rope, query scalar) and the
    norms back as w (the +1 taken off); transformers computes occrt's logits from a raw and a 4-bpw file."""
    from occrt.converters.convert import ConvertOptions
    from occrt.export import ExportOptions, export_hf

    src, raw = gemma
    family = json.load(open(os.path.join(src, "config.json")))["model_type"]
    for options in (None, ConvertOptions(bpw=4.0)):
        occ = raw
        if options is not None:
            occ = str(tmp_path / "lossy.occ")
            convert(src, occ, options, log=lambda msg: None)
        out = str(tmp_path / "hf")
        export_hf(occ, out, ExportOptions(overwrite=True), log=lambda msg: None)
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["model_type"] == family
        assert np.abs(hf_logits(out, IDS) - occrt_logits(occ, IDS)).max() < 1e-4
    from safetensors.numpy import load_file

    name = "model.layers.1.post_feedforward_layernorm.weight"
    exported, source = (load_file(os.path.join(d, "model.safetensors"))[name] for d in (out, src))
    assert np.abs(exported - source).max() <= 2.0 ** -23  # (1 + w) - 1: w up to float32's rounding of 1 + w


def test_torch_path_matches_the_numpy_runtime(gemma):
    """device torch-cpu (the CUDA path's code): a prefill and decode steps past the window agree with numpy."""
    _, occ = gemma
    cpu, tch = occrt.load(occ), occrt.load(occ, device="torch-cpu")
    caches = [m.new_cache(len(IDS)) for m in (cpu, tch)]
    want = cpu.forward(np.asarray(IDS[:4]), caches[0], all_logits=True)
    assert np.abs(tch.forward(np.asarray(IDS[:4]), caches[1], all_logits=True) - want).max() < 1e-4
    for token in IDS[4:]:
        assert np.abs(tch.forward(np.asarray([token]), caches[1]) - cpu.forward(np.asarray([token]), caches[0])
                      ).max() < 1e-4
    cpu.close()
    tch.close()


def test_calibration_sees_the_runtime_inputs(gemma, tmp_path):
    """--calib runs transformers' Gemma built from the converted tensors (norms back to w): the second moment of
    layer 0's attention input equals the runtime's (scaled embedding, norm multiplier 1 + w); a calibrated 3-bpw
    conversion runs."""
    from occrt.converters.calibrate import calibrate, calibration_windows
    from occrt.converters.convert import ConvertOptions, open_source
    from occrt.model.decoder import rms_norm
    from tests.conftest import WORDS

    src, occ = gemma
    text = " ".join(WORDS * 40)
    source = open_source(src)
    cal = calibrate(source, text, n_tokens=200, ctx=64)
    net, cfg = occrt.load(occ).network, source.config
    ids = np.concatenate([np.asarray(w) for w in calibration_windows(source, text, n_tokens=200, ctx=64)])
    x = rms_norm(net.embed.rows(ids).astype(np.float64) * cfg.embedding_scale, net.layers[0].attn_norm.w,
                 cfg.rms_norm_eps)
    h = x.T @ x / len(x)
    got = cal.hessian_for("model.layers.0.self_attn.q_proj.weight")
    assert np.allclose(got, h, rtol=1e-4, atol=1e-6 * np.abs(h).max())
    (tmp_path / "calib.txt").write_text(text)
    out = str(tmp_path / "calib.occ")
    convert(src, out, ConvertOptions(bpw=3.0, calib=str(tmp_path / "calib.txt"), calib_tokens=256),
            log=lambda msg: None)
    assert np.isfinite(occrt_logits(out, IDS)).all()
