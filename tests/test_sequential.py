"""Sequential coding (converters/sequential.py): each layer coded from the inputs the coded layers below give it."""
from __future__ import annotations

import numpy as np
import pytest

import occrt
from occrt.converters.calibrate import calibration_model, calibration_windows
from occrt.converters.convert import ConvertOptions, convert, open_source
from occrt.converters.sequential import STAGES, corrected, sequential_records
from occrt.errors import ConversionError
from tests.conftest import WORDS

TEXT = " ".join(WORDS * 40)
EMBED = "model.embed_tokens.weight"


def _coarse(w: np.ndarray) -> np.ndarray:  # a stand-in codec: rounding to a coarse grid, its error plain to see
    step = float(np.abs(w).max()) / 4
    return np.round(w / step) * step


def _run_sequential(source, windows, alpha):
    """sequential_records on the tiny model with `_coarse` as the codec; returns (records, what encode saw)."""
    model, _ = calibration_model(source)
    embedding = _coarse(model.get_parameter(EMBED).detach().numpy())
    seen = {}

    def encode(t, h):
        seen[t.name] = (t.data.copy(), np.array(h))
        return _coarse(t.data)

    records = sequential_records(model, windows, embedding, encode=encode, decode=lambda r: r, alpha=alpha)
    return records, seen, embedding


def test_the_correction_is_the_least_squares_fit_of_the_source_outputs():
    """At α = 1 (no damping) W' solves min ‖X Wᵀ − X̂ W'ᵀ‖; at α = 0 it is W; damping pulls it toward W."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    x_hat = x + 0.2 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    h, c = x_hat.T @ x_hat / 400, x.T @ x_hat / 400
    fit = torch.linalg.lstsq(x_hat, x @ w.T).solution.T
    assert torch.allclose(corrected(w, h, c, 1.0, damp=0.0), fit, atol=1e-10)
    assert torch.equal(corrected(w, h, c, 0.0), w)
    half = corrected(w, h, c, 0.5, damp=0.0)
    assert torch.allclose(half, (w + fit) / 2, atol=1e-10)
    assert float((corrected(w, h, c, 1.0, damp=1.0) - w).norm()) < float((fit - w).norm())


def test_each_layer_is_weighed_by_the_coded_models_own_inputs(tiny_llama_dir):
    """With α = 0 every weight reaches the codec unchanged, with the second moments of its input in the coded model
    (coded embedding, coded layers below, and within a layer the coded projections before it: o sees coded q/k/v,
    down sees coded gate/up), which differ from the source model's."""
    import torch

    source = open_source(tiny_llama_dir)
    windows = calibration_windows(source, TEXT, n_tokens=256, ctx=64)
    records, seen, embedding = _run_sequential(source, windows, alpha=0.0)
    model, _ = calibration_model(source)  # a fresh copy: the one coded released its linear weights
    assert len(records) == 7 * model.config.num_hidden_layers
    plain = {}
    for name, (w, _) in seen.items():
        assert np.array_equal(w, model.get_parameter(name).detach().numpy())  # α = 0: the weight as the source has it

    def moments(m):  # E[x xᵀ] at every captured input of layer 1, over the windows
        out, handles = {}, []
        for first, _ in STAGES:
            module = m.get_submodule(f"model.layers.1.{first}")

            def hook(mod, args, key=first):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                out[key] = out.get(key, 0) + (x.T @ x).numpy()
            handles.append(module.register_forward_pre_hook(hook))
        with torch.no_grad():
            for window in windows:
                m(input_ids=torch.tensor([window]))
        for handle in handles:
            handle.remove()
        n = sum(len(w) for w in windows)
        return {k: v / n for k, v in out.items()}

    plain = moments(model)
    with torch.no_grad():
        for name, coded in records.items():
            model.get_parameter(name).copy_(torch.from_numpy(coded))
        model.get_parameter(EMBED).copy_(torch.from_numpy(embedding))
    coded = moments(model)
    for first, group in STAGES:
        for proj in group:
            h = seen[f"model.layers.1.{proj}.weight"][1]
            scale = np.abs(coded[first]).max()
            assert np.abs(h - coded[first]).max() < 1e-4 * scale, proj
            assert np.abs(h - plain[first]).max() > 1e-2 * scale, proj  # not the source model's moments


