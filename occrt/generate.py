"""Sampling and the generation loop: prefill the prompt, then decode one token at a time.

    prefill(prompt)            -> logits of the last prompt position
    repeat: sample(logits)     -> token; stop on EOS, a stop string, or max_new_tokens
            decode_one(token)  -> logits
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from occrt.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature  # (vocab,)
        if 0 < p.top_k < z.shape[0]:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        z -= z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if p.top_p < 1:
            # nucleus: the smallest set of most likely tokens whose mass reaches top_p
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
            filtered = np.zeros_like(probs)
            filtered[keep] = probs[keep]
            probs = filtered / filtered.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))


def generate_tokens(model, prompt_ids: Sequence[int], *, max_new_tokens: int, sampling: SamplingParams,
                    stop_token_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield new token ids. The stop token itself is not yielded. `model` has `new_cache` and `forward`."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    if max_new_tokens <= 0:
        return
    cache = model.new_cache(len(prompt_ids) + max_new_tokens)
    if len(prompt_ids) >= cache.capacity:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context of {cache.capacity}")
    sampler = Sampler(sampling)
    stops = set(stop_token_ids)
    logits = model.forward(np.asarray(prompt_ids), cache)
    for _ in range(max_new_tokens):
        token = sampler(logits)
        if token in stops:
            return
        yield token
        if cache.length >= cache.capacity:
            return
        logits = model.forward(np.asarray([token]), cache)


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int], *, stop: Sequence[str] = ()) -> Iterator[str]:
    """Turn a token stream into text pieces; end at the first stop string (which is not emitted)."""
    decoder = StreamDecoder(tokenizer)
    stop = [s for s in stop if s]
    hold = max((len(s) for s in stop), default=1) - 1  # characters held back: a stop string may still be forming
    pending = ""
    for token in tokens:
        pending += decoder.push(token)
        if stop:
            cut = _first_stop(pending, stop)
            if cut is not None:
                if pending[:cut]:
                    yield pending[:cut]
                return
            if len(pending) > hold:
                yield pending[: len(pending) - hold]
                pending = pending[len(pending) - hold:]
        elif pending:
            yield pending
            pending = ""
    pending += decoder.flush()
    cut = _first_stop(pending, stop) if stop else None
    if cut is not None:
        pending = pending[:cut]
    if pending:
        yield pending


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
