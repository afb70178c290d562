"""Mistral, Qwen2, Qwen3, Phi-3 and GPT-2 against transformers on tiny random models built here with transformers' own
config and model classes: logits at every position (f32, within 1e-4), greedy tokens (24, identical), incremental
decoding against a full prefill; each family's own features made to bite (a sliding window of 4 over 24 tokens,
q/k norms with head_dim != hidden/heads, fused projections, partial rotary and LongRoPE, Conv1D weights, learned
positions, LayerNorm biases)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import occrt
from occrt.converters.convert import ConvertOptions, convert
from occrt.errors import UnsupportedModelError
from tests.conftest import hf_greedy, hf_logits, make_hf_dir

IDS = [1, 17, 5, 93, 200, 41, 7, 7, 150, 3, 64, 250, 11, 90, 120, 33,
       8, 19, 301, 44, 45, 46, 2, 99]  # 24 tokens: six times the sliding window
WINDOW = 4
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, initializer_range=0.15)
_LONG = 16  # longrope's original context in the test: IDS is longer, so the long factors are used for it


def _factors(n: int, lo: float, hi: float) -> list[float]:
    return [float(f) for f in np.linspace(lo, hi, n)]


# name -> (transformers config class, model class, config)
FAMILIES = {
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", dict(BASE, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, rope_theta=5000.0)),
    "qwen2_sliding": ("Qwen2Config", "Qwen2ForCausalLM",  # layer 0 full, layer 1 sliding
                      dict(BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(BASE, head_dim=24, tie_word_embeddings=True)),
    "qwen3_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(BASE, head_dim=24, attention_bias=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(BASE, pad_token_id=0)),
    "phi3_sliding_partial": ("Phi3Config", "Phi3ForCausalLM",
                             dict(BASE, pad_token_id=0, sliding_window=WINDOW, partial_rotary_factor=0.5)),
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM",
                      dict(BASE, pad_token_id=0, partial_rotary_factor=0.75, original_max_position_embeddings=_LONG,
                           rope_scaling={"type": "longrope", "short_factor": _factors(6, 1.0, 2.0),
                                         "long_factor": _factors(6, 1.5, 9.0)})),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=256, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.15, layer_norm_epsilon=1e-5)),
    "gpt2_untied": ("GPT2Config", "GPT2LMHeadModel",
                    dict(vocab_size=320, n_embd=48, n_layer=3, n_head=3, n_positions=64, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.15, tie_word_embeddings=False,
                         activation_function="gelu_pytorch_tanh")),
}


def make_family_dir(path, name: str, *, seed: int = 0, **overrides) -> str:
    import transformers

    config_cls, model_cls, cfg = FAMILIES[name]
    return make_hf_dir(path, getattr(transformers, config_cls), getattr(transformers, model_cls),
                       {**cfg, **overrides}, seed=seed)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF dir, .occ path), built on first use."""
    made: dict[str, tuple[str, str]] = {}

    def get(name: str) -> tuple[str, str]:
        if name not in made:
            base = tmp_path_factory.mktemp(name)
            src = make_family_dir(base / "hf", name, seed=7)
            out = str(base / "m.occ")
            convert(src, out, log=lambda msg: None)
            made[name] = (src, out)
        return made[name]

    return get


def occrt_logits(path: str, ids: list[int]) -> np.ndarray:
    model = occrt.load(path)
    try:
        return model.forward(np.asarray(ids), model.new_cache(len(ids)), all_logits=True)
    finally:
        model.close()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers_at_every_position(name, converted):
    src, occ = converted(name)
    ref = hf_logits(src, IDS)
    got = occrt_logits(occ, IDS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(ref).max() > 1.0  # not vacuous: logits far from zero


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_generation_is_token_identical(name, converted):
    """24 new tokens; for LongRoPE 10 (prompt and continuation within its original context of 16): transformers
    switches to the long factors mid-generation, once the sequence passes 16, keeping the keys it cached under the
    short ones, while occrt picks the factors once for the context the cache is made for (as llama.cpp does) --
    the full-sequence logits above check the long factors."""
    src, occ = converted(name)
    prompt = IDS[:6]
    n = _LONG - len(prompt) if name == "phi3_longrope" else 24
    ref = hf_greedy(src, prompt, n)
    model = occrt.load(occ)
    got = list(occrt.generate.generate_tokens(model.network, prompt, max_new_tokens=n,
                                              sampling=occrt.generate.SamplingParams()))
    model.close()
    assert got == ref
    assert len(set(ref)) > 3  # a varied continuation, not one token repeated


@pytest.mark.parametrize("name", ["mistral_sliding", "qwen2_sliding", "qwen3", "phi3_longrope", "gpt2"])
def test_incremental_decode_past_the_window_matches_prefill(name, converted):
    """Prefill 3 tokens, then decode one at a time to 24: each step's logits equal the full prefill's, the kernel
    path and the numpy reference both (the window slides past positions the cache still holds)."""
    _, occ = converted(name)
    model = occrt.load(occ)
    net = model.network
    full = net.forward(np.asarray(IDS), net.new_cache(len(IDS)), all_logits=True)
    for forward in (net.forward, net.reference_forward):
        cache = net.new_cache(len(IDS))
        forward(np.asarray(IDS[:3]), cache)
        steps = [forward(np.asarray([t]), cache) for t in IDS[3:]]
        assert np.abs(np.stack(steps) - full[3:]).max() < 1e-4
    model.close()


def test_the_sliding_window_matters(converted):
    """Without its window, the same Mistral weights give other logits past position WINDOW (so the parity above
    tests the window), and occrt's config records the window for every layer."""
    import torch
    from transformers import AutoModelForCausalLM

    src, occ = converted("mistral_sliding")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, sliding_window=None)
    with torch.no_grad():
        unwindowed = model(torch.tensor([IDS])).logits[0].numpy()
    windowed = hf_logits(src, IDS)
    assert np.abs(unwindowed[:WINDOW] - windowed[:WINDOW]).max() < 1e-4
    assert np.abs(unwindowed[WINDOW:] - windowed[WINDOW:]).max() > 0.1
    cfg = occrt.load(occ).config
    assert cfg.sliding_window == WINDOW and cfg.layer_types == ["sliding_attention"] * 2
    assert cfg.architecture == "mistral"


