"""`occrt inspect`: a file's header, metadata and tensor table, as a dict (for --json) or as text."""
from __future__ import annotations

from typing import Any

from occrt.codecs.registry import CODECS
from occrt.format.reader import OccFile

_LONG_METADATA = ("chat.template",)


def describe(occ: OccFile) -> dict[str, Any]:
    tensors = []
    for name, e in occ.tensors.items():
        codec = CODECS[e.codec]
        info = {"name": name, "dtype": e.dtype, "shape": list(e.shape), "codec": codec.name, "codec_id": e.codec,
                "codec_version": e.codec_version, "bytes": e.length,
                "bits_per_weight": 8 * e.length / e.n_elements if e.n_elements else 0.0}
        summarize = getattr(codec, "summarize", None)
        if summarize is not None:
            info.update(summarize(e.params, e.shape, occ.payload(e)))
        tensors.append(info)
    return {
        "path": occ.path,
        "version": f"{occ.version[0]}.{occ.version[1]}",
        "file_bytes": occ.size,
        "header_bytes": occ.header_length,
        "metadata": occ.metadata,
        "blobs": [{"name": b.name, "bytes": b.length} for b in occ.blobs.values()],
        "tensors": tensors,
    }


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}: .occ version {info['version']}, {info['file_bytes']:,} bytes "
             f"(header {info['header_bytes']:,})", "", "metadata:"]
    for key, value in sorted(info["metadata"].items()):
        text = repr(value) if not isinstance(value, str) else value
        if key in _LONG_METADATA and isinstance(value, str):
            text = f"<{len(value)} characters>"
        elif len(text) > 200:
            text = text[:197] + "..."
        lines.append(f"  {key}: {text}")
    lines += ["", "blobs:"] + [f"  {b['name']}: {b['bytes']:,} bytes" for b in info["blobs"]]
    rows = info["tensors"]
    extra_keys = sorted({k for r in rows for k in r} - {"name", "dtype", "shape", "codec", "codec_id",
                                                         "codec_version", "bytes", "bits_per_weight"})
    width = max((len(r["name"]) for r in rows), default=4)
    head = f"  {'tensor':<{width}}  {'shape':<14} {'dtype':<5} {'codec':<10} {'bytes':>12} {'bpw':>6}"
    head += "".join(f" {k:>10}" for k in extra_keys)
    lines += ["", f"tensors ({len(rows)}):", head]
    total_bytes = total_elems = 0
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) or "scalar"
        line = (f"  {r['name']:<{width}}  {shape:<14} {r['dtype']:<5} {r['codec']:<10} {r['bytes']:>12,} "
                f"{r['bits_per_weight']:>6.2f}")
        for k in extra_keys:
            v = r.get(k, "")
            line += f" {v:>10.4g}" if isinstance(v, float) else f" {str(v):>10}"
        lines.append(line)
        total_bytes += r["bytes"]
        n = 1
        for d in r["shape"]:
            n *= d
        total_elems += n
    bpw = 8 * total_bytes / total_elems if total_elems else 0.0
    lines += ["", f"total: {len(rows)} tensors, {total_elems:,} elements, {total_bytes:,} bytes, {bpw:.3f} bits/weight",
              ""]
    return "\n".join(lines)
