"""Hostile and corrupt files: the corpus in format_spec/test_vectors/hostile/, every single-bit flip of a small real
file, the limits of format_spec/occ.md 3.1, and model metadata that `occrt.load` must refuse."""
from __future__ import annotations

import copy
import json
import os
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import occrt
from occrt.codecs.base import Codec, Encoded
from occrt.codecs.raw import RawCodec
from occrt.errors import FormatError
from occrt.format import OccFile, OccWriter
from occrt.format import constants as C
from tests import hostile_corpus
from tests.occ_samples import assemble, sample_bytes, split, tiny_model_bytes

CORPUS = hostile_corpus.FOLDER


# -- the corpus -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.occ")), ids=lambda p: p.stem)
def test_corpus_file_is_rejected(path: Path):
    with pytest.raises(FormatError) as err:
        OccFile.open(path).verify()
    assert "invalid .occ file" in str(err.value) and len(str(err.value).splitlines()) == 1
    case = hostile_corpus.CASES.get(path.stem)
    if case is not None:  # rejected for the reason the file was made for, not by accident
        assert re.search(case[2], err.value.reason), err.value.reason


def test_corpus_is_what_the_generator_makes_and_the_readme_lists():
    on_disk = {p.stem: p.read_bytes() for p in CORPUS.glob("*.occ")}
    assert on_disk == hostile_corpus.build(), "regenerate with: python -m tests.hostile_corpus"
    listed = re.findall(r"^- `(.+)\.occ`: .+$", (CORPUS / "README.md").read_text(), re.M)
    assert sorted(listed) == sorted(on_disk)
    assert all(len(data) <= 32 * 1024 for data in on_disk.values())


def test_corpus_base_is_valid():
    assert OccFile.from_bytes(hostile_corpus.base()).verify()["tensors"] == 5


# -- every single-bit flip --------------------------------------------------------------------------------------------
def test_every_single_bit_flip_is_detected():
    # raw tensors, blobs, metadata, and examples of every codec; OCCRT_FLIP_SEED draws other raw tensor values
    data = sample_bytes(max_examples_per_codec=2, seed=int(os.environ.get("OCCRT_FLIP_SEED", "7")))
    assert len(data) <= 16 * 1024, "keep the sweep file small: the sweep is 8 x its size"
    OccFile.from_bytes(data).verify()
    buf = bytearray(data)
    undetected, reasons = [], {}
    start = time.perf_counter()
    for i in range(len(buf)):
        for bit in range(8):
            buf[i] ^= 1 << bit
            try:
                OccFile.from_bytes(bytes(buf)).verify()
                undetected.append((i, bit))
            except FormatError as e:
                key = e.reason.split(":")[0][:30]
                reasons[key] = reasons.get(key, 0) + 1
            buf[i] ^= 1 << bit
    assert not undetected, f"{len(undetected)} flips not detected, first at (byte, bit) {undetected[:5]}"
    assert sum(reasons.values()) == 8 * len(data)
    print(f"{8 * len(data)} flips of a {len(data)}-byte file detected in {time.perf_counter() - start:.1f} s")


# -- limits and number/text rules -------------------------------------------------------------------------------------
def _with_metadata_text(value_text: str) -> bytes:
    header, body = split(hostile_corpus.base())
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return assemble(None, body, header_bytes=text.replace('"n":[1,2.5]', f'"n":{value_text}').encode())


@pytest.mark.parametrize("text,ok", [
    (str((1 << 64) - 1), True), (str(-(1 << 63)), True), (str(1 << 64), False), (str(-(1 << 63) - 1), False),
    ("1" * 21, False), ("1.7976931348623157e308", True), ("1e309", False), ("-1e309", False), ("1e-400", True),
    ("[" * 29 + "]" * 29, True), ("[" * 30 + "]" * 30, False),  # levels: header, metadata, "note", "n" = 3 + k ('"\\ud83d\\ude00"', True), ('"\\ud83d"', False),
])
def test_json_number_text_and_depth_rules(text, ok):
    data = _with_metadata_text(text)
    if ok:
        OccFile.from_bytes(data).verify()
    else:
        with pytest.raises(FormatError):
            OccFile.from_bytes(data)