def test_family_configs_record_their_features(converted):
    cfgs = {name: occrt.load(converted(name)[1]).config for name in ("qwen2", "qwen2_sliding", "qwen3", "phi3_longrope",
                                                                   "gpt2")}
    q2 = cfgs["qwen2"]
    assert (q2.architecture, q2.attention_bias, q2.attention_out_bias, q2.qk_norm) == ("qwen2", True, False, False)
    assert cfgs["qwen2_sliding"].layer_types == ["full_attention", "sliding_attention"]
    q3 = cfgs["qwen3"]
    assert (q3.architecture, q3.qk_norm, q3.head_dim, q3.tie_word_embeddings) == ("qwen3", True, 24, True)
    phi = cfgs["phi3_longrope"]
    assert phi.rotary_dim == 12 and phi.rope["type"] == "longrope" and phi.rope["original_max_position_embeddings"] == 16
    g = cfgs["gpt2"]
    assert (g.norm_type, g.mlp_type, g.position_type, g.hidden_act) == ("layer", "plain", "learned", "gelu_tanh")
    with occrt.format.OccFile.open(converted("phi3")[1]) as f:
        names = set(f.tensors)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
    assert not any("qkv" in n or "gate_up" in n for n in names)


def test_longrope_short_factors_within_the_original_context(converted):
    """Within the original context (cache capacity <= 16) the short factors apply, as in transformers."""
    src, occ = converted("phi3_longrope")
    ids = IDS[:_LONG]
    assert np.abs(occrt_logits(occ, ids) - hf_logits(src, ids)).max() < 1e-4
    # the long factors really differ: a cache made for the long context rotates these positions otherwise
    model = occrt.load(occ)
    long_cache = model.network.new_cache(64)
    long_logits = model.network.forward(np.asarray(ids), long_cache, all_logits=True)
    assert np.abs(long_logits - hf_logits(src, ids)).max() > 1e-2


def test_lossy_coding_reaches_the_new_linear_layers(tmp_path):
    """--bpw 4 on GPT-2 and Phi-3: their split projections are coded as linear layers (tcq), the model loads and
    its logits stay near the source's (random weights compress badly: at 4 bpw the correlation with the source's
    logits is 0.97 / 0.93, at 2 bpw 0.75 / 0.41)."""
    for name in ("gpt2", "phi3"):
        src = make_family_dir(tmp_path / name, name, seed=3)
        out = str(tmp_path / f"{name}.occ")
        summary = convert(src, out, ConvertOptions(bpw=4.0), log=lambda msg: None)
        assert 3.8 < summary["linear_bpw"] < 4.2
        with occrt.format.OccFile.open(out) as f:
            codecs = {n: e.codec for n, e in f.tensors.items()}
        linear = [n for n in codecs if n.endswith("_proj.weight")]
        assert len(linear) == {"gpt2": 2 * 6, "phi3": 2 * 7}[name]
        assert all(codecs[n] == 3 for n in linear)  # tcq (the default quantizer)
        ref = hf_logits(src, IDS)
        got = occrt_logits(out, IDS)
        assert np.abs(got - ref).max() > 1e-4  # lossy ...
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # ... and close (a tiny random Llama: 0.89)


