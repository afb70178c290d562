"""`occrt export MODEL.occ --to hf DIR`: the decoded weights as a Hugging Face checkpoint, for engines that serve a
model across machines (vLLM, TGI, SGLang, transformers itself) when one machine is not enough.

    DIR/config.json                 the family's own config (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
                                    Qwen3ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel, ...: converters/arch_*.py);
                                    occrt's rope dict mapped back to rope_theta + rope_scaling
    DIR/generation_config.json      the file's generation defaults, bos / eos ids
    DIR/tokenizer.json              the file's tokenizer, byte for byte
    DIR/tokenizer_config.json       bos / eos tokens, add_bos_token, the chat template
    DIR/special_tokens_map.json
    DIR/model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger
                                    than the shard size (HF's layout)

Every tensor is decoded with `OccFile.tensor` (so every codec exports) and written one at a time, so memory stays
at about one tensor whatever the model's size. Tensors go back to the family's own names and layout by the rules the
converter read them with (converters/tensor_rules.py, run backwards): Phi-3's q/k/v and gate/up are fused again,
GPT-2's weights transposed back to Conv1D. The safetensors files are written here, not by the safetensors
package (which wants every tensor in memory at once): the format is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}}, padded with spaces to a multiple of 8, then the row-major little-endian
data. The output is deterministic (same input, same bytes) and appears whole or not at all: it is written to a
temporary folder beside DIR and renamed.

Weights dtype: "auto" keeps the stored dtype when every tensor is stored raw in one dtype (the export is then exact),
and otherwise writes float32, which holds a lossy codec's decoded values exactly: the exported model computes what
occrt computes. f16 / bf16 round to nearest (even).

This module is imported only by `occrt export`; the runtime never imports it.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from occrt.errors import OccError
from occrt.format.constants import f32_to_bf16_bits
from occrt.format.reader import OccFile
from occrt.model.config import ModelConfig

RAW_CODEC_ID = 0  # occrt/codecs/raw.py: the stored values are the tensor's values
DTYPES = ("auto", "f32", "f16", "bf16")
SAFETENSORS_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
BYTES_PER_ELEMENT = {"f32": 4, "f16": 2, "bf16": 2}
SAFETENSORS_ALIGNMENT = 8
CHUNK_ELEMENTS = 1 << 22  # values converted and written at a time (16 MiB of float32)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size ("5GB")
# What an export writes: a folder holding only these may be replaced with --force.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "auto"  # auto | f32 | f16 | bf16
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False


def export_hf(src: str, out_dir: str, options: ExportOptions = ExportOptions(), *,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write `src` (a .occ file) as a Hugging Face checkpoint folder `out_dir`. Returns a summary."""
    from occrt.api import check_model
    from occrt.converters.architectures import for_architecture
    from occrt.converters.tensor_rules import assembled_shape
    from occrt.model.loader import tensor_shapes

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if options.dtype not in DTYPES:
        raise OccError(f"dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    if options.max_shard_bytes < 1:
        raise OccError("the shard size must be at least one byte")
    _check_target(out_dir, options.overwrite)
    with OccFile.open(src) as occ:
        cfg, tokenizer, defaults = check_model(occ)
        shapes = tensor_shapes(cfg)
        rules = for_architecture(cfg.architecture).hf_rules(cfg)  # the family's tensors, in its state-dict order
        hf_shapes = {r.source: assembled_shape(r, shapes) for r in rules}
        dtype = options.dtype if options.dtype != "auto" else _auto_dtype(occ, shapes)
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", suffix=".tmp", dir=parent)
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private; the export gets the usual permissions
            files = _write_weights(occ, rules, hf_shapes, shapes, dtype, tmp, options.max_shard_bytes)
            _write_json(tmp, "config.json", hf_config(cfg, tokenizer.bos_token_id, tokenizer.eos_token_ids, dtype))
            _write_json(tmp, "generation_config.json",
                        generation_config(defaults, tokenizer.bos_token_id, tokenizer.eos_token_ids))
            with open(os.path.join(tmp, "tokenizer.json"), "wb") as f:
                f.write(occ.blob("tokenizer.json"))
            tok_config, special = tokenizer_config(tokenizer, cfg.max_position_embeddings)
            _write_json(tmp, "tokenizer_config.json", tok_config)
            _write_json(tmp, "special_tokens_map.json", special)
            _replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    n_bytes = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    log(f"wrote {out_dir}: {len(rules)} tensors in {len(files)} safetensors file(s), {n_bytes:,} bytes, {dtype}")
    return {"tensors": len(rules), "files": files, "bytes": n_bytes, "dtype": dtype}


# -- config ---------------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, bos_token_id: int | None, eos_token_ids, dtype: str) -> dict[str, Any]:
    """`config.json` of the family's own Hugging Face class with the same forward pass."""
    from occrt.converters.architectures import for_architecture

    eos = list(eos_token_ids)
    return {**for_architecture(cfg.architecture).hf_config(cfg), "bos_token_id": bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "torch_dtype": TORCH_DTYPE[dtype],
            "use_cache": True}


def rope_scaling_to_hf(rope: dict[str, Any], max_position_embeddings: int) -> dict[str, Any] | None:
    """occrt's rope dict -> HF `rope_scaling` (converters/arch_llama.py, beside its inverse)."""
    from occrt.converters.arch_llama import rope_scaling_to_hf as to_hf

    return to_hf(rope, max_position_embeddings)


def generation_config(defaults: dict[str, Any], bos_token_id: int | None, eos_token_ids) -> dict[str, Any]:
    eos = list(eos_token_ids)
    out: dict[str, Any] = {"bos_token_id": bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
    temperature = defaults.get("temperature")
    if temperature is not None and temperature > 0:
        # sampling settings only mean something with do_sample; transformers warns about them otherwise
        out["do_sample"] = True
        out["temperature"] = temperature
        for key in ("top_p", "top_k"):
            if key in defaults:
                out[key] = defaults[key]
    elif temperature is not None:
        out["do_sample"] = False
    if "max_new_tokens" in defaults:
        out["max_new_tokens"] = defaults["max_new_tokens"]
    return out


def tokenizer_config(tokenizer, max_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json`: the special tokens by text, as HF names them."""
    special: dict[str, Any] = {}
    if tokenizer.bos_token_id is not None:
        special["bos_token"] = tokenizer.token_text(tokenizer.bos_token_id)
    if tokenizer.eos_token_ids:
        special["eos_token"] = tokenizer.token_text(tokenizer.eos_token_ids[0])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": tokenizer.add_bos_token,
              "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    return config, special


# -- weights --------------------------------------------------------------------------------------------------------
def _auto_dtype(occ: OccFile, shapes: dict[str, tuple[int, ...]]) -> str:
    stored = {(occ.tensors[n].codec, occ.tensors[n].dtype) for n in shapes}
    if len(stored) == 1:
        codec, dtype = stored.pop()
        if codec == RAW_CODEC_ID and dtype in SAFETENSORS_DTYPE:
            return dtype
    return "f32"


def _shards(shapes: dict[str, tuple[int, ...]], dtype: str, max_bytes: int) -> list[list[str]]:
    """Tensors in order, cut into consecutive groups of at most max_bytes (a larger tensor gets a shard alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * BYTES_PER_ELEMENT[dtype]
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _write_weights(occ: OccFile, rules, hf_shapes: dict[str, tuple[int, ...]],
                   shapes: dict[str, tuple[int, ...]], dtype: str, folder: str, max_shard_bytes: int) -> list[str]:
    from occrt.converters.tensor_rules import assemble

    groups = _shards(hf_shapes, dtype, max_shard_bytes)
    if len(groups) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    by_name = {r.source: r for r in rules}

    def produce(hf_name: str) -> np.ndarray:
        return assemble(by_name[hf_name], lambda n: _decoded(occ, n, shapes[n]))

    def written(hf_name: str) -> None:
        for part in by_name[hf_name].parts:
            occ.release(occ.tensors[part])

    weight_map: dict[str, str] = {}
    total = 0
    for file_name, group in zip(names, groups):
        total += write_safetensors(os.path.join(folder, file_name), [(n, hf_shapes[n]) for n in group], dtype,
                                   produce, metadata={"format": "pt"}, written=written)
        weight_map.update({n: file_name for n in group})
    if len(groups) > 1:
        _write_json(folder, INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        names.append(INDEX_FILE)
    return names


def _decoded(occ: OccFile, name: str, shape: tuple[int, ...]) -> np.ndarray:
    w = occ.tensor(name)  # (shape) float32, or float16 for raw f16 storage
    if tuple(w.shape) != shape:
        raise OccError(f"tensor {name!r} decodes to shape {list(w.shape)}, expected {list(shape)}")
    return w


def _pieces(w: np.ndarray, dtype: str) -> Iterator[np.ndarray]:
    """`w` in `dtype` ('<f4', '<f2', or bf16 bit patterns '<u2'), row-major, in pieces of CHUNK_ELEMENTS: so a
    conversion needs temporaries of one piece, not of the whole (an 8B model's embedding is 2 GB in float32)."""
    flat = np.ascontiguousarray(w).reshape(-1)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        part = flat[start:start + CHUNK_ELEMENTS]
        if dtype == "bf16":
            yield f32_to_bf16_bits(np.asarray(part, dtype=np.float32))  # round to nearest even
        else:
            yield np.asarray(part, dtype="<f4" if dtype == "f32" else "<f2")


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]], dtype: str,
                      produce: Callable[[str], np.ndarray], *, metadata: dict[str, str] | None = None,
                      written: Callable[[str], None] | None = None) -> int:
    """Write a safetensors file whose tensors (name, shape) are all stored as `dtype`, asking `produce(name)` for
    each one's values (any float dtype; converted here) in turn and telling `written(name)` when they are on disk.
    Returns the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * BYTES_PER_ELEMENT[dtype]
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % SAFETENSORS_ALIGNMENT)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in tensors:
            w = produce(name)
            if tuple(w.shape) != tuple(shape):
                raise OccError(f"tensor {name!r} has shape {list(w.shape)}, the header says {list(shape)}")
            for piece in _pieces(w, dtype):
                f.write(piece.view(np.uint8).data)
            del w
            if written is not None:
                written(name)
        f.flush()
        os.fsync(f.fileno())
    return offset


# -- the output folder ----------------------------------------------------------------------------------------------
def _is_export_file(name: str) -> bool:
    return (name in META_FILES or name in (SINGLE_FILE, INDEX_FILE)
            or (name.startswith("model-") and name.endswith(".safetensors")))


def _check_target(out_dir: str, overwrite: bool) -> None:
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise OccError(f"{out_dir} exists and is not a folder")
    present = os.listdir(out_dir)
    if not present:
        return
    if not overwrite:
        raise OccError(f"{out_dir} exists and is not empty (use --force to replace an earlier export)")
    others = sorted(n for n in present if not _is_export_file(n))
    if others:
        raise OccError(f"{out_dir} holds files an export does not write (e.g. {others[0]!r}); "
                       f"not replacing it, even with --force")


def _replace(tmp: str, out_dir: str) -> None:
    """Move the finished folder into place; an earlier export (checked by _check_target) is removed after."""
    old = None
    if os.path.exists(out_dir):
        old = tmp + ".old"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(folder: str, name: str, doc: dict[str, Any]) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
