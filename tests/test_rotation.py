"""Seeded randomized Hadamard rotations (occrt.codecs.rotation) and their kernels (occrt.kernels.hadamard).

Covers: the PRNG against SplitMix64's published outputs; every small Hadamard construction (H Hᵀ = h I, ±1); the
factorization chosen for the dimensions of real models; orthogonality; rotate / unrotate against the dense Q;
determinism pinned by SHA-256 (format_spec/rotations.md section 10, checked here against the doc); the doc's
reference code run and compared bit for bit; the spec's JSON validation; the numba and torch kernels against the numpy
reference; flattening of heavy-tailed vectors.
"""
from __future__ import annotations

import hashlib
import math
import pathlib
import re

import numpy as np
import pytest

from occrt.codecs import rotation as R
from occrt.codecs.rotation import RotationSpec
from occrt.errors import FormatError

SPEC_DOC = pathlib.Path(__file__).resolve().parent.parent / "format_spec" / "rotations.md"


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# PRNG

def test_splitmix64_matches_the_published_reference_outputs():
    # Vigna's splitmix64.c from state 1234567.
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                16408922859458223821]
    assert R.splitmix64(1234567, 5).tolist() == expected


def test_vectorized_streams_equal_the_scalar_definition():
    state = R.stream_state(3, 100, R.STREAM_PERM)
    scalar, s = [], state
    for _ in range(50):
        s = (s + R.GAMMA) & ((1 << 64) - 1)
        scalar.append(R.mix64(s))
    assert R.splitmix64(state, 50).tolist() == scalar
    # Fisher–Yates with the exact 128-bit product, against the uint64 split used in draw_permutation.
    for n in (2, 3, 12, 1000):
        u = R.splitmix64(R.stream_state(9, n, R.STREAM_PERM), n - 1).tolist()
        perm = list(range(n))
        for t, i in enumerate(range(n - 1, 0, -1)):
            j = (u[t] * (i + 1)) >> 64
            perm[i], perm[j] = perm[j], perm[i]
        assert R.draw_permutation(9, n).tolist() == perm


def test_streams_are_separated_by_seed_n_and_label():
    assert R.draw_signs(1, 64).tolist() != R.draw_signs(2, 64).tolist()
    assert R.draw_signs(1, 64).tolist() != R.draw_signs(1, 65)[:64].tolist()
    assert R.stream_state(1, 64, R.STREAM_SIGNS) != R.stream_state(1, 64, R.STREAM_PERM)
    assert R.derive_seed(1, 0) != R.derive_seed(0, 1)
    assert R.derive_seed(1, 0, 1) != R.derive_seed(1, 1, 0)
    assert all(0 <= R.derive_seed(s, 7) < R.SEED_LIMIT for s in (0, 1, (1 << 64) - 1))
    with pytest.raises(ValueError):
        R.derive_seed(1)
    signs = R.draw_signs(5, 4096)
    assert set(np.unique(signs)) == {-1, 1} and abs(int(signs.sum())) < 300  # balanced (4.7 σ)
    perm = R.draw_permutation(5, 4096)
    assert sorted(perm.tolist()) == list(range(4096)) and (perm != np.arange(4096)).mean() > 0.99


# ---------------------------------------------------------------------------------------------------------------------
# Fields and small Hadamard matrices

def test_irreducible_polynomials_are_the_documented_ones():
    assert R.irreducible_poly(7, 1) == (0, 1)  # x: GF(p) is the integers mod p
    assert R.irreducible_poly(3, 2) == (1, 0, 1)  # x² + 1
    assert R.irreducible_poly(5, 2) == (2, 0, 1)  # x² + 2
    assert R.irreducible_poly(3, 3) == (1, 2, 0, 1)  # x³ + 2x + 1
    assert R.irreducible_poly(7, 2) == (1, 0, 1)  # x² + 1
    assert R.irreducible_poly(7, 3) == (2, 0, 0, 1)  # x³ + 2


