"""GGUF files (llama.cpp): read with the `gguf` package, every tensor dequantized to float32 one at a time.

The tokenizer is rebuilt as a `tokenizer.json` by transformers' own GGUF tokenizer conversion, so text encodes to the
same ids as `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from occrt.converters.architectures import config_from_gguf, gguf_mapper
from occrt.converters.source import Source, SourceTensor, TokenizerInfo, file_record, release_pages
from occrt.errors import ConversionError


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # gguf raises several types for odd fields; such fields are not ones we need
        return None


class GGUFSource(Source):
    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the gguf package raises ValueError, struct.error, ... for bad files
            raise ConversionError(f"{path}: not a readable GGUF file ({e})") from None
        self._gguf = gguf
        skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.scores"}
        self.fields = {k: _field_value(f) for k, f in self.reader.fields.items() if k not in skip}
        self._tensors = {t.name: t for t in self.reader.tensors}
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in self.reader.tensors}
        config = config_from_gguf(self.fields, shapes)
        if "rope_freqs.weight" in self._tensors:
            factors = self._dequantize(self._tensors["rope_freqs.weight"]).reshape(-1)
            config.rope.update(type="freq_factors", factors=[float(x) for x in factors])
        self._mapper = gguf_mapper(config)  # llama.cpp's tensors -> occrt's (names, q/k row order, fused ones)
        tokenizer = self._tokenizer()
        # the vocabulary's fields are tens of thousands of small arrays (~0.15 GB for a 49K vocabulary); the
        # tokenizer above was their last reader
        for key in skip:
            self.reader.fields.pop(key, None)
        provenance = {"source_format": "gguf", "source_name": os.path.basename(path),
                      "source_files": [file_record(path)]}
        super().__init__(config=config, tokenizer=tokenizer, provenance=provenance)

    def _dequantize(self, t) -> np.ndarray:
        shape = tuple(int(d) for d in reversed(t.shape))
        try:
            a = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConversionError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize") from None
        return np.asarray(a, dtype=np.float32).reshape(shape)

    def _tokenizer(self) -> TokenizerInfo:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(self.path)),
                                                gguf_file=os.path.basename(self.path))
            data = tok.backend_tokenizer.to_str().encode()
        except Exception as e:  # transformers raises many types here; the user needs the cause either way
            raise ConversionError(f"{self.path}: the tokenizer could not be rebuilt from the GGUF metadata: {e}") \
                from None
        f = self.fields
        eos = f.get("tokenizer.ggml.eos_token_id")
        eot = f.get("tokenizer.ggml.eot_token_id")
        eos_ids = [int(e) for e in (eos, eot) if e is not None]
        return TokenizerInfo(tokenizer_json=data, bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
                             eos_token_ids=sorted(set(eos_ids), key=eos_ids.index),
                             add_bos_token=bool(f.get("tokenizer.ggml.add_bos_token", False)),
                             chat_template=f.get("tokenizer.chat_template"))

    def tensor_names(self) -> list[str]:
        return self._mapper.names(self._tensors)

    def tensors(self) -> Iterator[SourceTensor]:
        for t in self.reader.tensors:
            if self._mapper.rule(t.name) is None:
                continue
            kind = t.tensor_type.name
            data = self._dequantize(t)
            dtype = {"F32": "f32", "F16": "f16", "BF16": "bf16"}.get(kind, "quantized")
            if dtype == "f16":
                data = data.astype(np.float16)
            elif dtype == "bf16":
                from occrt.format.constants import f32_to_bf16_bits

                data = f32_to_bf16_bits(data)  # exact: the values came from bf16
            yield from self._mapper.apply(SourceTensor(t.name, data, dtype))
            # the reader maps the whole file: hand this tensor's pages back (converters/source.py release_pages)
            release_pages(getattr(self.reader.data, "_mmap", None), int(t.data_offset),
                          int(t.data_offset) + int(t.n_bytes))
