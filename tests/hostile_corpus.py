"""The hostile files of `format_spec/test_vectors/hostile/`: how each is made, why a reader must reject it, and
what the rejection says. `tests/test_hostile.py` checks that every file there is rejected with `FormatError` (for the
reason given here) and that the folder holds exactly what this module makes.

Regenerate the folder (and its README) after adding a case:

    python -m tests.hostile_corpus

Every case starts from `base()`: a valid file of raw tensors only, independent of the codec registry, so adding a codec
never changes these bytes. A codec's own hostile payloads belong here too, as cases built on a file holding that codec.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from occrt.codecs.raw import RawCodec
from occrt.format import constants as C
from tests.occ_samples import assemble, split, tensor_entry

FOLDER = Path(__file__).resolve().parent.parent / "format_spec" / "test_vectors" / "hostile"


def base() -> bytes:
    """A valid 1 KB file: metadata, a tokenizer blob, an empty blob, and raw f32 / f16 / bf16 / empty / scalar tensors."""
    import tempfile

    from occrt.format.writer import OccWriter

    rng = np.random.default_rng(2024)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "base.occ")
        with OccWriter(path) as w:
            w.set_metadata("general.architecture", "llama")
            w.set_metadata("note", {"text": "héllo", "n": [1, 2.5]})
            w.add_blob("tokenizer.json", b'{"version":"1.0"}')
            w.add_blob("empty", b"")
            w.add_tensor("a", RawCodec.encode(rng.standard_normal((5, 7)).astype(np.float32)))
            w.add_tensor("b", RawCodec.encode(rng.standard_normal((3, 4)).astype(np.float32), dtype="f16"))
            w.add_tensor("c", RawCodec.encode(rng.standard_normal((10,)).astype(np.float32), dtype="bf16"))
            w.add_tensor("d", RawCodec.encode(np.zeros((0, 3), np.float32)))
            w.add_tensor("e", RawCodec.encode(np.array(1.5, np.float32)))
            w.finish()
        return Path(path).read_bytes()


def _header(fn: Callable[[dict[str, Any]], Any]) -> Callable[[bytes], bytes]:
    """A case that edits the parsed header; the file is reassembled with a correct header CRC."""
    def make(data: bytes) -> bytes:
        header, body = split(data)
        fn(header)
        return assemble(header, body)
    return make


def _header_text(fn: Callable[[str], str]) -> Callable[[bytes], bytes]:
    """A case that edits the header's JSON text (for what a JSON encoder cannot write); correct header CRC."""
    def make(data: bytes) -> bytes:
        header, body = split(data)
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return assemble(None, body, header_bytes=fn(text).encode())
    return make


def _header_bytes(fn: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A case that edits the header's bytes (for what is not even text); correct header CRC."""
    def make(data: bytes) -> bytes:
        header, body = split(data)
        return assemble(None, body, header_bytes=fn(json.dumps(header, sort_keys=True, separators=(",", ":"),
                                                                ensure_ascii=False).encode()))
    return make


def _prelude(fmt: str, at: int, value: int) -> Callable[[bytes], bytes]:
    def make(data: bytes) -> bytes:
        return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]
    return make


