"""`occrt verify`: check a whole `.occ` file before trusting it.

    summary = verify_file("smol.occ")    # raises FormatError (naming the byte offset) on the first fault
    print(render(summary))

Checks, in order: everything `OccFile.open` validates (prelude, header CRC, header JSON and limits, index, layout);
every section's CRC; every tensor decodes to its declared shape; then the model the file holds (what `occrt.load`
checks besides decoding: config, tokenizer and its token ids, generation defaults, the tensor set and shapes).
"""
from __future__ import annotations

import os
import time
from typing import Any

from occrt.codecs.registry import CODECS
from occrt.errors import FormatError
from occrt.format.reader import OccFile


def verify_file(path: str | os.PathLike) -> dict[str, Any]:
    """Verify `path`; returns a summary (counts, bytes, per-codec tensors and bytes, the model's shape, seconds)."""
    from occrt.api import check_model

    start = time.perf_counter()
    path = os.fspath(path)
    with OccFile.open(path) as occ:
        counts = occ.verify()
        try:
            config, _, _ = check_model(occ)
        except FormatError as e:
            raise FormatError(e.reason, e.offset, path=path) from None
        codecs: dict[str, dict[str, int]] = {}
        for entry in occ.tensors.values():
            row = codecs.setdefault(CODECS[entry.codec].name, {"tensors": 0, "bytes": 0, "elements": 0})
            row["tensors"] += 1
            row["bytes"] += entry.length
            row["elements"] += entry.n_elements
        return {"path": path, "version": f"{occ.version[0]}.{occ.version[1]}", "file_bytes": occ.size,
                "header_bytes": occ.header_length, "blobs": counts["blobs"], "tensors": counts["tensors"],
                "elements": counts["elements"], "codecs": dict(sorted(codecs.items())),
                "model": {"architecture": config.architecture, "layers": config.num_hidden_layers,
                          "hidden_size": config.hidden_size, "vocab_size": config.vocab_size},
                "seconds": time.perf_counter() - start}


def render(s: dict[str, Any]) -> str:
    m = s["model"]
    lines = [f"{s['path']}: OK",
             f"  .occ {s['version']}, {s['file_bytes']:,} bytes (header {s['header_bytes']:,}); every checksum matches",
             f"  {s['tensors']} tensors decoded ({s['elements']:,} elements), {s['blobs']} "
             f"blob{'' if s['blobs'] == 1 else 's'}",
             f"  model: {m['architecture']}, {m['layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}",
             "  codec        tensors          bytes   bits/weight"]
    for name, row in s["codecs"].items():
        bpw = 8 * row["bytes"] / row["elements"] if row["elements"] else 0.0
        lines.append(f"  {name:<10} {row['tensors']:>9} {row['bytes']:>14,} {bpw:>13.3f}")
    lines.append(f"  verified in {s['seconds']:.2f} s")
    return "\n".join(lines) + "\n"
