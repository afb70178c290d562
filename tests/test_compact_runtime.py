"""The compact runtime: each linear form against the codec's dense decoding, whole models against decoding every
tensor to float32, the torch path (run on the CPU) against the numpy one, loading, and `occrt bench`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import occrt
from occrt.codecs.ecsq import ECSQ, EcsqCodec
from occrt.codecs.rotation import RotationSpec
from occrt.converters.convert import ConvertOptions, convert
from occrt.errors import OccError
from occrt.format.reader import OccFile
from occrt.model.linear import Activation, DenseLinear, EcsqLinear, decode_ecsq
from occrt.model.decoder import DecoderModel, LayerWeights
from tests.conftest import make_llama_dir

IDS = [1, 17, 5, 93, 200, 41, 7, 7, 150, 3, 64, 250, 11, 90, 120, 33]
PROJ = ("q", "k", "v", "o", "gate", "up", "down")


def _close(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal to float32 rounding: relative to the largest magnitude (sums of a few hundred float32 terms)."""
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= rtol * max(np.abs(ref).max(), 1e-30)


def _encodings():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    odd = rng.standard_normal((13, 37)).astype(np.float32)
    return {
        "int4": EcsqCodec.encode(w, step=0.6),
        "int8": EcsqCodec.encode(w, step=0.05),
        "int16": EcsqCodec.encode(100 * w, step=0.1),
        "int4_odd_rot_rank_scales": EcsqCodec.encode(
            odd, step=0.5, rank=2, rot_in=RotationSpec(1, 3, 37), rot_out=RotationSpec(2, 4, 13),
            row_scales=np.linspace(0.5, 2, 13), col_scales=np.linspace(1, 3, 37)),
        **{f"example{i}": e for i, e in enumerate(ECSQ.examples())},
    }


ENCODINGS = _encodings()


def _payload(enc) -> memoryview:
    parts = enc.payload if isinstance(enc.payload, list) else [enc.payload]
    return memoryview(b"".join(bytes(p) for p in parts))


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_ecsq_form_matches_dense_decoding(name):
    enc = ENCODINGS[name]
    payload = _payload(enc)
    w = ECSQ.decode(payload, version=1, dtype="f32", shape=enc.shape, params=enc.params)  # (n_out, n_in)
    form = decode_ecsq(payload, shape=enc.shape, params=enc.params)
    if name.startswith("int"):
        assert form.kind == name.split("_")[0]
    wide = name == "example3"  # codes beyond int16 (the codec's wide-alphabet example): int32, still no float copy
    assert form.codes.dtype in ((np.int32,) if wide else (np.uint8, np.int8, np.int16))
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(enc.shape[0]).astype(np.float32)
    form.b = bias
    for t in (1, 3, 4, 7):
        x = rng.standard_normal((t, enc.shape[1])).astype(np.float32)
        _close(form(x), x @ w.T + bias)
        _close(form(Activation(x)), x @ w.T + bias)
    ids = np.array([0, enc.shape[0] - 1, 2, 2])
    _close(form.rows(ids), w[ids])


def test_shared_activation_rotates_once_per_spec(monkeypatch):
    from occrt.kernels.hadamard import HadamardKernel

    spec = RotationSpec(1, 11, 16)
    rng = np.random.default_rng(2)
    forms = [decode_ecsq(_payload(e), shape=e.shape, params=e.params)
             for e in (EcsqCodec.encode(rng.standard_normal((n, 16)).astype(np.float32), step=0.1, rot_in=spec)
                       for n in (8, 4, 4))]
    calls = []
    original = HadamardKernel.rotate_
    monkeypatch.setattr(HadamardKernel, "rotate_", lambda self, x: calls.append(1) or original(self, x))
    x = Activation(rng.standard_normal((1, 16)).astype(np.float32))
    keep = x.x.copy()
    for f in forms:
        f(x)
    assert len(calls) == 1
    assert np.array_equal(x.x, keep)  # the shared input is not modified


def _dense_reference(model: occrt.api.Model) -> DecoderModel:
    """The same network with every tensor decoded to float32 by its codec (the runtime before compact forms)."""
    occ, net = model.file, model.network

    def dense(name: str, bias: np.ndarray | None = None) -> DenseLinear:
        return DenseLinear(np.asarray(occ.tensor(name), dtype=np.float32), bias)

    layers = [LayerWeights(attn_norm=lw.attn_norm, mlp_norm=lw.mlp_norm,
                           **{p: dense(f"model.layers.{i}.{'self_attn' if p in 'qkvo' else 'mlp'}.{p}_proj.weight",
                                       getattr(lw, p).b) for p in PROJ})
              for i, lw in enumerate(net.layers)]
    embed = dense("model.embed_tokens.weight")
    head = embed if net.head is net.embed else dense("lm_head.weight")
    return DecoderModel(net.cfg, embed=embed, layers=layers, norm=net.norm, head=head)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """Tiny models at 3 bits: rotations on both sides and ranks (0, 4) offered; one tied with biases."""
    base = tmp_path_factory.mktemp("compact")
    out = {}
    for name, overrides in (("untied", {}), ("tied_bias", {"tie_word_embeddings": True, "attention_bias": True,
                                                           "mlp_bias": True})):
        src = make_llama_dir(base / name, seed=11, **overrides)
        path = str(base / f"{name}.occ")
        convert(src, path, ConvertOptions(bpw=3, rotate="both", ranks=(0, 4)), log=lambda msg: None)
        out[name] = path
    return out


