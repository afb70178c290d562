"""Convert a checkpoint (HF directory or GGUF file) into one `.occ` file.

    source = open_source(path)                 # config, tokenizer, template, tensors under HF names
    with OccWriter(out) as w:                  # temporary file until finish(): a failure leaves nothing
        metadata -> w.set_metadata / w.add_blob("tokenizer.json")
        for each tensor (streamed):  check name and shape -> encode -> w.add_tensor
        w.finish()                             # header + data, fsync, rename onto `out`
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import occrt
from occrt.converters.source import Source, SourceTensor
from occrt.codecs.base import Encoded
from occrt.codecs.raw import RawCodec
from occrt.errors import ConversionError
from occrt.format.writer import OccWriter
from occrt.model.loader import llama_tensor_shapes

# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "auto"  # "auto" keeps the source dtype (dequantized GGUF blocks become f32); or f32/f16/bf16
    overwrite: bool = False


def open_source(path: str) -> Source:
    if os.path.isdir(path):
        from occrt.converters.hf_dir import HFDirectorySource

        return HFDirectorySource(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from occrt.converters.gguf_file import GGUFSource

            return GGUFSource(path)
        raise ConversionError(f"{path}: not a GGUF file (magic {magic!r}) and not a checkpoint directory")
    raise ConversionError(f"{path}: no such file or directory")


def encode_raw(t: SourceTensor, options: ConvertOptions) -> Encoded:
    dtype = options.dtype
    if dtype == "auto":
        dtype = "f32" if t.dtype == "quantized" else t.dtype
    if t.dtype == "bf16" and dtype != "bf16":
        from occrt.format.constants import bf16_bits_to_f32

        return RawCodec.encode(bf16_bits_to_f32(t.data), dtype=dtype)
    return RawCodec.encode(t.data, dtype=dtype)


def convert(src: str, out: str, options: ConvertOptions = ConvertOptions(), *,
            encode: Callable[[SourceTensor, ConvertOptions], Encoded] = encode_raw,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert `src` to `out`. Returns a summary (tensor count, bytes, parameters)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    source = open_source(src)
    try:
        return _write(source, out, options, encode, log)
    finally:
        source.close()


def _write(source: Source, out: str, options: ConvertOptions, encode, log) -> dict[str, Any]:
    cfg = source.config
    expected = llama_tensor_shapes(cfg)
    seen: set[str] = set()
    n_params = 0
    with OccWriter(out, overwrite=options.overwrite) as w:
        w.set_metadata("general.architecture", cfg.architecture)
        w.set_metadata("model.config", cfg.to_json())
        tok = source.tokenizer
        w.add_blob("tokenizer.json", tok.tokenizer_json)
        w.set_metadata("tokenizer.format", "huggingface-tokenizers-json")
        w.set_metadata("tokenizer.bos_token_id", tok.bos_token_id)
        w.set_metadata("tokenizer.eos_token_ids", list(tok.eos_token_ids))
        w.set_metadata("tokenizer.add_bos_token", tok.add_bos_token)
        w.set_metadata("chat.template", tok.chat_template)
        w.set_metadata("generation.defaults", source.generation_defaults)
        w.set_metadata("provenance", {**source.provenance, "converter": f"occrt {occrt.__version__}"})
        for t in source.tensors():
            if t.name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and t.name == "lm_head.weight"):
                continue
            if t.name not in expected:
                raise ConversionError(f"unexpected tensor {t.name!r} for a {cfg.architecture} model")
            if tuple(t.data.shape) != expected[t.name]:
                raise ConversionError(f"tensor {t.name!r} has shape {list(t.data.shape)}, "
                                      f"the config implies {list(expected[t.name])}")
            if t.dtype != "bf16" and not np.isfinite(t.data).all():
                raise ConversionError(f"tensor {t.name!r} holds NaN or infinite values")
            w.add_tensor(t.name, encode(t, options))
            seen.add(t.name)
            n_params += t.data.size
        missing = sorted(set(expected) - seen)
        if missing:
            raise ConversionError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
        w.finish()
    size = os.path.getsize(out)
    log(f"wrote {out}: {len(seen)} tensors, {n_params:,} parameters, {size:,} bytes")
    return {"tensors": len(seen), "parameters": n_params, "bytes": size}
