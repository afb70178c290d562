"""occrt eval: perplexity of a .occ file by occrt, and of the HF source by transformers, on the same windows."""
from __future__ import annotations

import math
import re

import numpy as np

from occrt.cli import main
from occrt.evaluate import perplexity, window_nll
from tests.conftest import WORDS


def test_window_nll_is_cross_entropy():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], np.float32)
    expected = -np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(-1))) + np.log(3)
    assert math.isclose(window_nll(logits, np.array([0, 2])), expected, rel_tol=1e-12)


def test_windows_cover_the_tokens_once():
    seen = []

    def score(tokens):
        seen.append(list(tokens))
        return np.zeros((len(tokens), 10), np.float32)

    r = perplexity(score, list(range(2, 9)), bos=1, ctx=3)
    assert seen == [[1, 2, 3, 4], [1, 5, 6, 7], [1, 8]]
    assert r.tokens == 7 and r.windows == 3 and math.isclose(r.perplexity, 10.0)


def test_eval_occ_matches_transformers_on_the_source(tiny_llama_dir, tiny_occ, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 12))
    figures = {}
    for model in (tiny_occ, tiny_llama_dir):
        assert main(["eval", model, "--text", str(text), "--ctx", "32", "--max-tokens", "150"]) == 0
        out = capsys.readouterr().out
        figures[model] = float(re.search(r"perplexity ([\d.]+)", out).group(1))
        assert "150 tokens in 5 windows of 32" in out
    assert math.isclose(figures[tiny_occ], figures[tiny_llama_dir], rel_tol=1e-4)
