"""`occrt analyze`: the three coordinate regimes' measures on matrices with known answers, and the command line."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from occrt import analyze as A
from occrt.cli import main
from occrt.codecs import ans
from occrt.codecs.ecsq import CodingFrame


def _rms(w: np.ndarray) -> float:
    return float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))


def test_energy_is_equal_in_the_three_regimes():
    w = np.random.default_rng(1).standard_normal((48, 80)).astype(np.float32) * 0.02
    t = A.analyze_matrix(w, ranks=None)
    energies = [t.regimes[r].energy for r in A.REGIMES]
    assert energies[0] == pytest.approx(float((w.astype(np.float64) ** 2).sum()), rel=1e-12)
    assert max(energies) - min(energies) <= 1e-6 * energies[0]


def test_rotation_flattens_a_heavy_tailed_matrix():
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=(64, 128)).astype(np.float32)
    w[5, 7] = 80.0  # one outlier on the original axes
    t = A.analyze_matrix(w, ranks=None)
    o, r = t.regimes["original"], t.regimes["rotated"]
    assert o.excess_kurtosis > 20 and abs(r.excess_kurtosis) < 1.0  # rotated coefficients are near-Gaussian
    assert r.max_over_rms < o.max_over_rms / 4
    assert r.participation > 3 * o.participation  # PR = N / (kurtosis + 3)
    for st in (o, r):
        assert st.participation == pytest.approx(w.size / (st.excess_kurtosis + 3), rel=1e-9)


def test_participation_ratio_in_the_aligned_regime_is_the_rank():
    rng = np.random.default_rng(3)
    k = 6
    u, _ = np.linalg.qr(rng.standard_normal((40, k)))
    v, _ = np.linalg.qr(rng.standard_normal((72, k)))
    flat = (u @ v.T).astype(np.float32)  # k equal singular values
    assert A.analyze_matrix(flat, ranks=None).regimes["aligned"].participation == pytest.approx(k, rel=1e-4)
    lowrank = (rng.standard_normal((40, k)) @ rng.standard_normal((k, 72))).astype(np.float32)
    t = A.analyze_matrix(lowrank, ranks=None)
    assert k / 2 < t.regimes["aligned"].participation <= k + 1e-3
    assert t.regimes["original"].participation > 100 * k  # spread over the axes


def test_bits_fall_as_the_error_target_rises_and_match_gaussian_theory():
    w = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    rms = _rms(w)
    targets = (0.003, 0.01, 0.03, 0.1, 0.3)
    points = [A.quantize_point(w, rel_error=e, rms=rms)[0] for e in targets]
    bits = [p.bits for p in points]
    assert all(a > b for a, b in zip(bits, bits[1:]))
    for e, p in zip(targets, points):
        assert p.rel_error <= e and p.rel_error == pytest.approx(e, rel=0.02)
    # high rate: H ≈ h(N(0,1)) - log2(Δ/σ) with Δ = √12 ε σ
    expected = 0.5 * math.log2(2 * math.pi * math.e) - math.log2(math.sqrt(12) * 0.01)
    assert bits[1] == pytest.approx(expected, abs=0.1)


def test_entropy_bits_is_ans_ideal_bits():
    codes = np.rint(np.random.default_rng(5).standard_normal(5000) * 7).astype(np.int64)
    assert A.entropy_bits(codes) == pytest.approx(ans.ideal_bits(codes), rel=1e-12)
    with_zeros = np.concatenate([codes, np.zeros(1234, np.int64)])
    assert A.entropy_bits(codes, n_zeros=1234) == pytest.approx(ans.ideal_bits(with_zeros), rel=1e-12)
    shifted = codes + 40  # zero outside the codes' range
    assert A.entropy_bits(shifted, n_zeros=10) == pytest.approx(
        ans.ideal_bits(np.concatenate([shifted, np.zeros(10, np.int64)])), rel=1e-12)


def test_codec_frames_match_the_codec():
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((48, 64)) + 3 * np.outer(rng.standard_normal(48), rng.standard_normal(64)))
    w = w.astype(np.float32)
    svd = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    rot_in, rot_out = A.rotation_specs(w.shape, seed=9)
    for rotation, rank, res, params in A.codec_frames(w, svd, seed=9, ranks=(0, 4)):
        frame = CodingFrame(w, rank=rank, rot_in=rot_in if rotation == "both" else None,
                            rot_out=rot_out if rotation == "both" else None)
        assert params["rank"] == rank and (params["rot_in"] is None) == (rotation == "none")
        np.testing.assert_allclose(res, frame.residual, atol=2e-3 * _rms(w))


def test_the_codec_choice_takes_structure_when_it_pays():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((96, 128)) * 0.05 + np.outer(rng.standard_normal(96), rng.standard_normal(128)))
    choice = A.analyze_matrix(w.astype(np.float32)).codec
    assert choice.rank >= 1 and choice.rel_error <= 0.01 * 1.001


def test_layer_kinds():
    assert [A.layer_kind(n) for n in ("model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                                      "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")] == \
        ["q", "down", "embedding", "lm_head", "other"]


def test_cli_on_a_checkpoint_directory(tiny_llama_dir, capsys):
    assert main(["analyze", tiny_llama_dir, "--tensors", "model.layers.0.*", "--no-codec"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj.weight" in out and "model.layers.1." not in out
    for kind in ("q (1)", "k (1)", "v (1)", "o (1)", "gate (1)", "up (1)", "down (1)"):
        assert kind in out
    assert "energy check" in out


def test_cli_json_on_an_occ_file(tiny_occ, tiny_llama_dir, capsys):
    assert main(["analyze", tiny_occ, "--tensors", "*.layers.1.self_attn.*", "--json", "--ranks", "0,2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in doc["tensors"]]
    assert sorted(names) == sorted(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo")
    for t in doc["tensors"]:
        e = [t["regimes"][r]["energy"] for r in A.REGIMES]
        assert max(e) - min(e) <= 1e-6 * e[0]
        assert t["codec"]["rank"] in (0, 2)
    assert [row["kind"] for row in doc["summary"]] == ["q", "k", "v", "o"]
    # the .occ file holds exactly the checkpoint's weights (raw f32): the same numbers either way
    capsys.readouterr()
    assert main(["analyze", tiny_llama_dir, "--tensors", "*.layers.1.self_attn.*", "--json", "--ranks", "0,2"]) == 0
    by_name = lambda ts: sorted(ts, key=lambda t: t["name"])  # noqa: E731
    assert by_name(json.loads(capsys.readouterr().out)["tensors"]) == by_name(doc["tensors"])


def test_cli_plot_writes_a_png(tiny_occ, tmp_path, capsys):
    out = tmp_path / "regimes.png"
    assert main(["analyze", tiny_occ, "--tensors", "model.layers.0.*", "--no-codec", "--plot", str(out)]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_cli_no_match_is_one_line_and_status_2(tiny_occ, capsys):
    assert main(["analyze", tiny_occ, "--tensors", "nothing*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("occrt: error:") and err.count("\n") == 1


def test_import_is_numpy_only():
    code = ("import sys, occrt.analyze\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('matplotlib', 'torch', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
