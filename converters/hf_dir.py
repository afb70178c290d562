"""Hugging Face checkpoint directories: config.json, tokenizer files, one or more safetensors shards.

Tensors are read one at a time from the memory-mapped shards (converters/safetensors_file.py), so conversion never
holds the whole model.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

from occrt.converters.architectures import config_from_hf, hf_mapper
from occrt.converters.safetensors_file import SafetensorsFile
from occrt.converters.source import Source, SourceTensor, TokenizerInfo, file_record
from occrt.errors import ConversionError


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


class HFDirectorySource(Source):
    def __init__(self, root: str):
        self.root = root
        cfg_path = os.path.join(root, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConversionError(f"{root}: no config.json (is this a Hugging Face checkpoint directory?)")
        self.hf_config = _read_json(cfg_path)
        config = config_from_hf(self.hf_config)
        self._mapper = hf_mapper(config)  # the family's tensors -> occrt's (split fused ones, transpose Conv1D)
        self.shards = self._find_shards()
        self._index = self._index_tensors()
        tokenizer = self._tokenizer(config)
        files = [cfg_path] + self.shards + [p for p in (os.path.join(root, n) for n in (
            "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"))
            if os.path.isfile(p)]
        provenance = {"source_format": "huggingface", "source_name": os.path.basename(os.path.abspath(root)),
                      "source_files": [file_record(p, root) for p in files]}
        super().__init__(config=config, tokenizer=tokenizer, generation_defaults=self._generation_defaults(),
                         provenance=provenance)

    def _find_shards(self) -> list[str]:
        index_path = os.path.join(self.root, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map") or {}
            shards = sorted({os.path.join(self.root, f) for f in weight_map.values()})
            missing = [s for s in shards if not os.path.isfile(s)]
            if missing:
                raise ConversionError(f"shards named in {index_path} are missing: {missing}")
            return shards
        shards = sorted(glob.glob(os.path.join(self.root, "*.safetensors")))
        if not shards:
            found = sorted(os.listdir(self.root))
            hint = " (only PyTorch .bin weights found: convert them to safetensors first)" if any(
                f.endswith(".bin") for f in found) else ""
            raise ConversionError(f"{self.root}: no *.safetensors files{hint}")
        return shards

    def _index_tensors(self) -> dict[str, tuple[str, str]]:
        """name -> (shard, occrt dtype); every shard's header is validated here, before a tensor is read."""
        index: dict[str, tuple[str, str]] = {}
        for shard in self.shards:
            with SafetensorsFile(shard) as f:
                for name, entry in f.entries.items():
                    if name in index:
                        raise ConversionError(f"tensor {name!r} appears in two shards: {index[name][0]} and {shard}")
                    index[name] = (shard, entry.dtype)
        return index

    def _tokenizer(self, config) -> TokenizerInfo:
        tok_json = os.path.join(self.root, "tokenizer.json")
        tok_cfg_path = os.path.join(self.root, "tokenizer_config.json")
        tok_cfg = _read_json(tok_cfg_path) if os.path.isfile(tok_cfg_path) else {}
        if os.path.isfile(tok_json):
            with open(tok_json, "rb") as f:
                data = f.read()
        else:
            data = self._tokenizer_json_via_transformers()
        template = tok_cfg.get("chat_template")
        jinja = os.path.join(self.root, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        eos = self.hf_config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        gen_path = os.path.join(self.root, "generation_config.json")
        if os.path.isfile(gen_path):
            g = _read_json(gen_path).get("eos_token_id")
            for e in ([g] if isinstance(g, int) else list(g or [])):
                if e not in eos_ids:
                    eos_ids.append(e)
        return TokenizerInfo(tokenizer_json=data, bos_token_id=self.hf_config.get("bos_token_id"),
                             eos_token_ids=eos_ids, add_bos_token=bool(tok_cfg.get("add_bos_token", False)),
                             chat_template=template)

    def _tokenizer_json_via_transformers(self) -> bytes:
        slow_files = ("tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt")
        if not any(os.path.isfile(os.path.join(self.root, f)) for f in slow_files):
            raise ConversionError(f"{self.root}: no tokenizer: tokenizer.json is missing (nor is there a "
                                  f"{' / '.join(slow_files)} for transformers to convert); copy the model's "
                                  f"tokenizer files into this folder")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.root)
            return tok.backend_tokenizer.to_str().encode()
        except Exception as e:  # transformers raises many types here; the user needs the cause either way
            raise ConversionError(f"{self.root}: no tokenizer.json, and transformers could not build one: {e}") \
                from None

    def _generation_defaults(self) -> dict[str, Any]:
        path = os.path.join(self.root, "generation_config.json")
        if not os.path.isfile(path):
            return {}
        g = _read_json(path)
        out: dict[str, Any] = {}
        if g.get("do_sample"):
            for k in ("temperature", "top_p", "top_k"):
                if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool):
                    out[k] = g[k]
        return out

    def tensor_names(self) -> list[str]:
        return self._mapper.names(self._index)

    def tensors(self) -> Iterator[SourceTensor]:
        """One tensor at a time, read-only views of the mapped shard (bf16 as its bits); each tensor's pages are
        handed back once the consumer asks for the next, so the resident set holds about one tensor of the shards."""
        for shard in self.shards:
            with SafetensorsFile(shard) as f:
                for name, entry in f.entries.items():
                    yield from self._mapper.apply(SourceTensor(name, f.tensor(name), entry.dtype))
                    f.release(name)
