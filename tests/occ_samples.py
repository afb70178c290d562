"""Small real `.occ` files for the hostile-input tests, and the tools to take them apart and put them back together
(with valid checksums, so a mutation reaches the checks behind the CRCs).

`sample_bytes()` holds raw tensors of every dtype, a tokenizer blob, metadata, and every example tensor of every codec
in the registry (`Codec.examples()`), so a codec added to the registry is in every sweep without editing this file.
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np

from occrt.codecs.base import Codec, Encoded
from occrt.codecs.raw import RawCodec
from occrt.codecs.registry import CODECS
from occrt.format import constants as C
from occrt.format.writer import canonical_json

TOKENIZER_JSON = b'{"version":"1.0","model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":[]}}'


def codec_examples(codec: Codec) -> list[Encoded]:
    """The codec's own examples; a codec that cannot give any fails here with a message saying what to add."""
    try:
        examples = list(codec.examples())
    except Exception as e:  # noqa: BLE001 - reported with the codec's name
        raise AssertionError(f"codec {codec.name!r} (id {codec.id}) gives no examples ({type(e).__name__}: {e}); "
                             f"override Codec.examples() so the fuzz tests cover it") from e
    assert examples, f"codec {codec.name!r} returned no examples"
    return examples


def all_examples() -> list[tuple[str, Encoded]]:
    """(name, encoded) for every example of every registered codec."""
    return [(f"{codec.name}.{i}", enc) for codec in CODECS.values() for i, enc in enumerate(codec_examples(codec))]


def sample_bytes(*, max_examples_per_codec: int | None = None, seed: int = 7) -> bytes:
    """A small valid `.occ` file (a few KB), built in memory with the real writer."""
    import os
    import tempfile

    from occrt.format.writer import OccWriter

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sample.occ")
        with OccWriter(path) as w:
            w.set_metadata("general.architecture", "llama")
            w.set_metadata("note", {"text": "héllo", "numbers": [1, -2, 2.5e-3], "flag": True, "none": None})
            w.add_blob("tokenizer.json", TOKENIZER_JSON)
            w.add_blob("empty", b"")
            w.add_tensor("w.f32", RawCodec.encode(rng.standard_normal((4, 6)).astype(np.float32)))
            w.add_tensor("w.bf16", RawCodec.encode(rng.standard_normal((9,)).astype(np.float32), dtype="bf16"))
            w.add_tensor("w.empty", RawCodec.encode(np.zeros((0, 4), np.float32), dtype="f16"))
            for codec in CODECS.values():
                examples = codec_examples(codec)[:max_examples_per_codec]
                for i, enc in enumerate(examples):
                    w.add_tensor(f"{codec.name}.{i}", enc)
            w.finish()
        with open(path, "rb") as f:
            return f.read()


# -- taking files apart -----------------------------------------------------------------------------------------------
def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header as JSON, data area) of a valid file."""
    _, _, _, _, n = struct.unpack_from(C.PRELUDE_FORMAT, data, 0)
    header = json.loads(data[C.PRELUDE_SIZE:C.PRELUDE_SIZE + n])
    return header, data[C.align_up(C.PRELUDE_SIZE + n):]


def assemble(header: Any, body: bytes, *, header_bytes: bytes | None = None, major: int = C.VERSION_MAJOR,
             minor: int = C.VERSION_MINOR, header_crc: int | None = None, lax: bool = False) -> bytes:
    """A file from a header (canonical JSON unless `header_bytes` is given; with `lax`, any JSON Python writes:
    NaN, huge integers, escaped lone surrogates) and a data area, with a correct header CRC unless `header_crc` is
    given."""
    if header_bytes is None and lax:
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h = canonical_json(header) if header_bytes is None else header_bytes
    head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, major, minor, 0, len(h))
    crc = zlib.crc32(h, zlib.crc32(head[16:24], zlib.crc32(head[0:12])))
    head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, major, minor, crc if header_crc is None else header_crc, len(h))
    pad = b"\0" * (C.align_up(len(head) + len(h)) - len(head) - len(h))
    return head + h + pad + body


def refresh_section_crcs(header: dict[str, Any], body: bytes) -> None:
    """Recompute every section CRC that lies inside `body`, in place (so data mutations get past the CRCs)."""
    entries = [e for key in ("blobs", "tensors") if isinstance(header.get(key), list) for e in header[key]]
    for entry in entries:
        try:
            off, n = int(entry["offset"]), int(entry["length"])
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
        if 0 <= off and 0 <= n and off + n <= len(body):
            entry["crc32"] = zlib.crc32(body[off:off + n])


def tensor_entry(header: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in header["tensors"] if t["name"] == name)


def tiny_model_bytes(*, seed: int = 0) -> bytes:
    """A complete, loadable Llama `.occ` file (vocab 320, 1 layer, width 16: about 45 KB), written with numpy only."""
    import os
    import tempfile

    from occrt.format.writer import OccWriter
    from occrt.model.config import ModelConfig
    from occrt.model.loader import tensor_shapes
    from tests.conftest import CHAT_TEMPLATE, build_tokenizer_json

    cfg = ModelConfig(architecture="llama", vocab_size=320, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=False)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tiny.occ")
        with OccWriter(path) as w:
            w.set_metadata("general.architecture", "llama")
            w.set_metadata("model.config", cfg.to_json())
            w.add_blob("tokenizer.json", build_tokenizer_json(cfg.vocab_size).encode())
            w.set_metadata("tokenizer.format", "huggingface-tokenizers-json")
            w.set_metadata("tokenizer.bos_token_id", 1)
            w.set_metadata("tokenizer.eos_token_ids", [2])
            w.set_metadata("tokenizer.add_bos_token", False)
            w.set_metadata("chat.template", CHAT_TEMPLATE)
            w.set_metadata("generation.defaults", {"temperature": 0.7, "top_p": 0.9})
            w.set_metadata("provenance", {"converter": "tests", "source_format": "huggingface", "source_name": "tiny",
                                          "source_files": []})
            for name, shape in tensor_shapes(cfg).items():
                w.add_tensor(name, RawCodec.encode((0.2 * rng.standard_normal(shape)).astype(np.float32)))
            w.finish()
        with open(path, "rb") as f:
            return f.read()