def test_a_positive_share_corrects_the_weights_toward_the_source_outputs(tiny_llama_dir):
    """α > 0: the codec gets W' ≠ W, and the coded model's last hidden states are nearer the source's than with α = 0
    on the calibration windows (the coarse codec's error is large enough for the correction to matter)."""
    import torch

    source = open_source(tiny_llama_dir)
    windows = calibration_windows(source, TEXT, n_tokens=256, ctx=64)
    ref_model, _ = calibration_model(source)
    with torch.no_grad():
        ref = [ref_model.base_model(input_ids=torch.tensor([w])).last_hidden_state for w in windows]
    gaps = {}
    for alpha in (0.0, 1.0):
        records, seen, embedding = _run_sequential(source, windows, alpha)
        changed = [not np.array_equal(w, ref_model.get_parameter(n).detach().numpy()) for n, (w, _) in seen.items()]
        assert all(changed) if alpha else not any(changed)
        model, _ = calibration_model(source)
        with torch.no_grad():
            for name, coded in records.items():
                model.get_parameter(name).copy_(torch.from_numpy(coded))
            model.get_parameter(EMBED).copy_(torch.from_numpy(embedding))
            gaps[alpha] = sum(float(((model.base_model(input_ids=torch.tensor([w])).last_hidden_state - r) ** 2).sum())
                              for w, r in zip(windows, ref))
    assert gaps[1.0] < gaps[0.0]


def test_sequential_conversion_meets_the_target_and_decodes(tiny_llama_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = str(tmp_path / "seq.occ")
    summary = convert(tiny_llama_dir, out, ConvertOptions(bpw=3.0, calib=str(calib), calib_tokens=256, tune_steps=2,
                                                          sequential=True, correction=0.5), log=lambda m: None)
    assert abs(summary["linear_bpw"] / 3.0 - 1) < 0.03
    m = occrt.load(out)
    logits = m.forward(np.asarray([1, 5, 9, 13]), m.new_cache(4), all_logits=True)
    assert np.isfinite(logits).all()


def test_the_source_weights_are_released_before_the_tuning(tiny_llama_dir, tmp_path, monkeypatch):
    """Sequential coding reads each linear weight from the torch model and releases it once coded: when the tuning
    starts nothing holds any of them (a conversion kept them all alive through the tuning until 2026-11-30:
    ~400 MB on SmolLM2)."""
    import gc
    import weakref

    from occrt.converters import finetune, sequential

    weights, alive = [], []
    real_sequential, real_tune = sequential.sequential_records, finetune.tune_scales

    def spy_sequential(model, *args, **kwargs):
        weights.extend(weakref.ref(m.weight) for name, m in model.named_modules() if name.endswith("_proj"))
        return real_sequential(model, *args, **kwargs)

    def spy_tune(*args, **kwargs):
        gc.collect()
        alive.extend(ref for ref in weights if ref() is not None)
        return real_tune(*args, **kwargs)

    monkeypatch.setattr(sequential, "sequential_records", spy_sequential)
    monkeypatch.setattr(finetune, "tune_scales", spy_tune)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    convert(tiny_llama_dir, str(tmp_path / "seq.occ"), ConvertOptions(bpw=3.0, calib=str(calib), calib_tokens=256,
                                                                      tune_steps=1, sequential=True),
            log=lambda m: None)
    assert len(weights) == 7 * 2 and not alive  # the tiny model: 2 layers of 7 projections


@pytest.mark.parametrize("options, message", [
    ({"sequential": True}, "--sequential on needs --calib"),
    ({"correction": 1.5, "calib": "c.txt"}, r"--correction must be in \[0, 1\]"),
    ({"correction": 0.5, "calib": "c.txt", "sequential": False}, "--correction needs sequential coding")])
def test_sequential_needs_calibration_and_a_share(options, message):
    with pytest.raises(ConversionError, match=message):
        ConvertOptions(bpw=3.0, **options).validate()


def test_sequential_coding_is_chosen_by_rate_and_family(tiny_llama_dir, tmp_path):
    """--sequential unset: `by_default(bpw)` with --calib on a family whose torch model holds the linear layers as
    occrt stores them, off without --calib; a choice given is kept; on (or a correction) for Phi-3 is refused."""
    from occrt.converters.sequential import by_default
    from tests.test_families import make_family_dir

    llama = open_source(tiny_llama_dir).config
    for bpw in (2.0, 3.0):
        assert ConvertOptions(bpw=bpw, calib="c.txt").for_source(llama).sequential is by_default(bpw)
        assert ConvertOptions(bpw=bpw).for_source(llama).sequential is False
        assert ConvertOptions(bpw=bpw, calib="c.txt", sequential=True).for_source(llama).sequential is True
        assert ConvertOptions(bpw=bpw, calib="c.txt", sequential=False).for_source(llama).sequential is False
    phi3 = open_source(make_family_dir(tmp_path / "phi3", "phi3")).config
    assert ConvertOptions(bpw=3.0, calib="c.txt").for_source(phi3).sequential is False
    for options in ({"sequential": True}, {"correction": 0.5}):
        with pytest.raises(ConversionError, match="needs"):
            ConvertOptions(bpw=3.0, calib="c.txt", **options).for_source(phi3)