@pytest.mark.parametrize("p,k", [(3, 1), (11, 1), (3, 2), (5, 2), (3, 3), (7, 2), (3, 5), (7, 3)])
def test_quadratic_character(p, k):
    q = p ** k
    chi = R.quadratic_character(p, k)
    assert chi[0] == 0 and (chi == 1).sum() == (q - 1) // 2 and (chi == -1).sum() == (q - 1) // 2
    J = R.jacobsthal(q).astype(np.int64)
    # χ(-1) = (-1)^((q-1)/2): J antisymmetric for q ≡ 3 mod 4, symmetric for q ≡ 1 mod 4; J Jᵀ = q I - 𝟙𝟙ᵀ.
    assert np.array_equal(J.T, J if q % 4 == 1 else -J)
    assert np.array_equal(J @ J.T, q * np.eye(q, dtype=np.int64) - 1)


SMALL_ORDERS = [h for h in range(1, 257) if R.small_hadamard_kind(h)] + [344, 500, 924]


def test_every_small_construction_is_hadamard():
    kinds = set()
    for h in SMALL_ORDERS:
        S = R.small_hadamard(h)
        assert S.shape == (h, h) and S.dtype == np.int8 and np.all(np.abs(S) == 1), h
        Sf = S.astype(np.float64)
        assert np.array_equal(Sf @ Sf.T, h * np.eye(h)), h
        kinds.add(R.small_hadamard_kind(h)[0])
    assert kinds == {"one", "paley1", "paley2"}
    assert R.small_hadamard_kind(20) == ("paley1", 19)  # Paley I first, not Paley II over GF(9)
    assert R.small_hadamard_kind(52) == ("paley2", 25)  # GF(25): 51 = 3 · 17 is no prime power
    assert R.small_hadamard_kind(28) == ("paley1", 27) and R.small_hadamard_kind(344) == ("paley1", 343)
    assert R.small_hadamard_kind(92) is None  # 91 = 7 · 13, 45 = 3² · 5: no Paley order


@pytest.mark.parametrize("n", [12, 36, 80, 576, 896, 1536])
def test_full_hadamard_matrices(n):
    H = R.hadamard_matrix(n).astype(np.float64)
    assert np.array_equal(H @ H.T, n * np.eye(n))
    fz = R.factorize(n)
    assert np.array_equal(H, np.kron(R.sylvester(fz.L), R.small_hadamard(fz.h)))


def test_sylvester_is_the_recursive_definition():
    H = np.ones((1, 1), dtype=np.int8)
    for L in (2, 4, 8, 16, 32):
        H = np.block([[H, H], [H, -H]])
        assert np.array_equal(R.sylvester(L), H)


# ---------------------------------------------------------------------------------------------------------------------
# Factorization for the dimensions real models use