def test_unsupported_configs_are_refused_clearly(tmp_path):
    from occrt.converters.architectures import config_from_hf

    with pytest.raises(UnsupportedModelError, match=r"'FalconForCausalLM' is not supported; supported: .*"
                                                    r"GPT2LMHeadModel.*Phi3ForCausalLM.*Qwen3ForCausalLM"):
        config_from_hf({"architectures": ["FalconForCausalLM"], "model_type": "falcon"})
    gpt2 = json.load(open(os.path.join(make_family_dir(tmp_path / "g", "gpt2"), "config.json")))
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf(dict(gpt2, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(UnsupportedModelError, match="activation 'relu'"):
        config_from_hf(dict(gpt2, activation_function="relu"))
    phi = {**FAMILIES["phi3"][2], "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic'"):
        config_from_hf(dict(phi, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


@pytest.mark.parametrize("name", ["phi3", "gpt2"])
def test_calibration_on_fused_and_conv1d_layouts(name, tmp_path):
    """--calib builds the family's own transformers model: a fused module's input is every part's input space
    (checked against occrt's runtime: E[x xᵀ] of layer 0's attention input), its gradient splits into one Fisher
    value per part; the calibrated 3-bpw conversion loads and runs."""
    from occrt.converters.calibrate import calibrate, calibration_windows
    from occrt.converters.convert import open_source
    from occrt.model.decoder import layer_norm, rms_norm
    from tests.conftest import WORDS

    src = make_family_dir(tmp_path / name, name, seed=4)
    text = " ".join(WORDS * 40)
    source = open_source(src)
    cal = calibrate(source, text, n_tokens=200, ctx=64)
    linear = {n for n in source.tensor_names() if n.endswith("_proj.weight")}
    assert set(cal.fisher) == linear and all(v > 0 for v in cal.fisher.values())
    assert len(linear) == 2 * (7 if name == "phi3" else 6)
    # layer 0's attention input from the runtime's own tensors
    occ = str(tmp_path / "raw.occ")
    convert(src, occ, log=lambda msg: None)
    model = occrt.load(occ)
    net, cfg = model.network, model.config
    ids = np.concatenate([np.asarray(w) for w in calibration_windows(source, text, n_tokens=200, ctx=64)])
    starts = np.concatenate([np.arange(len(w)) for w in calibration_windows(source, text, n_tokens=200, ctx=64)])
    e = net.embed.rows(ids).astype(np.float64)
    if net.positions is not None:
        e = e + net.positions.rows(starts)
    norm = net.layers[0].attn_norm
    x = layer_norm(e, norm.w, norm.b, cfg.rms_norm_eps) if norm.b is not None else rms_norm(e, norm.w, cfg.rms_norm_eps)
    h = x.T @ x / len(x)
    assert len(x) == cal.tokens
    for proj in ("q", "k", "v"):
        got = cal.hessian_for(f"model.layers.0.self_attn.{proj}_proj.weight")
        assert np.allclose(got, h, rtol=1e-4, atol=1e-6 * np.abs(h).max())
    assert cal.hessian_for("model.layers.1.mlp.down_proj.weight").shape == (96, 96)
    model.close()
    (tmp_path / "calib.txt").write_text(text)
    out = str(tmp_path / "calib.occ")
    summary = convert(src, out, ConvertOptions(bpw=3.0, calib=str(tmp_path / "calib.txt"), calib_tokens=256),
                      log=lambda msg: None)
    assert abs(summary["linear_bpw"] / 3.0 - 1) < 0.03
    assert np.isfinite(occrt_logits(out, IDS)).all()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_torch_path_matches_the_numpy_runtime(name, converted):
    """device torch-cpu (the CUDA path's code on the CPU): a prefill and decode steps past the window agree with
    the numpy runtime."""
    pytest.importorskip("torch")
    _, occ = converted(name)
    cpu, tch = occrt.load(occ), occrt.load(occ, device="torch-cpu")
    assert type(tch.network).__name__ == "TorchDecoder"
    for model in (cpu, tch):
        model.cache = model.new_cache(len(IDS))
    want = cpu.forward(np.asarray(IDS[:5]), cpu.cache, all_logits=True)
    assert np.abs(tch.forward(np.asarray(IDS[:5]), tch.cache, all_logits=True) - want).max() < 1e-4
    for token in IDS[5:]:
        assert np.abs(tch.forward(np.asarray([token]), tch.cache) - cpu.forward(np.asarray([token]), cpu.cache)
                      ).max() < 1e-4
    cpu.close()
    tch.close()


def test_gpt2_checkpoint_in_the_original_spelling(tmp_path):
    """openai-community/gpt2's safetensors spell names without `transformer.` and carry the causal-mask buffers
    `h.{i}.attn.bias`: the same model converts from that spelling."""
    from safetensors.numpy import load_file, save_file

    src = make_family_dir(tmp_path / "hf", "gpt2", seed=2)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    old = {name.removeprefix("transformer."): a for name, a in tensors.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 256, 256), np.float32))
    assert "wte.weight" in old and not any(n.startswith("transformer.") for n in old)
    save_file(old, os.path.join(src, "model.safetensors"))
    out = str(tmp_path / "m.occ")
    convert(src, out, log=lambda msg: None)
    save_file(tensors, os.path.join(src, "model.safetensors"))  # transformers reads its own spelling
    assert np.abs(occrt_logits(out, IDS) - hf_logits(src, IDS)).max() < 1e-4
