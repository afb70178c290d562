"""Writing tiny GGUF files in llama.cpp's layout from a tiny HF checkpoint directory, with gguf.GGUFWriter: the parts
every family shares (the common hyperparameters, the tokenizer fields, the float32 tensors, finishing the file).
The tests say what is particular to a family (its other keys, its tensor names, its weight transforms)."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np


def new_writer(path: str, arch: str, *, context: int, embedding: int, blocks: int, feed_forward: int, heads: int,
               heads_kv: int | None = None):
    """A GGUFWriter for `arch` with the hyperparameters every architecture records."""
    import gguf

    g = gguf.GGUFWriter(path, arch)
    g.add_context_length(context)
    g.add_embedding_length(embedding)
    g.add_block_count(blocks)
    g.add_feed_forward_length(feed_forward)
    g.add_head_count(heads)
    if heads_kv is not None:
        g.add_head_count_kv(heads_kv)
    return g


def add_tokenizer(g, model: str, tokens: list[str], types: list[int], *, bos: int, eos: int, pad: int,
                  pre: str | None = None, scores: list[float] | None = None, merges: list[str] | None = None,
                  unk: int | None = None, add_bos: bool | None = None) -> None:
    """The tokenizer fields; the optional ones are written only when given."""
    for add, value in ((g.add_tokenizer_model, model), (g.add_tokenizer_pre, pre), (g.add_token_list, tokens),
                       (g.add_token_scores, scores), (g.add_token_types, types), (g.add_token_merges, merges),
                       (g.add_bos_token_id, bos), (g.add_eos_token_id, eos), (g.add_unk_token_id, unk),
                       (g.add_pad_token_id, pad), (g.add_add_bos_token, add_bos)):
        if value is not None:
            add(value)


def write_tensors_and_close(g, src: str, rename: Callable[[str], str],
                            transform: Callable[[str, np.ndarray], np.ndarray] = lambda name, a: a) -> list[str]:
    """`src`'s model.safetensors as float32 tensors (`transform(hf_name, array)` applied, named `rename(hf_name)`),
    then the file written and closed; returns the tensor names written."""
    from safetensors.numpy import load_file

    names = []
    for name, a in load_file(os.path.join(src, "model.safetensors")).items():
        names.append(rename(name))
        g.add_tensor(names[-1], transform(name, a.astype(np.float32)))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return names