# n -> (L, h, kind, q). Hidden sizes, MLP widths, head dims and K/V widths of Llama 2/3, Mistral, Mixtral, Qwen2/2.5/3,
# Gemma 2/3, Phi-2/3, SmolLM2, TinyLlama.
COVERED = {
    64: (64, 1, "sylvester", 0), 80: (4, 20, "paley1", 19), 96: (8, 12, "paley1", 11),  # head dims (64: SmolLM2,
    128: (128, 1, "sylvester", 0), 256: (256, 1, "sylvester", 0),  # 80: Phi-2, 96: Phi-3, 128, 256: Gemma)
    192: (16, 12, "paley1", 11), 320: (16, 20, "paley1", 19),  # SmolLM2 K/V widths (3 · 64, 5 · 64)
    512: (512, 1, "sylvester", 0), 576: (16, 36, "paley2", 17),  # SmolLM2-135M hidden
    640: (32, 20, "paley1", 19), 768: (64, 12, "paley1", 11), 896: (32, 28, "paley1", 27),  # Qwen2-0.5B hidden
    960: (16, 60, "paley1", 59), 1024: (1024, 1, "sylvester", 0), 1152: (32, 36, "paley2", 17),  # Gemma 3 1B
    1280: (64, 20, "paley1", 19), 1536: (128, 12, "paley1", 11), 2048: (2048, 1, "sylvester", 0),
    2304: (64, 36, "paley2", 17), 2560: (128, 20, "paley1", 19), 3072: (256, 12, "paley1", 11),
    3584: (128, 28, "paley1", 27), 3840: (64, 60, "paley1", 59), 4096: (4096, 1, "sylvester", 0),
    4608: (128, 36, "paley2", 17), 4864: (64, 76, "paley2", 37), 5120: (256, 20, "paley1", 19),
    5376: (64, 84, "paley1", 83), 5632: (128, 44, "paley1", 43), 6144: (512, 12, "paley1", 11),
    6912: (64, 108, "paley1", 107), 8192: (8192, 1, "sylvester", 0), 8960: (64, 140, "paley1", 139),
    9216: (256, 36, "paley2", 17), 9728: (128, 76, "paley2", 37), 10240: (512, 20, "paley1", 19),
    11008: (32, 344, "paley1", 343), 12288: (1024, 12, "paley1", 11), 13824: (128, 108, "paley1", 107),
    14336: (512, 28, "paley1", 27), 15360: (256, 60, "paley1", 59), 17408: (256, 68, "paley1", 67),
    17920: (128, 140, "paley1", 139), 18944: (128, 148, "paley2", 73), 21504: (256, 84, "paley1", 83),
    24576: (2048, 12, "paley1", 11), 25600: (256, 100, "paley2", 49), 27648: (256, 108, "paley1", 107),
    28672: (1024, 28, "paley1", 27), 29568: (32, 924, "paley2", 461), 36864: (1024, 36, "paley2", 17),
    # vocabulary sizes with a full construction
    32000: (64, 500, "paley1", 499), 32768: (32768, 1, "sylvester", 0), 49152: (4096, 12, "paley1", 11),
    131072: (131072, 1, "sylvester", 0), 256000: (512, 500, "paley1", 499),
}
# Not coverable by the v1 rule (no Paley order <= H_MAX): vocabulary sizes. n -> fallback blocks.
NOT_COVERED = {
    32064: (16384, 8192, 4096, 2048, 1024, 256, 64),  # Phi-3
    50257: (32768, 16384, 1024, 64, 16, 1),  # GPT-2 (odd: one coordinate only gets its sign)
    128256: (65536, 32768, 16384, 8192, 4096, 1024, 256),  # Llama 3
    151936: (131072, 16384, 4096, 256, 128),  # Qwen2/2.5/3
    152064: (131072, 16384, 4096, 512),  # Qwen2-7B
    262208: (262144, 64),  # Gemma 3
}


def test_factorization_of_real_model_dimensions():
    for n, (L, h, kind, q) in COVERED.items():
        fz = R.factorize(n)
        assert (fz.L, fz.h, fz.kind, fz.q) == (L, h, kind, q), n
        assert fz.full and fz.mixing_width == n and L * h == n
    for n, blocks in NOT_COVERED.items():
        fz = R.factorize(n)
        assert fz.kind == "blocks" and fz.blocks == blocks and sum(blocks) == n, n
        assert not fz.full and fz.mixing_width == blocks[-1]


def test_factorization_prefers_the_smallest_h():
    for n in range(4, 4097, 4):
        fz = R.factorize(n)
        if fz.full and fz.h > 1:
            assert fz.h % 4 == 0 and n % fz.h == 0 and fz.L & (fz.L - 1) == 0
            smaller = [fz.h >> i for i in range(1, 8) if (fz.h >> i) % 4 == 0 and (fz.h >> i) << i == fz.h]
            assert not any(R.small_hadamard_kind(s) for s in smaller), n


# ---------------------------------------------------------------------------------------------------------------------
# Orthogonality, rotate / unrotate

ORTHO_N = [1, 2, 3, 7, 12, 13, 20, 36, 52, 64, 80, 96, 100, 192, 344, 576, 896, 1105, 1536]


@pytest.mark.parametrize("construction", [1, 2])
def test_q_is_orthogonal(construction):
    for n in ORTHO_N:
        Q = R.matrix(RotationSpec(construction, 11, n))
        assert np.abs(Q @ Q.T - np.eye(n)).max() < 1e-12, n


