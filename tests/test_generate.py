"""Sampling, stop conditions, streaming and the chat template, on the tiny converted model."""
from __future__ import annotations

import numpy as np
import pytest

import occrt
from occrt.generate import Sampler, SamplingParams, stream_text
from tests.conftest import CHAT_TEMPLATE


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert Sampler(SamplingParams())(logits) == 1


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    k2 = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {k2(logits) for _ in range(300)} == {0, 1}
    p = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))  # 0.5 + 0.3 reaches 0.7
    assert {p(logits) for _ in range(300)} == {0, 1}
    full = Sampler(SamplingParams(temperature=1.0, seed=0))
    draws = [full(logits) for _ in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(freq - [0.5, 0.3, 0.15, 0.05]).max() < 0.03


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4]))
    cold = Sampler(SamplingParams(temperature=0.2, seed=1))
    assert np.mean([cold(logits) == 0 for _ in range(500)]) > 0.85


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)])
def test_bad_sampling_values_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_seed_makes_sampling_reproducible(tiny_occ):
    model = occrt.load(tiny_occ)
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95)
    a = model.generate("the cat", seed=7, **kw)
    b = model.generate("the cat", seed=7, **kw)
    c = model.generate("the cat", seed=8, **kw)
    assert a == b and a != c


def test_streaming_pieces_join_to_the_full_text(tiny_occ):
    model = occrt.load(tiny_occ)
    full = model.generate("the dog ran", max_new_tokens=30)
    pieces = list(model.generate("the dog ran", max_new_tokens=30, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == full
    ids = model.tokenizer.encode("the dog ran")
    tokens = list(model.generate_ids(ids, max_new_tokens=30))
    assert full == model.tokenizer.decode(tokens)


def test_stop_strings_cut_the_text(tiny_occ):
    model = occrt.load(tiny_occ)
    full = model.generate("the dog ran", max_new_tokens=30)
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    cut = model.generate("the dog ran", max_new_tokens=30, stop=[stop])
    assert cut == full[:full.find(stop)]
    assert "".join(model.generate("the dog ran", max_new_tokens=30, stop=[stop], stream=True)) == cut


class _FakeTokenizer:
    """Each token id is one character; enough to test stop-string buffering."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_string_split_across_tokens():
    text = "hello STOP world"
    pieces = list(stream_text(_FakeTokenizer(), iter(map(ord, text)), stop=["STOP"]))
    assert "".join(pieces) == "hello "
    assert list(stream_text(_FakeTokenizer(), iter(map(ord, "abc")), stop=["zz"])) and \
        "".join(stream_text(_FakeTokenizer(), iter(map(ord, "abc")), stop=["zz"])) == "abc"


def test_eos_stops_generation(tiny_occ):
    model = occrt.load(tiny_occ)
    ids = model.tokenizer.encode("the cat")
    first = next(iter(model.generate_ids(ids, max_new_tokens=1)))
    model.tokenizer.eos_token_ids = (first,)  # make the first greedy token the end of sequence
    assert list(model.generate_ids(ids, max_new_tokens=10)) == []


def test_chat_template_is_applied(tiny_occ):
    model = occrt.load(tiny_occ)
    assert model.tokenizer.chat_template == CHAT_TEMPLATE
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi</s><|assistant|>"
    reply = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=5)
    assert isinstance(reply, str)


def test_bos_comes_from_the_tokenizer(tiny_occ):
    model = occrt.load(tiny_occ)
    ids = model.tokenizer.encode("the cat")
    assert ids[0] == 1 and ids.count(1) == 1
    assert model.tokenizer.encode("the cat", add_special_tokens=False)[0] != 1


def test_context_overflow_is_a_clear_error(tiny_occ):
    model = occrt.load(tiny_occ)
    with pytest.raises(ValueError, match="context"):
        list(model.generate_ids([5] * 300, max_new_tokens=4))
