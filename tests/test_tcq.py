"""Codec 3 (tcq): the Viterbi path is the best path, the trellis streams split and merge exactly (numba against
numpy), the codec beats scalar rounding at the same rate, error feedback on the trellis matches its reference, and
the runtime's compact form computes what the codec decodes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from occrt.codecs.ecsq import CodingFrame
from occrt.codecs.registry import codec_for
from occrt.codecs.tcq import (TCQ, merge, merge_reference, parity_table, split, trellis_codes, viterbi_column)
from occrt.converters.gptq import tcq_error_feedback, tcq_error_feedback_reference
from occrt.errors import FormatError


def _decoded(enc):
    payload = b"".join(bytes(p) for p in enc.payload)
    codec = codec_for(enc.codec)
    codec.check(version=enc.codec_version, dtype=enc.dtype, shape=enc.shape, params=enc.params, length=len(payload))
    return codec.decode(memoryview(payload), version=enc.codec_version, dtype=enc.dtype, shape=enc.shape,
                        params=enc.params), payload


def _on_trellis(k: np.ndarray, parity: np.ndarray) -> bool:
    """Walk the trellis down each column as the spec says; whether every code has its state's union parity."""
    s = np.zeros(k.shape[1], np.int64)
    for row in k.astype(np.int64):
        p = parity[s]
        if np.any((row - p) % 2):
            return False
        s = ((s << 1) | (((row - p) // 2) & 1)) & (len(parity) - 1)
    return True


@pytest.mark.parametrize("states,generator", [(2, 1), (4, 2), (8, 5)])
def test_viterbi_finds_the_least_error_path(states, generator):
    """Against every path: each path is a sequence of subset bits; given the path the best codes are each subset's
    nearest point, so the exhaustive minimum over the 2^n bit sequences is the true optimum."""
    parity = parity_table(states, generator)
    rng = np.random.default_rng(states)
    step = 0.4
    for _ in range(5):
        x = rng.standard_normal(8)
        best = np.inf
        for bits in itertools.product((0, 1), repeat=len(x)):
            s, cost = 0, 0.0
            for xv, b in zip(x, bits):
                r = parity[s] + 2 * b
                k = np.floor((xv / step - r) / 4 + 0.5) * 4 + r
                cost += (xv - k * step) ** 2
                s = ((s << 1) | b) & (states - 1)
            best = min(best, cost)
        out = np.empty(len(x), np.int32)
        viterbi_column(x, step, parity, out)
        assert _on_trellis(out[:, None], parity)
        assert float(((x - out * step) ** 2).sum()) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_split_and_merge_are_inverse_and_match_the_reference():
    parity = parity_table(64, 55)
    rng = np.random.default_rng(0)
    k = trellis_codes(rng.standard_normal((37, 23)).astype(np.float32), 0.1, parity)
    assert _on_trellis(k, parity)
    m0, m1 = split(k, parity)
    assert m0.size + m1.size == k.size
    assert np.array_equal(merge(m0, m1, parity, k.shape), k)
    assert np.array_equal(merge_reference(m0, m1, parity, k.shape), k)
    off = k.copy()
    off[5, 3] += 1  # the other union's parity: not a trellis path
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        split(off, parity)


@pytest.mark.parametrize("cut", ["short0", "short1", "long0", "long1"])
def test_merge_rejects_streams_that_do_not_fit_the_trellis(cut):
    parity = parity_table(8, 5)
    k = trellis_codes(np.random.default_rng(1).standard_normal((9, 7)).astype(np.float32), 0.2, parity)
    m = list(split(k, parity))
    i = int(cut[-1])
    m[i] = m[i][:-1] if cut.startswith("short") else np.append(m[i], 0)
    with pytest.raises(FormatError, match=f"stream {i}"):
        merge(m[0], m[1], parity, k.shape)


def test_trellis_beats_scalar_rounding_at_the_same_rate():
    """Gaussian weights: tcq at δ = Δ/2 costs about ecsq's bytes at Δ and has ~0.7-1 dB less squared error."""
    w = np.random.default_rng(2).standard_normal((512, 256)).astype(np.float32)
    frame = CodingFrame(w)
    for step in (1.0, 0.5, 0.25):  # about 2, 3 and 4 bits
        scalar, s_bytes = _decoded(frame.encode(step))
        trellis, t_bytes = _decoded(frame.encode(step / 2, trellis=(64, 55)))
        gain_db = 10 * np.log10(np.mean((scalar - w) ** 2) / np.mean((trellis - w) ** 2))
        assert 0.6 < gain_db < 1.5, (step, gain_db)
        assert abs(len(t_bytes) / len(s_bytes) - 1) < 0.02, (step, len(t_bytes), len(s_bytes))


def test_tcq_decodes_the_frame_it_encoded():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    from occrt.codecs.rotation import RotationSpec

    frame = CodingFrame(w, rank=2, rot_in=RotationSpec(1, 3, 24), row_scales=np.linspace(0.5, 2, 40),
                        col_scales=np.linspace(1, 2, 24))
    enc = frame.encode(0.05, trellis=(16, 11), chunk_size=100)
    got, payload = _decoded(enc)
    k = trellis_codes(frame.residual, 0.05, parity_table(16, 11))
    again, _ = _decoded(frame.encode(0.05, codes=k, trellis=(16, 11), chunk_size=100))
    assert np.array_equal(got, again)  # the default codes are the Viterbi path
    from occrt.codecs.ecsq import to_coding_frame

    err = to_coding_frame(got - w, rot_in=frame.rot_in, rot_out=None)
    # each code is the nearest point of the subset (step 4δ) its path chose: within 2δ of the residual, times a·b ≤ 4
    assert np.abs(err).max() <= 2 * 0.05 * 4 + 1e-4
    info = TCQ.summarize(enc.params, enc.shape, memoryview(payload))
    assert info["trellis"] == "16 states, generator 11" and info["rank"] == 2 and info["entropy"] > 0


@pytest.mark.parametrize("bad", [{"states": 3}, {"states": 1}, {"states": 8192}, {"states": True}, {"generator": 0},
                                 {"generator": 64}, {"generator": 1.5}])
def test_tcq_check_rejects_bad_trellis_params(bad):
    enc = CodingFrame(np.ones((8, 10), np.float32)).encode(0.1, trellis=(64, 55))
    with pytest.raises(FormatError):
        TCQ.check(version=1, dtype="f32", shape=(8, 10), params={**enc.params, **bad}, length=10 ** 4)


@pytest.mark.parametrize("block", [64, 5])
def test_tcq_error_feedback_matches_its_reference_and_is_plain_viterbi_without_correlation(block, monkeypatch):
    from occrt.converters import gptq

    monkeypatch.setattr(gptq, "TCQ_BLOCK", block)  # 5: lazy updates between blocks, 64: one block
    rng = np.random.default_rng(4)
    n_out, n_in = 19, 12
    w = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((200, n_in)) @ rng.standard_normal((n_in, n_in))
    from occrt.converters.gptq import cholesky_inverse_upper

    u = cholesky_inverse_upper(x.T @ x / 200, damp=0.01)
    parity = parity_table(8, 5)
    got = tcq_error_feedback(w, u, 0.3, parity)
    assert np.array_equal(got, tcq_error_feedback_reference(w, u, 0.3, parity))
    assert _on_trellis(got, parity)
    # H = I: no feedback, each column its own Viterbi path
    assert np.array_equal(tcq_error_feedback(w, np.eye(n_in), 0.3, parity),
                          trellis_codes(w.astype(np.float32), 0.3, parity))


def test_feedback_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(5)
    n_out, n_in = 64, 48
    w = rng.standard_normal((n_out, n_in))
    mix = rng.standard_normal((n_in, n_in)) * 0.3 + np.eye(n_in)
    x = rng.standard_normal((2000, n_in)) @ mix
    h = x.T @ x / len(x)
    from occrt.converters.gptq import cholesky_inverse_upper

    parity = parity_table(64, 55)
    plain = trellis_codes(w.astype(np.float32), 0.4, parity)
    fed = tcq_error_feedback(w, cholesky_inverse_upper(h, damp=0.01), 0.4, parity)

    def out_err(k):
        e = w - 0.4 * k
        return float(np.trace(e @ h @ e.T))

    assert out_err(fed) < 0.8 * out_err(plain)


def test_runtime_form_computes_what_the_codec_decodes():
    from occrt.model.linear import FORMS

    rng = np.random.default_rng(6)
    w = rng.standard_normal((33, 20)).astype(np.float32)
    from occrt.codecs.rotation import RotationSpec

    for frame, step in ((CodingFrame(w), 0.3), (CodingFrame(w, rot_in=RotationSpec(1, 9, 20), rank=1), 0.01)):
        enc = frame.encode(step, trellis=(64, 55))
        dense, payload = _decoded(enc)
        form = FORMS[3](memoryview(payload), shape=enc.shape, params=enc.params)
        xs = rng.standard_normal((3, 20)).astype(np.float32)
        assert np.allclose(form(xs), xs @ dense.T, rtol=1e-4, atol=1e-4)
        assert np.allclose(form.rows(np.array([0, 32])), dense[[0, 32]], rtol=1e-5, atol=1e-5)