@pytest.mark.parametrize("construction", [1, 2])
@pytest.mark.parametrize("n", [12, 36, 64, 100, 576, 7, 1105])
def test_rotate_applies_q_along_any_axis(construction, n):
    spec = RotationSpec(construction, 5, n)
    Q = R.matrix(spec)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n, 4))  # (pre, n, post)
    y = R.rotate(x, spec, axis=1)
    np.testing.assert_allclose(y, np.einsum("ij,ajb->aib", Q, x), atol=1e-12)
    np.testing.assert_allclose(R.unrotate(y, spec, axis=1), x, atol=1e-12)
    w = rng.standard_normal((5, n))  # (rows, n): Q along the last axis, Qᵀ back
    np.testing.assert_allclose(R.rotate(w, spec), w @ Q.T, atol=1e-12)
    np.testing.assert_allclose(R.unrotate(w, spec), w @ Q, atol=1e-12)
    np.testing.assert_allclose(R.rotate(w.T, spec, axis=0), Q @ w.T, atol=1e-12)


def test_rotate_dtypes_and_input_untouched():
    spec = RotationSpec(2, 3, 576)
    x32 = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
    keep = x32.copy()
    y32 = R.rotate(x32, spec)
    assert y32.dtype == np.float32 and np.array_equal(x32, keep)
    np.testing.assert_allclose(y32, R.rotate(x32.astype(np.float64), spec), rtol=0, atol=1e-5)
    assert R.rotate(x32.astype(np.float16), spec).dtype == np.float32
    assert R.unrotate(y32, spec).dtype == np.float32
    with pytest.raises(ValueError):
        R.rotate(x32, RotationSpec(2, 3, 577))


