"""The compact-weight kernels (occrt.kernels.compact) against their numpy references, and the ANS decoder writing
straight into narrow code arrays (occrt.codecs.ans `out=`)."""
from __future__ import annotations

import numpy as np
import pytest

from occrt.codecs import ans
from occrt.kernels import compact

# the sums are float32 with reassociation: compare against the float64 reference relative to the result's scale
RTOL = 2e-6


def _codes(rng, kind, shape):
    lo, hi = {"int4": (-8, 7), "int8": (-128, 127), "int16": (-32768, 32767), "float32": (-3, 3)}[kind]
    if kind == "float32":
        return rng.standard_normal(shape).astype(np.float32)
    return rng.integers(lo, hi + 1, shape).astype({"int4": np.int8, "int8": np.int8, "int16": np.int16}[kind])


def _stored(kind, c):
    if kind != "int4":
        return c
    p = np.empty((c.shape[0], compact.n_packed(c.shape[1])), dtype=np.uint8)
    compact.pack_int4(c, p)
    return p


@pytest.mark.parametrize("n_in", [1, 2, 7, 64, 101])
def test_int4_packing_round_trips(n_in):
    rng = np.random.default_rng(n_in)
    c = rng.integers(-8, 8, (5, n_in)).astype(np.int8)
    p = _stored("int4", c)
    assert p.shape == (5, (n_in + 1) // 2)
    assert np.array_equal(compact.unpack_int4(p, n_in), c)
    if n_in % 2:
        assert not (p[:, -1] >> 4).any()  # the last high nibble is padding: zero


def test_kind_for_chooses_the_narrowest():
    assert compact.kind_for(-8, 7) == "int4"
    assert compact.kind_for(-9, 0) == "int8" and compact.kind_for(0, 8) == "int8"
    assert compact.kind_for(-128, 127) == "int8"
    assert compact.kind_for(-129, 0) == "int16" and compact.kind_for(-32768, 32767) == "int16"
    assert compact.kind_for(0, 32768) is None


@pytest.mark.parametrize("kind", ["int4", "int8", "int16", "float32"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (13, 77), (64, 128)])
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 9])
def test_products_match_reference(kind, shape, t):
    n_out, n_in = shape
    rng = np.random.default_rng(n_out * 1000 + n_in * 10 + t)
    c = _codes(rng, kind, shape)
    data = _stored(kind, c)
    x = rng.standard_normal((t, n_in)).astype(np.float32)
    m = (0.5 + rng.random(n_out)).astype(np.float32)
    ref = compact.reference_qmatmul("int4" if kind == "int4" else "int8", data if kind == "int4" else c, n_in, x, m) \
        if kind != "float32" else (x.astype(np.float64) @ c.astype(np.float64).T) * m
    scale = np.abs(x).sum(axis=1, keepdims=True) * np.abs(c.astype(np.float64)).max() * m.max() + 1e-30
    if kind == "int4":
        kernels = [lambda y: compact.qmatmul_i4(data, n_in, x, m, y), lambda y: compact.qgemm_i4(data, n_in, x, m, y),
                   lambda y: compact.qmatmul_i4_parallel(data, n_in, x, m, y),
                   lambda y: compact.qgemm_i4_parallel(data, n_in, x, m, y)]
    else:
        kernels = [lambda y, f=f: f(data, x, m, y) for f in (compact.qmatmul, compact.qgemm,
                                                             compact.qmatmul_parallel, compact.qgemm_parallel)]
    for run in kernels:
        y = np.full((t, n_out), np.nan, dtype=np.float32)
        run(y)
        assert np.all(np.abs(y - ref) <= RTOL * scale)