def test_header_memory_is_a_small_multiple_of_its_length():
    # the worst JSON for memory: empty containers, ~3 bytes each, ~60 bytes each as Python objects
    header, body = split(hostile_corpus.base())
    n = 1 << 18
    header["metadata"]["x"] = [{} for _ in range(n // 3)]
    data = assemble(header, body)
    tracemalloc.start()
    try:
        OccFile.from_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 32 * n, f"parsing a {n}-byte header took {peak} bytes"  # format_spec/occ.md 3.1


class _ConstantCodec(Codec):
    """Any shape from a 4-byte payload (a float32 to repeat): what a reader must refuse past 4096 elements a byte."""

    id = 250
    name = "test-constant"
    versions = (1,)

    def check(self, *, version, dtype, shape, params, length):
        super().check(version=version, dtype=dtype, shape=shape, params=params, length=length)
        if length != 4:
            raise FormatError("constant payload is 4 bytes")

    def decode(self, payload, *, version, dtype, shape, params):
        return np.full(shape, np.frombuffer(payload, "<f4")[0], np.float32)


def test_elements_per_section_byte_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setitem(occrt.codecs.registry.CODECS, _ConstantCodec.id, _ConstantCodec())
    payload = np.float32(0.5).tobytes()
    ok = Encoded(codec=250, codec_version=1, dtype="f32", shape=(4 * C.MAX_ELEMENTS_PER_BYTE,), payload=payload)
    big = Encoded(codec=250, codec_version=1, dtype="f32", shape=(1 << 30, 1 << 10), payload=payload)
    with OccWriter(tmp_path / "w.occ") as w:
        w.add_tensor("ok", ok)
        with pytest.raises(FormatError, match="per byte"):
            w.add_tensor("big", big)  # the writer refuses what the reader would reject
        w.finish()
    header, body = split((tmp_path / "w.occ").read_bytes())
    assert OccFile.from_bytes(assemble(header, body)).verify()["elements"] == 4 * C.MAX_ELEMENTS_PER_BYTE
    header["tensors"][0]["shape"] = [1 << 30, 1 << 10]  # 2^40 elements: 4 TiB to allocate for 4 bytes of file
    with pytest.raises(FormatError, match="per byte"):
        OccFile.from_bytes(assemble(header, body))


def _nested(levels: int) -> list:
    v: list = []
    for _ in range(levels):
        v = [v]
    return v


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.set_metadata("k", 1 << 64), "outside"),
    (lambda w: w.set_metadata("k", {"a": "\ud800"}), "lone surrogate"),
    (lambda w: w.set_metadata("\udfff", 1), "lone surrogate"),
    (lambda w: w.set_metadata("k", _nested(40)), "nested"),
    (lambda w: w.add_tensor("x", RawCodec.encode(np.zeros((1,) * 9, np.float32))), "limits"),
    (lambda w: w.add_tensor("x", Encoded(0, 1, "f64", (1,), b"\0" * 8)), "unknown dtype"),
    (lambda w: w.add_tensor("x\ud800", RawCodec.encode(np.zeros(1, np.float32))), "UTF-8|surrogate"),
])
def test_writer_refuses_what_readers_reject(tmp_path, edit, message):
    with OccWriter(tmp_path / "x.occ") as w:
        with pytest.raises((ValueError, FormatError), match=message):
            edit(w)


# -- model metadata (occrt.load) --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> bytes:
    return tiny_model_bytes()


def _cfg(key, value):
    return lambda m: m["model.config"].__setitem__(key, value)


def _meta(key, value):
    return lambda m: m.__setitem__(key, value)


