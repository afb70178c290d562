"""The embedding API: Completion / CompletionStream counts and finish reasons, threads sharing a model, the README's
Python example run as written (on the tiny model), and that neither the server nor the export loads with `occrt`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest

import occrt
from occrt.completion import Completion, CompletionStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tiny_occ):
    m = occrt.load(tiny_occ)
    yield m
    m.close()


def test_complete_counts_tokens_and_matches_generate(model):
    done = model.complete("the cat", max_new_tokens=12)
    assert isinstance(done, Completion)
    assert done.text == model.generate("the cat", max_new_tokens=12)
    assert done.prompt_tokens == len(model.tokenizer.encode("the cat"))
    tokens = list(model.generate_ids(model.tokenizer.encode("the cat"), max_new_tokens=12))
    assert done.completion_tokens == len(tokens) == 12  # the tiny model has no reason to emit </s> early
    assert done.finish_reason == "length" and done.total_tokens == done.prompt_tokens + 12


def test_finish_reason_stop_for_end_token_and_stop_string(model, tiny_occ):
    full = model.complete("the dog ran", max_new_tokens=20)
    stop = full.text[4:7]
    cut = model.complete("the dog ran", max_new_tokens=20, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert 0 < cut.completion_tokens < 20  # the tokens spent up to the stop string are counted

    other = occrt.load(tiny_occ)
    first = next(iter(other.generate_ids(other.tokenizer.encode("the dog ran"), max_new_tokens=1)))
    other.tokenizer.eos_token_ids = (first,)  # the first greedy token now ends the sequence
    ended = other.complete("the dog ran", max_new_tokens=20)
    assert (ended.text, ended.completion_tokens, ended.finish_reason) == ("", 0, "stop")


def test_finish_reason_length_when_the_context_fills(model):
    ids = [5] * (model.context_length - 3)
    done = model.complete(ids, max_new_tokens=50)
    assert done.finish_reason == "length" and done.completion_tokens < 50
    with pytest.raises(ValueError, match="context"):
        model.complete([5] * model.context_length)
    with pytest.raises(ValueError, match="empty"):
        model.complete([])
    with pytest.raises(ValueError, match="top_p"):
        model.complete("the cat", top_p=0, stream=True)  # bad options fail at the call, not at the first piece


def test_stream_counts_are_live_and_final(model):
    stream = model.complete("the dog ran", max_new_tokens=10, stream=True)
    assert isinstance(stream, CompletionStream)
    assert stream.prompt_tokens == len(model.tokenizer.encode("the dog ran")) and stream.finish_reason is None
    pieces = list(stream)
    assert stream.finish_reason == "length" and stream.completion_tokens == 10
    assert stream.completion == Completion("".join(pieces), stream.prompt_tokens, 10, "length")

    with model.complete("the dog ran", max_new_tokens=10, stream=True) as early:
        next(early)
    assert early.finish_reason is None and list(early) == []
    with pytest.raises(RuntimeError, match="closed"):
        early.completion


def test_threads_share_a_model_and_seeds_hold(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=40)
    expected = {seed: model.generate("the cat", seed=seed, **kw) for seed in range(4)}
    got: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def run(seed: int, copy: int) -> None:
        try:
            if copy:  # a chat stream beside it, read piece by piece, interleaves with the others' steps
                assert "".join(model.chat([{"role": "user", "content": "hi"}], stream=True, seed=seed, **kw))
            got[seed, copy] = model.generate("the cat", seed=seed, **kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s, c)) for s in range(4) for c in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert got == {(s, c): expected[s] for s in range(4) for c in range(2)}


def test_two_streams_interleave_in_one_thread(model):
    """The lock is held per forward step, not per request: a half-read stream blocks nothing."""
    a = model.generate("the cat", max_new_tokens=8, stream=True)
    b = model.generate("the dog", max_new_tokens=8, stream=True)
    pieces_a, pieces_b = [], []
    for x, y in zip(a, b):
        pieces_a.append(x)
        pieces_b.append(y)
    pieces_a += list(a)
    pieces_b += list(b)
    assert "".join(pieces_a) == model.generate("the cat", max_new_tokens=8)
    assert "".join(pieces_b) == model.generate("the dog", max_new_tokens=8)


def readme_python_example() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tiny_occ, tmp_path):
    code = readme_python_example()
    assert '"smol.occ"' in code
    script = tmp_path / "example.py"
    script.write_text(code.replace('"smol.occ"', repr(tiny_occ)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\d+ tokens, (stop|length)$", done.stdout, re.M), done.stdout


def test_occrt_imports_neither_server_nor_export(tiny_occ):
    code = (
        "import sys, occrt\n"
        f"m = occrt.load({tiny_occ!r})\n"
        "m.complete('the cat', max_new_tokens=2)\n"
        "bad = ('starlette', 'uvicorn', 'openai', 'torch', 'transformers', 'safetensors', 'occrt.server', "
        "'occrt.export', 'occrt.openai_protocol')\n"
        "print(sorted(n for n in sys.modules if n in bad or n.split('.')[0] in bad[:6]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