def test_weight_rotation_keeps_the_operator():
    # W' = Q_out W Q_inᵀ and x' = Q_in x give y' = Q_out y: what a converter relies on.
    s_in, s_out = RotationSpec(2, R.derive_seed(1, 0, 0), 576), RotationSpec(2, R.derive_seed(1, 0, 1), 1536)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((1536, 576))  # (n_out, n_in)
    x = rng.standard_normal(576)
    W_r = R.rotate(R.rotate(W, s_out, axis=0), s_in, axis=1)  # along axis 1 each row r becomes Q_in r: W Q_inᵀ
    np.testing.assert_allclose(W_r @ R.rotate(x, s_in), R.rotate(W @ x, s_out), atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# Determinism: pinned values, also printed in format_spec/rotations.md section 10

def _check_value(name: str) -> str:
    m = re.fullmatch(r"H_(\d+)", name)
    if m:
        return sha256(R.hadamard_matrix(int(m[1])))
    m = re.fullmatch(r"(signs|perm|Q|rotate)\(([\d, ]+)\)", name)
    args = [int(a) for a in m[2].split(",")]
    if m[1] == "signs":
        return sha256(R.draw_signs(*args))
    if m[1] == "perm":
        return sha256(R.draw_permutation(*args).astype("<u4"))
    spec = RotationSpec(*args)
    if m[1] == "Q":
        Q_i = np.rint(R.matrix(spec) * math.sqrt(spec.n)).astype(np.int8)
        assert np.array_equal(Q_i / math.sqrt(spec.n), R.matrix(spec))
        return sha256(Q_i)
    x = np.arange(spec.n, dtype=np.float64) - spec.n // 2
    return sha256(R.rotate(x, spec).astype("<f8"))


PINNED = {
    "H_12": "db7478025ce74776a8a2669368885b71737288dabf1e23985366a367b4f78ab9",
    "H_36": "1a7aed2f42a8c71de2ae13e765a6df2c2023519ef899b00d5d0baa7ee26f341b",
    "H_576": "925a7cae8bad9b49803848a4e1800ae0dc00e73e4ba0b0fa0d02a35688c1d8c0",
    "Q(2, 1, 576)": "379e10952636e0ca5b9918db804da1849902e620603737b605de19d716f6aae9",
    "rotate(2, 7, 64)": "51853fadd42f4c55920a6399f1bdc94c7355e38e02b6cd4c124c6570342a1067",
}


def test_pinned_regression_vectors():
    for name, digest in PINNED.items():
        assert _check_value(name) == digest, name
    assert R.stream_state(1, 576, 1) == 15697546488126442770
    assert R.stream_state(1, 576, 2) == 4009199677579313709
    assert R.draw_signs(1, 12).tolist() == [1, -1, 1, -1, -1, -1, 1, 1, 1, 1, -1, 1]
    assert R.draw_permutation(1, 12).tolist() == [5, 4, 8, 6, 3, 9, 2, 7, 11, 1, 0, 10]


def test_spec_doc_check_values_match():
    rows = re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", SPEC_DOC.read_text(), flags=re.M)
    assert len(rows) >= 10
    assert PINNED.items() <= dict(rows).items()
    for name, digest in rows:
        assert _check_value(name) == digest, name


def test_same_seed_same_bytes():
    spec = RotationSpec(2, 123, 896)
    x = np.random.default_rng(0).standard_normal((8, 896)).astype(np.float32)
    assert sha256(R.rotate(x, spec)) == sha256(R.rotate(x.copy(), RotationSpec(2, 123, 896)))
    assert sha256(R.rotate(x, spec)) != sha256(R.rotate(x, RotationSpec(2, 124, 896)))
    # construction 2 = construction 1 plus a permutation: same signs
    assert np.array_equal(R.plan(RotationSpec(1, 9, 64)).signs, R.plan(RotationSpec(2, 9, 64)).signs)


def test_spec_doc_reference_code_builds_the_same_q():
    code = re.search(r"## 9\. Reference code.*?```python\n(.*?)```", SPEC_DOC.read_text(), flags=re.S)[1]
    ns: dict = {}
    exec(compile(code, str(SPEC_DOC), "exec"), ns)
    for c, seed, n in [(1, 0, 12), (2, 1, 12), (2, 7, 28), (1, 3, 36), (2, 4, 52), (2, 5, 64), (1, 6, 100),
                       (2, 2, 7), (2, 8, 13), (2, 9, 576)]:
        assert np.array_equal(ns["rotation_matrix"](c, seed, n), R.matrix(RotationSpec(c, seed, n))), (c, seed, n)
    assert ns["factorize"](11008) == (32, 344) and ns["factorize"](151936) is None


# ---------------------------------------------------------------------------------------------------------------------
# The stored spec

def test_spec_json_round_trip():
    spec = RotationSpec(2, R.SEED_LIMIT - 1, 576)
    assert RotationSpec.from_json(spec.to_json()) == spec
    assert spec.to_json() == {"construction": 2, "seed": R.SEED_LIMIT - 1, "n": 576}
    assert RotationSpec(np.int64(1), np.uint32(5), np.int32(64)) == RotationSpec(1, 5, 64)


@pytest.mark.parametrize("bad", [
    None, [], "x", {"construction": 1, "seed": 0}, {"construction": 1, "seed": 0, "n": 8, "extra": 1},
    {"construction": 0, "seed": 0, "n": 8}, {"construction": 3, "seed": 0, "n": 8},
    {"construction": True, "seed": 0, "n": 8}, {"construction": 1.0, "seed": 0, "n": 8},
    {"construction": 1, "seed": -1, "n": 8}, {"construction": 1, "seed": 1 << 53, "n": 8},
    {"construction": 1, "seed": 0.5, "n": 8}, {"construction": 1, "seed": "7", "n": 8},
    {"construction": 1, "seed": 0, "n": 0}, {"construction": 1, "seed": 0, "n": (1 << 24) + 1},
    {"construction": 1, "seed": 0, "n": False}, {"construction": 1, "seed": 0, "n": None},
])
def test_spec_json_rejects(bad):
    with pytest.raises(FormatError):
        RotationSpec.from_json(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Flattening: what the rotation is for

def test_rotation_flattens_heavy_tails():
    rng = np.random.default_rng(0)
    for n in (576, 1536, 896, 11008):
        x = rng.standard_t(df=2, size=(16, n))  # heavy-tailed rows
        x[:, :3] += 50.0  # plus a few outlier channels, as activations have
        y = R.rotate(x, RotationSpec(2, 1, n))
        ratio = lambda a: (np.abs(a).max(axis=1) / np.sqrt((a ** 2).mean(axis=1))).mean()  # max / RMS per row
        kurt = lambda a: ((a ** 4).mean(axis=1) / (a ** 2).mean(axis=1) ** 2).mean()
        assert ratio(y) < 5.0 < 2 * ratio(y) < ratio(x), n  # a Gaussian row of this size has max/RMS about 3.5-4
        assert kurt(y) < 3.5 < 10 < kurt(x), n
        np.testing.assert_allclose((y ** 2).sum(axis=1), (x ** 2).sum(axis=1), rtol=1e-10)  # energy kept


# ---------------------------------------------------------------------------------------------------------------------
# Kernels against the numpy reference

KERNEL_SPECS = [(1, 576), (2, 576), (2, 1536), (1, 896), (2, 64), (2, 100), (2, 7), (1, 1105), (2, 11008)]


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("construction,n", KERNEL_SPECS)
def test_numba_kernel_matches_reference(construction, n):
    from occrt.kernels.hadamard import HadamardKernel

    spec = RotationSpec(construction, 21, n)
    k = HadamardKernel(spec)
    assert (k.full, k.mixing_width) == (R.plan(spec).full, R.plan(spec).mixing_width)
    rng = np.random.default_rng(n)
    for rows in (1, 2, 9):  # 1 and 2: the serial path, 9: the parallel one
        x = rng.standard_normal((rows, n)).astype(np.float32)
        ref = R.rotate(x.astype(np.float64), spec)
        y = x.copy()
        assert k.rotate_(y) is y
        _close(y, ref)
        _close(k.unrotate_(y), x.astype(np.float64))
    v = rng.standard_normal(n).astype(np.float32)  # one vector: the decode step
    ref = R.rotate(v.astype(np.float64), spec)
    _close(k.rotate_(v.copy()), ref)
    _close(k.unrotate_(ref.astype(np.float32)), v.astype(np.float64))
    x3 = rng.standard_normal((2, 3, n)).astype(np.float32)  # (batch, seq, n)
    _close(k.rotate_(x3.copy()), R.rotate(x3.astype(np.float64), spec))


def test_numba_kernel_refuses_what_it_cannot_do_in_place():
    from occrt.kernels.hadamard import HadamardKernel, rotate_

    k = HadamardKernel(RotationSpec(2, 1, 64))
    with pytest.raises(TypeError):
        k.rotate_(np.zeros(64))  # float64
    with pytest.raises(TypeError):
        k.rotate_(np.zeros((64, 4), dtype=np.float32).T)  # not contiguous
    with pytest.raises(ValueError):
        k.rotate_(np.zeros(65, dtype=np.float32))
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    _close(rotate_(x.copy(), RotationSpec(2, 1, 64)), R.rotate(x.astype(np.float64), RotationSpec(2, 1, 64)))


@pytest.mark.parametrize("construction,n", [(2, 576), (1, 1536), (2, 1105), (2, 344)])
def test_torch_matches_reference(construction, n):
    torch = pytest.importorskip("torch")
    from occrt.kernels.hadamard import TorchHadamard, rotate_torch, unrotate_torch

    spec = RotationSpec(construction, 4, n)
    x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
    ref = R.rotate(x.astype(np.float64), spec)
    y = rotate_torch(torch.from_numpy(x), spec)
    assert y.dtype == torch.float32 and tuple(y.shape) == x.shape
    _close(y.numpy(), ref)
    _close(unrotate_torch(y, spec).numpy(), x.astype(np.float64))
    t = TorchHadamard(spec)
    _close(t.rotate(torch.from_numpy(x).double()).numpy(), ref)
    yb = t.rotate(torch.from_numpy(x).to(torch.bfloat16))  # computed in float32, returned in bfloat16
    assert yb.dtype == torch.bfloat16
    assert np.abs(yb.float().numpy() - ref).max() < 0.02 * np.abs(ref).max()