BAD_METADATA = {
    "config lacks hidden_size": (lambda m: m["model.config"].pop("hidden_size"), "lacks"),
    "config is a list": (_meta("model.config", [1]), "not an object"),
    "no config": (lambda m: m.pop("model.config"), "not an object"),
    "hidden_size 0": (_cfg("hidden_size", 0), "hidden_size"),
    "hidden_size 2^40": (_cfg("hidden_size", 1 << 40), "hidden_size"),
    "heads not a multiple": (_cfg("num_key_value_heads", 3), "multiple"),
    "odd head_dim": (_cfg("head_dim", 7), "even"),
    "eps 0": (_cfg("rms_norm_eps", 0), "rms_norm_eps"),
    "unsupported architecture": (_cfg("architecture", "falcon"), "not supported"),
    "config key unknown": (_cfg("use_parallel_residual", True), "does not know"),
    "norm_type unknown": (_cfg("norm_type", "batch"), "norm_type"),
    "hidden_act unknown": (_cfg("hidden_act", "relu"), "hidden_act"),
    "layer_types too long": (_cfg("layer_types", ["full_attention"] * 3), "layer_types"),
    "sliding layers without a window": (_cfg("layer_types", ["sliding_attention"]), "sliding_window"),
    "sliding_window 0": (_cfg("sliding_window", 0), "sliding_window"),
    "rotary_dim odd": (_cfg("rotary_dim", 3), "even"),
    "rotary_dim past head_dim": (_cfg("rotary_dim", 64), "head_dim"),
    "softcap negative": (_cfg("final_logit_softcapping", -1.0), "final_logit_softcapping"),
    "embedding_scale text": (_cfg("embedding_scale", "x"), "embedding_scale"),
    "rope_local unknown type": (_cfg("rope_local", {"type": "ntk", "theta": 1e4}), "rope_local"),
    "longrope factors missing": (_cfg("rope", {"type": "longrope", "theta": 1e4, "attention_factor": 1.0,
                                               "original_max_position_embeddings": 64}), "short_factor"),
    "general.architecture disagrees": (_meta("general.architecture", "mistral"), "general.architecture"),
    "rope type unknown": (_cfg("rope", {"type": "ntk", "theta": 1e4}), "rope.type"),
    "rope theta 1e308": (_cfg("rope", {"type": "default", "theta": 1e308}), "theta"),
    "linear rope without factor": (_cfg("rope", {"type": "linear", "theta": 1e4}), "factor"),
    "linear rope factor text": (_cfg("rope", {"type": "linear", "theta": 1e4, "factor": "x"}), "factor"),
    "yarn factor 0": (_cfg("rope", {"type": "yarn", "theta": 1e4, "factor": 0,
                                    "original_max_position_embeddings": 8}), "factor"),
    "llama3 missing keys": (_cfg("rope", {"type": "llama3", "theta": 1e4, "factor": 2}), "low_freq_factor"),
    "llama3 low = high": (_cfg("rope", {"type": "llama3", "theta": 1e4, "factor": 2, "low_freq_factor": 1,
                                        "high_freq_factor": 1, "original_max_position_embeddings": 64}), "below"),
    "freq_factors wrong count": (_cfg("rope", {"type": "freq_factors", "theta": 1e4, "factors": [1.0]}), "factors"),
    "freq_factors zero": (_cfg("rope", {"type": "freq_factors", "theta": 1e4, "factors": [0] * 4}), "factors"),
    "eos ids an integer": (_meta("tokenizer.eos_token_ids", 5), "eos_token_ids"),
    "eos id past the vocabulary": (_meta("tokenizer.eos_token_ids", [10 ** 9]), "token ids"),
    "bos id negative": (_meta("tokenizer.bos_token_id", -1), "token ids"),
    "bos id text": (_meta("tokenizer.bos_token_id", "<s>"), "token ids"),
    "add_bos not boolean": (_meta("tokenizer.add_bos_token", "yes"), "add_bos_token"),
    "chat template a number": (_meta("chat.template", 5), "chat.template"),
    "defaults not an object": (_meta("generation.defaults", [0.7]), "generation.defaults"),
    "temperature text": (_meta("generation.defaults", {"temperature": "hot"}), "temperature"),
    "top_p 5": (_meta("generation.defaults", {"top_p": 5}), "top_p"),
    "top_k -3": (_meta("generation.defaults", {"top_k": -3}), "top_k"),
    "config shape disagrees with tensors": (_cfg("intermediate_size", 32), "config implies"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_load_rejects_bad_metadata(case, tiny_model, tmp_path):
    edit, message = BAD_METADATA[case]
    header, body = split(tiny_model)
    header = copy.deepcopy(header)
    edit(header["metadata"])
    path = tmp_path / "m.occ"
    path.write_bytes(assemble(header, body))
    with pytest.raises(FormatError, match=message):
        occrt.load(path)


def test_tiny_model_loads(tiny_model, tmp_path):
    path = tmp_path / "m.occ"
    path.write_bytes(tiny_model)
    model = occrt.load(path)
    assert isinstance(model.generate("the cat", max_new_tokens=3, temperature=0), str)
    model.close()