@pytest.mark.parametrize("kind", ["int4", "int8", "int16"])
def test_dequantize_rows_matches_reference(kind):
    rng = np.random.default_rng(7)
    n_in = 37
    c = _codes(rng, kind, (11, n_in))
    data = _stored(kind, c)
    m = (0.5 + rng.random(11)).astype(np.float32)
    rows = np.array([3, 0, 10, 3], dtype=np.int64)
    out = np.empty((rows.size, n_in), dtype=np.float32)
    if kind == "int4":
        compact.dequantize_rows_i4(data, n_in, rows, m, out)
    else:
        compact.dequantize_rows(data, rows, m, out)
    assert np.array_equal(out, compact.reference_dequantize(kind, data, n_in, rows, m))
    assert np.array_equal(out, c[rows].astype(np.float32) * m[rows, None])


ENTRY_POINTS = {
    "compact": ["pack_int4", "qmatmul", "qmatmul_parallel", "qmatmul_i4", "qmatmul_i4_parallel", "qgemm",
                "qgemm_parallel", "qgemm_i4", "qgemm_i4_parallel", "dequantize_rows", "dequantize_rows_i4"],
    "ans_decode": ["decode_chunk", "decode_chunks"],
    "hadamard": ["_apply_vec", "_apply_rows", "_apply_rows_serial"],
    "layers": ["add_rms_norm", "add_layer_norm", "rope_and_cache", "cache_write", "attention", "act_mul", "act_inplace"],
}


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_kernels_are_cached_on_disk(module):
    """Every compiled entry point is `cache=True`: a second start of occrt loads machine code instead of compiling."""
    import importlib

    mod = importlib.import_module(f"occrt.kernels.{module}")
    for name in ENTRY_POINTS[module]:
        assert type(getattr(mod, name)._cache).__name__ == "FunctionCache", f"{module}.{name} is not cached"


# ---- ANS decoding into narrow arrays -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_ans_decodes_into_narrow_arrays(dtype):
    rng = np.random.default_rng(1)
    s = np.rint(rng.standard_normal(20_000) * 3).astype(np.int32)
    s[::997] = 100  # escapes, still within int8
    block = ans.encode_symbols(s, chunk_size=3000)
    info = ans.block_info(block)
    assert info["min_symbol"] <= s.min() and info["max_symbol"] >= s.max()
    out = np.empty(s.size, dtype=dtype)
    got = ans.decode_symbols(block, n_symbols=s.size, threads=2, out=out)
    assert got is out and np.array_equal(out, s)


def test_ans_refuses_an_output_too_narrow_for_the_block():
    s = np.array([0, 1, -1, 300] * 50, dtype=np.int32)  # 300 does not fit int8
    block = ans.encode_symbols(s)
    assert ans.block_info(block)["max_symbol"] == 300
    with pytest.raises(ValueError, match="cannot hold"):
        ans.decode_symbols(block, out=np.empty(s.size, np.int8))
    with pytest.raises(ValueError, match="holds"):
        ans.decode_symbols(block, out=np.empty(s.size + 1, np.int16))
    assert np.array_equal(ans.decode_symbols(block, out=np.empty(s.size, np.int16)), s)


def test_ans_empty_block_bounds():
    block = ans.encode_symbols(np.zeros(0, np.int32))
    info = ans.block_info(block)
    assert (info["min_symbol"], info["max_symbol"]) == (0, 0)
    assert ans.decode_symbols(block, out=np.empty(0, np.int8)).size == 0


@pytest.mark.parametrize("n", [64, 576, 1536, 100])
def test_hadamard_rows_on_one_thread_match_the_reference(n):
    """The runtime's rotations (HadamardKernel(parallel=False), rows on one thread) against the numpy reference."""
    from occrt.codecs.rotation import RotationSpec, rotate
    from occrt.kernels.hadamard import HadamardKernel

    spec = RotationSpec(2, 5, n)
    x = np.random.default_rng(n).standard_normal((9, n)).astype(np.float32)
    k = HadamardKernel(spec, parallel=False)
    y = k.rotate_(x.copy())
    ref = rotate(x.astype(np.float64), spec)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(k.unrotate_(y) - x).max() <= 1e-5 * np.abs(x).max()