@pytest.mark.parametrize("name", ["untied", "tied_bias"])
def test_compact_model_matches_dense_decoding(compressed, name):
    model = occrt.load(compressed[name])
    net = model.network
    for lw in net.layers:
        for p in PROJ:
            form = getattr(lw, p)
            assert isinstance(form, EcsqLinear) and form.codes.dtype in (np.uint8, np.int8, np.int16)
            assert form.rot_in is not None and form.rot_out is not None
        assert lw.q.rot_in == lw.k.rot_in == lw.v.rot_in and lw.gate.rot_in == lw.up.rot_in
    assert isinstance(net.embed, EcsqLinear)
    assert (net.head is net.embed) == (name == "tied_bias")
    ref = _dense_reference(model)
    c1, c2 = net.new_cache(len(IDS) + 4), ref.new_cache(len(IDS) + 4)
    _close(net.forward(np.asarray(IDS), c1, all_logits=True), ref.forward(np.asarray(IDS), c2, all_logits=True))
    for token in (5, 9, 200, 3):  # decode steps: the one-token kernels
        _close(net.forward(np.asarray([token]), c1), ref.forward(np.asarray([token]), c2))


def test_parallel_decode_and_parallel_kernels_agree(compressed):
    from occrt.model.config import ModelConfig
    from occrt.model.loader import load_model

    with OccFile.open(compressed["untied"]) as occ:
        cfg = ModelConfig.from_json(occ.metadata["model.config"])
        one = load_model(occ, cfg, threads=1)
        two = load_model(occ, cfg, threads=2, parallel_kernels=True)
        for a, b in zip(one.layers, two.layers):
            for p in PROJ:
                assert np.array_equal(getattr(a, p).codes, getattr(b, p).codes)
        c1, c2 = one.new_cache(20), two.new_cache(20)
        _close(one.forward(np.asarray(IDS), c1), two.forward(np.asarray(IDS), c2))


def test_torch_path_matches_numpy_runtime(compressed):
    pytest.importorskip("torch")
    for path in compressed.values():
        cpu = occrt.load(path)
        tch = occrt.load(path, device="torch-cpu")
        c1, c2 = cpu.new_cache(len(IDS) + 8), tch.new_cache(len(IDS) + 8)
        _close(tch.forward(np.asarray(IDS), c2, all_logits=True), cpu.forward(np.asarray(IDS), c1, all_logits=True))
        for token in (5, 9, 200):
            _close(tch.forward(np.asarray([token]), c2), cpu.forward(np.asarray([token]), c1))
        assert tch.generate(IDS[:5], max_new_tokens=8) == cpu.generate(IDS[:5], max_new_tokens=8)


def test_torch_path_on_raw_weights(tiny_occ):
    pytest.importorskip("torch")
    cpu, tch = occrt.load(tiny_occ), occrt.load(tiny_occ, device="torch-cpu")
    c1, c2 = cpu.new_cache(len(IDS)), tch.new_cache(len(IDS))
    _close(tch.forward(np.asarray(IDS), c2, all_logits=True), cpu.forward(np.asarray(IDS), c1, all_logits=True))


def test_torch_forms_on_every_encoding():
    torch = pytest.importorskip("torch")
    from occrt.model.decoder_torch import TorchEcsq

    rng = np.random.default_rng(3)
    for enc in ENCODINGS.values():
        form = decode_ecsq(_payload(enc), shape=enc.shape, params=enc.params)
        tf = TorchEcsq(form, "cpu", {})
        x = rng.standard_normal((3, enc.shape[1])).astype(np.float32)
        _close(tf(torch.from_numpy(x)).numpy(), form(x))
        ids = np.array([1, 0, 1])
        _close(tf.rows(torch.from_numpy(ids)).numpy(), form.rows(ids))


def test_cuda_unavailable_is_one_clear_error(tiny_occ, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(OccError, match="CUDA is not available"):
        occrt.load(tiny_occ, device="cuda")
    with pytest.raises(OccError, match="not supported"):
        occrt.load(tiny_occ, device="tpu")
    from occrt.cli import main

    assert main(["generate", tiny_occ, "--prompt", "the", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CUDA is not available" in err


def test_no_dense_copy_of_compressed_weights(compressed):
    from occrt.bench import weight_bytes

    model = occrt.load(compressed["untied"])
    n_params = sum(e.n_elements for e in model.file.tensors.values())
    assert weight_bytes(model.network) < 2.2 * n_params  # int8 codes plus side data, not 4 bytes a weight


def test_bench_command(compressed):
    done = subprocess.run([sys.executable, "-m", "occrt", "bench", compressed["tied_bias"], "--runs", "2",
                           "--prompt-tokens", "6", "--new-tokens", "5", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    for key in ("load_s", "first_token_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "weight_bytes",
                "kv_cache_bytes"):
        assert r[key] > 0, key
    assert r["runs"] == 2 and len(r["runs_detail"]) == 2 and r["first_token_s"] >= r["load_s"]
    done = subprocess.run([sys.executable, "-m", "occrt", "bench", compressed["tied_bias"], "--runs", "1",
                           "--prompt-tokens", "4", "--new-tokens", "3"], capture_output=True, text=True)
    assert done.returncode == 0 and "decode" in done.stdout and "peak RSS" in done.stdout


def test_token_ids_and_shapes_are_checked_before_the_kernels(compressed, tiny_occ):
    """The numba kernels do not check bounds: the forms refuse what would read outside their arrays."""
    for path in (compressed["tied_bias"], tiny_occ):
        net = occrt.load(path).network
        vocab = net.cfg.vocab_size
        for bad in ([vocab], [-1], [3, vocab + 7]):
            with pytest.raises(IndexError):
                net.forward(np.asarray(bad), net.new_cache(4))
        with pytest.raises(ValueError):  # the input rotation or the kernel wrapper refuses it
            net.layers[0].q(np.zeros((1, net.cfg.hidden_size + 1), np.float32))
