"""Perplexity on a text: the measure that decides between codecs.

The text is tokenized once (no special tokens), cut into consecutive windows of `ctx` tokens, and each window is
scored on its own with the beginning-of-sequence token prepended: every text token in a window is predicted, the
first one from BOS alone. perplexity = exp(total negative log-likelihood / tokens scored). The same windows are used
for every model, so figures compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # total negative log-likelihood, nats
    tokens: int  # tokens scored
    windows: int
    ctx: int


def windows(ids: Sequence[int], *, ctx: int, max_tokens: int | None = None) -> Iterator[list[int]]:
    n = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    for start in range(0, n, ctx):
        yield list(ids[start:min(start + ctx, n)])


def window_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target] over rows; logits (T, vocab), computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float((log_norm - z[np.arange(len(targets)), targets]).sum())


def perplexity(score_window: Callable[[list[int]], np.ndarray], ids: Sequence[int], *, bos: int | None, ctx: int = 512,
               max_tokens: int | None = None, progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """`score_window(tokens)` returns logits (len(tokens), vocab) for one sequence run from an empty context."""
    if ctx < 1:
        raise ValueError(f"ctx must be >= 1, got {ctx}")
    chunks = list(windows(ids, ctx=ctx, max_tokens=max_tokens))
    if not chunks:
        raise ValueError("the text has no tokens to score")
    nll, scored = 0.0, 0
    for i, chunk in enumerate(chunks):
        inputs = ([bos] if bos is not None else []) + chunk
        logits = score_window(inputs)  # (len(inputs), vocab)
        if bos is not None:
            nll += window_nll(logits[:-1], np.asarray(chunk))
            scored += len(chunk)
        else:
            nll += window_nll(logits[:-1], np.asarray(chunk[1:]))
            scored += len(chunk) - 1
        if progress:
            progress(i + 1, len(chunks))
    return Perplexity(perplexity=math.exp(nll / scored), nll=nll, tokens=scored, windows=len(chunks), ctx=ctx)


def occ_scorer(model) -> Callable[[list[int]], np.ndarray]:
    """Score windows with an occrt `Model` (fresh KV cache per window)."""

    def score(tokens: list[int]) -> np.ndarray:
        cache = model.new_cache(len(tokens))
        return model.forward(np.asarray(tokens), cache, all_logits=True)

    return score


def transformers_scorer(src: str):
    """Score windows with transformers in float32 (the reference for a HF directory or GGUF file).

    Returns (scorer, encode, bos): `encode(text)` gives token ids without special tokens, the same way
    transformers' tokenizer does. Imports torch and transformers: used for references, never by the runtime.
    """
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(src):
        kw, where = {}, src
    else:
        kw, where = {"gguf_file": os.path.basename(src)}, os.path.dirname(os.path.abspath(src))
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()

    def score(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0].float().numpy()

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    return score, encode, tok.bos_token_id
