"""How a checkpoint's tensors become occrt's, and back: one `TensorRule` per checkpoint tensor.

occrt stores every family under one set of names (Hugging Face's Llama names plus a few: format_spec/occ.md 4.2),
with linear weights as (out_features, in_features). A checkpoint tensor maps to one or more occrt tensors:

    occrt parts = split_rows( unpermute( transpose?(checkpoint value) ) + offset )

- `transpose`: GPT-2's Conv1D stores (in, out);
- `permute_heads`: llama.cpp reorders the q/k rows of Llama GGUF files within each head (see `unpermute_qk`);
- `offset`: Gemma's norms hold w where the model multiplies by 1 + w (the .occ file stores the multiplier);
- the rows split into `parts` in order, each as many rows as occrt's table (`tensor_shapes`) gives it: fused
  q/k/v (Phi-3 `qkv_proj`, GPT-2 `c_attn`) and gate/up (Phi-3 `gate_up_proj`) come apart here.

`assemble` runs the same rule backwards (the exporter writes a family's own checkpoint with it; calibration builds
the family's transformers model with it). A family module lists its rules; nothing here knows a family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from occrt.converters.source import SourceTensor
from occrt.errors import ConversionError
from occrt.format.constants import bf16_bits_to_f32


@dataclass(frozen=True)
class TensorRule:
    source: str  # the checkpoint's tensor name
    parts: tuple[str, ...]  # occrt tensor names, stacked along the rows in this order
    transpose: bool = False  # the checkpoint stores the (in, out) transpose
    offset: float = 0.0  # occrt value = checkpoint value + offset
    permute_heads: int = 0  # > 0: undo llama.cpp's q/k row order for this many heads


def same_names(names: Iterable[str]) -> list[TensorRule]:
    """Rules for checkpoints that already use occrt's names (Llama, Mistral, Qwen2/3 Hugging Face checkpoints)."""
    return [TensorRule(n, (n,)) for n in names]


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rope rotates adjacent pairs; HF's rotates halves).

    llama.cpp stores rows of each head as (half, pair) interleaved: row 2i and 2i+1 of a head are HF rows i and
    i + d/2. This puts them back: (H, d/2, 2, ...) -> (H, 2, d/2, ...).
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """`unpermute_qk`'s inverse."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class TensorMapper:
    """Checkpoint tensors -> occrt tensors under a list of rules. `ignored(name)` says which checkpoint tensors carry
    nothing the model needs (buffers such as rotary inv_freq or GPT-2's causal-mask `attn.bias`)."""

    def __init__(self, rules: list[TensorRule], shapes: dict[str, tuple[int, ...]], *, family: str,
                 ignored: Callable[[str], bool] = lambda name: False,
                 normalize: Callable[[str], str] = lambda name: name):
        self.rules = {r.source: r for r in rules}
        self.shapes = shapes
        self.family = family
        self.ignored = ignored
        self.normalize = normalize  # a checkpoint's spelling -> the rules' (e.g. GPT-2 saved without `transformer.`)

    def names(self, source_names: Iterable[str]) -> list[str]:
        out = []
        for name in source_names:
            rule = self.rule(name)
            if rule is not None:
                out.extend(rule.parts)
        return out

    def rule(self, name: str) -> TensorRule | None:
        name = self.normalize(name)
        rule = self.rules.get(name)
        if rule is None and not self.ignored(name):
            raise ConversionError(f"unexpected tensor {name!r} for a {self.family} model")
        return rule

    def apply(self, t: SourceTensor) -> Iterator[SourceTensor]:
        """The occrt tensors held in checkpoint tensor `t` (none for ignored ones)."""
        rule = self.rule(t.name)
        if rule is None:
            return
        data, dtype = t.data, t.dtype
        if rule.offset:
            data = (bf16_bits_to_f32(data) if dtype == "bf16" else data.astype(np.float32)) + np.float32(rule.offset)
            dtype = "f32" if dtype != "quantized" else dtype
        for part, piece in zip(rule.parts, self.split(rule, data, t.name)):
            yield SourceTensor(part, piece, dtype)

    def split(self, rule: TensorRule, data: np.ndarray, name: str = "") -> list[np.ndarray]:
        """The rule's layout changes alone (transpose, row order, split; no offset): also maps gradients."""
        if rule.transpose:
            data = data.T
        if rule.permute_heads:
            data = unpermute_qk(data, rule.permute_heads)
        if len(rule.parts) == 1:
            return [np.ascontiguousarray(data)]
        rows = [self.shapes[p][0] if p in self.shapes else None for p in rule.parts]
        if None in rows or sum(rows) != data.shape[0]:
            raise ConversionError(f"tensor {name or rule.source!r} has {data.shape[0]} rows, its parts "
                                  f"{list(rule.parts)} need {rows}")
        bounds = np.cumsum([0] + rows)
        return [np.ascontiguousarray(data[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def assemble(rule: TensorRule, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """The checkpoint tensor of `rule` from occrt's tensors (`get(name)` -> float array): the rule run backwards."""
    parts = [get(p) for p in rule.parts]
    data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if rule.permute_heads:
        data = permute_qk(data, rule.permute_heads)
    if rule.transpose:
        data = data.T
    if rule.offset:
        data = data.astype(np.float32) - np.float32(rule.offset)
    return data


def assembled_shape(rule: TensorRule, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    first = shapes[rule.parts[0]]
    rows = sum(shapes[p][0] for p in rule.parts)
    shape = (rows, *first[1:])
    return tuple(reversed(shape)) if rule.transpose else shape