def _set(tensor: str, /, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: tensor_entry(h, tensor).update(fields)


def _poke_body(offset_of: Callable[[dict[str, Any]], int], *, header_padding: bool = False) -> Callable[[bytes], bytes]:
    """Set one padding byte to 1 (the header's padding, or the byte after a section)."""
    def make(data: bytes) -> bytes:
        header, _ = split(data)
        n = struct.unpack_from("<Q", data, 16)[0]
        at = C.PRELUDE_SIZE + n if header_padding else C.align_up(C.PRELUDE_SIZE + n) + offset_of(header)
        return data[:at] + b"\x01" + data[at + 1:]
    return make


def _data_crc_of_empty(h: dict[str, Any]) -> None:
    next(b for b in h["blobs"] if b["name"] == "empty")["crc32"] = 1


def _deep(levels: int) -> Callable[[bytes], bytes]:
    # written as text: a JSON encoder itself refuses to nest this deep
    return _header_text(lambda t: t.replace("2.5", "[" * levels + "0" + "]" * levels))


def _gap(h: dict[str, Any]) -> None:
    # every section from "c" on moves 64 bytes later: the data area then has a 64-byte hole
    start = tensor_entry(h, "c")["offset"]
    for e in h["blobs"] + h["tensors"]:
        if e["offset"] >= start:
            e["offset"] += 64
    h["data_length"] += 64


def _gap_body(data: bytes) -> bytes:
    header, body = split(data)
    start = tensor_entry(header, "c")["offset"]
    _gap(header)
    return assemble(header, body[:start] + b"\0" * 64 + body[start:])


# name -> (reason, how to make it from base(), a fragment of the error message)
CASES: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "empty": ("zero bytes: no prelude", lambda s: b"", "shorter than"),
    "truncated-prelude": ("the file ends inside the 24-byte prelude", lambda s: s[:23], "shorter than"),
    "wrong-magic": ("the magic is GGUF's, not .occ's", lambda s: b"GGUF" + s[4:], "wrong magic"),
    "text-mode-newlines": ("CR LF in the magic translated to LF (a text-mode transfer)",
                           lambda s: s[:4] + b"\n" + s[6:], "wrong magic"),
    "major-version-2": ("version_major 2: this reader reads 1.x only", _prelude("<H", 8, 2), "version 2"),
    "header-length-1": ("header_length 1, below the minimum of 2", _prelude("<Q", 16, 1), "header length"),
    "header-length-huge": ("header_length 2^60: over the 16 MiB limit, rejected before any allocation",
                           _prelude("<Q", 16, 1 << 60), "header length"),
    "header-length-max-u64": ("header_length 2^64 - 1: overflows 64-bit offset arithmetic",
                              _prelude("<Q", 16, (1 << 64) - 1), "header length"),
    "header-past-end": ("header_length within the limit but past the end of the file",
                        lambda s: _prelude("<Q", 16, len(s))(s), "past the end"),
    "header-crc-zeroed": ("header_crc32 does not match", lambda s: s[:12] + b"\0\0\0\0" + s[16:], "header checksum"),
    "minor-version-flipped": ("version_minor changed without updating the header CRC (the CRC covers the prelude)",
                              _prelude("<H", 10, 1), "header checksum"),
    "section-crc-mismatch": ("the last data byte flipped: the section CRC does not match",
                             lambda s: s[:-1] + bytes([s[-1] ^ 0x01]), "checksum mismatch"),
    "empty-section-crc": ("a zero-length section whose stored CRC is not CRC-32 of nothing (0)",
                          _header(_data_crc_of_empty), "checksum mismatch"),
    "header-not-utf8": ("the header holds the byte 0xFF (not UTF-8)",
                        _header_bytes(lambda b: b.replace("é".encode(), b"\xff\xff")), "not UTF-8"),
    "header-not-json": ("the header is not JSON", _header_text(lambda t: "{not json" + " " * (len(t) - 9)),
                        "not valid JSON"),
    "header-is-array": ("the header is a JSON array, not an object", _header_text(lambda t: "[" + t + "]"),
                        "not a JSON object"),
    "duplicate-json-key": ("an object repeats a key (readers would disagree on which one counts)",
                           _header_text(lambda t: t.replace('{"general.architecture"', '{"n":1,"n":2,'
                                                            '"general.architecture"', 1)), "duplicate key"),
    "nan-in-metadata": ("NaN is not JSON", _header_text(lambda t: t.replace("2.5", "NaN")), "NaN"),
    "infinity-in-metadata": ("1e400 overflows a double to infinity", _header_text(lambda t: t.replace("2.5", "1e400")),
                             "not finite"),
    "integer-too-long": ("a 30-digit integer: wider than 64 bits", _header_text(lambda t: t.replace("2.5", "9" * 30)),
                         "integer literal"),
    "integer-5000-digits": ("a 5000-digit integer: int parsing must not cost quadratic time",
                            _header_text(lambda t: t.replace("2.5", "7" * 5000)), "integer literal"),
    "integer-over-u64": ("an integer of 2^64, just past the 64-bit range",
                         _header_text(lambda t: t.replace("2.5", str(1 << 64))), "outside"),
    "nesting-33": ("the header nests 33 containers deep (limit 32)", _deep(29), "nests deeper"),
    "nesting-10000": ("metadata nested 10 000 levels deep: must not exhaust the parser's stack", _deep(10000),
                      "header JSON rejected|nests deeper"),
    "lone-surrogate-name": ("a tensor name holding a lone surrogate (\\ud800): not Unicode text",
                            _header_text(lambda t: t.replace('"name":"a"', '"name":"a\\ud800"')), "lone surrogate"),
    "lone-surrogate-key": ("a metadata key holding a lone surrogate",
                           _header_text(lambda t: t.replace('"note"', '"no\\udfffte"')), "lone surrogate"),
    "control-char-name": ("a tensor name with a newline in it", _header(_set("b", name="a\nb")), "control"),
    "empty-name": ("an empty tensor name", _header(_set("b", name="")), "name must be"),
    "name-513-bytes": ("a tensor name of 513 bytes (limit 512)", _header(_set("b", name="n" * 513)), "name must be"),
    "duplicate-tensor-name": ("two tensors named 'a'", _header(_set("b", name="a")), "duplicate tensor"),
    "duplicate-blob-name": ("two blobs named 'tokenizer.json'",
                            _header(lambda h: h["blobs"][1].update(name="tokenizer.json")), "duplicate blob"),
    "unknown-header-key": ("a header key version 1.0 does not define", _header(lambda h: h.update(extra=1)),
                           "unknown keys"),
    "missing-header-key": ("the header lacks 'blobs'", _header(lambda h: h.pop("blobs")), "lacks"),
    "metadata-not-object": ("'metadata' is a list", _header(lambda h: h.update(metadata=[])), "not an object"),
    "tensors-not-list": ("'tensors' is an object", _header(lambda h: h.update(tensors={})), "must be a list"),
    "unknown-tensor-key": ("a tensor entry with a key version 1.0 does not define", _header(_set("a", extra=0)),
                           "unknown keys"),
    "missing-tensor-key": ("a tensor entry without 'crc32'", _header(lambda h: tensor_entry(h, "a").pop("crc32")),
                           "lacks"),
    "offset-out-of-bounds": ("a section offset 2^40, past the data area", _header(_set("a", offset=1 << 40)),
                             "offset"),
    "length-out-of-bounds": ("a section length of 10^9 bytes in a 1 KB file", _header(_set("c", length=10 ** 9)),
                             "length"),
    "offset-plus-length-wraps": ("offset 2^63 and length 2^63: their sum wraps to 0 in 64-bit arithmetic",
                                 _header(_set("a", offset=1 << 63, length=1 << 63)), "must be an integer in"),
    "unaligned-offset": ("a section offset that is not a multiple of 64", _header(_set("a", offset=3)), "multiple of"),
    "overlapping-sections": ("tensor 'b' claims the bytes of tensor 'a'",
                             _header(lambda h: tensor_entry(h, "b").update(offset=tensor_entry(h, "a")["offset"])),
                             "overlaps"),
    "gap-between-sections": ("64 unused bytes between two sections (every byte must have one meaning)", _gap_body,
                             "gap before"),
    "nonzero-header-padding": ("a padding byte after the header is not zero", _poke_body(None, header_padding=True),
                               "padding"),
    "nonzero-section-padding": ("a padding byte after tensor 'a' is not zero",
                                _poke_body(lambda h: tensor_entry(h, "a")["offset"] + tensor_entry(h, "a")["length"]),
                                "padding"),
    "trailing-bytes": ("64 bytes after the data area", lambda s: s + b"\0" * 64, "describes"),
    "truncated-data": ("the file ends 10 bytes early", lambda s: s[:-10], "describes"),
    "data-length-lies": ("data_length 64 bytes larger than the data area",
                         _header(lambda h: h.update(data_length=h["data_length"] + 64)), "describes"),
    "negative-dimension": ("shape [-5, -7]", _header(_set("a", shape=[-5, -7])), "shape"),
    "nine-dimensions": ("9 dimensions (limit 8)", _header(_set("d", shape=[1] * 8 + [0])), "dimensions"),
    "dimension-2-41": ("one dimension of 2^41 (limit 2^40)", _header(_set("d", shape=[0, 1 << 41])), "shape"),
    "elements-2-41": ("shape [2^21, 2^20]: each dimension within 2^40, their product 2^41 over the element limit",
                      _header(_set("a", shape=[1 << 21, 1 << 20])), "over the limit"),
    "shape-disagrees-with-length": ("shape [7, 6] for 140 bytes of f32 (35 elements)", _header(_set("a", shape=[7, 6])),
                                    "needs"),
    "shape-not-list": ("shape is a string", _header(_set("a", shape="5x7")), "shape must be"),
    "unknown-dtype": ("dtype 'f64' is not a version-1 dtype", _header(_set("a", dtype="f64")), "unknown dtype"),
    "unknown-codec": ("codec id 999 is in no registry", _header(_set("a", codec=999)), "unknown codec"),
    "unknown-codec-version": ("raw codec version 9", _header(_set("a", codec_version=9)), "no version 9"),
    "raw-with-params": ("the raw codec takes no params", _header(_set("a", params={"scale": 2})), "no params"),
    "params-not-object": ("params is a list", _header(_set("a", params=[])), "params must be"),
    "boolean-as-integer": ("length true: a boolean is not an integer", _header(_set("e", length=True)), "integer"),
    "float-as-integer": ("offset 0.0: a float is not an integer", _header(_set("a", offset=0.0)), "integer"),
    "crc-over-32-bits": ("a crc32 of 2^32", _header(_set("a", crc32=1 << 32)), "crc32"),
}


def build() -> dict[str, bytes]:
    source = base()
    return {name: make(source) for name, (_, make, _) in CASES.items()}


def readme() -> str:
    lines = ["# Hostile `.occ` files", "",
             "Every file here MUST be rejected by a reader with its format error (`occrt.errors.FormatError`), never",
             "another exception, a hang or a large allocation. Made by `python -m tests.hostile_corpus` from one small",
             "valid file (raw tensors, a tokenizer blob, metadata); `tests/test_hostile.py` opens and verifies each.",
             "One line per file: why it is hostile.", ""]
    lines += [f"- `{name}.occ`: {reason}" for name, (reason, _, _) in CASES.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for old in FOLDER.glob("*.occ"):
        old.unlink()
    for name, data in build().items():
        (FOLDER / f"{name}.occ").write_bytes(data)
    (FOLDER / "README.md").write_text(readme())
    print(f"wrote {len(CASES)} files to {FOLDER}")


if __name__ == "__main__":
    main()
