"""`occrt convert SRC --dry-run`: what a conversion would write, without writing anything.

For each tensor: the codec it would get, its bits per weight and its record's estimated size; then the totals and
the file's estimated size. How each size is known:

    raw (default)   exact: elements x the stored dtype's size
    --bpw B         the rate control's own estimate at the step it chose (converters/ratecontrol.py: codes'
                    entropy on a sample, exact side data, table, chunk index, params); --calib's calibration and
                    the measure pass run as in a real conversion, the encoding does not. Norms and biases: raw
                    float32, exact
    --lossless      each bit-field stream's ANS size from its histogram (ans.estimate_bits), without coding

The header is estimated from the metadata the conversion writes and one entry per tensor (their offsets, lengths
and checksums at their widest), and every section is aligned as the writer aligns it. The tensors are read (and
checked: names, shapes, finite values) as in a conversion, so a dry run finds what a conversion would refuse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from occrt.codecs.ecsq import EcsqCodec
from occrt.codecs.planes import PlanesCodec, estimate_payload_bytes
from occrt.codecs.raw import RawCodec
from occrt.codecs.tcq import TcqCodec
from occrt.converters.convert import ConvertOptions, checked_pass, file_metadata, opened, prepare
from occrt.converters.policy import Policy
from occrt.converters.source import SourceTensor
from occrt.errors import ConversionError
from occrt.format import constants as C
from occrt.format.writer import canonical_json
from occrt.model.loader import tensor_shapes

_CODEC_NAMES = {RawCodec.id: "raw", EcsqCodec.id: "ecsq", PlanesCodec.id: "planes", TcqCodec.id: "tcq"}
_TYPICAL_CRC = 2 ** 31  # CRC-32 values are uniform in [0, 2^32): nine in ten have 10 digits


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    codec: int
    dtype: str  # the stored dtype
    record_bytes: float  # the payload (exact for raw); for ecsq and tcq with its params JSON, as the rate control counts it
    exact: bool

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bpw(self) -> float:
        return 8 * self.record_bytes / max(self.n_weights, 1)


@dataclass
class ConversionPlan:
    source: str
    mode: str  # "raw" | "lossless" | "bpw B"
    tensors: list[PlannedTensor] = field(default_factory=list)
    header_bytes: int = 0
    blob_bytes: int = 0

    @property
    def n_weights(self) -> int:
        return sum(t.n_weights for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        """The data area: the tokenizer blob, then every record, each at the writer's alignment."""
        offset = self.blob_bytes
        for t in self.tensors:
            offset = C.align_up(offset) + round(t.record_bytes)
        return offset

    @property
    def file_bytes(self) -> int:
        return C.align_up(C.PRELUDE_SIZE + self.header_bytes) + self.data_bytes

    def linear_bpw(self, policy_is_linear: Callable[[str], bool]) -> float:
        linear = [t for t in self.tensors if policy_is_linear(t.name)]
        n = sum(t.n_weights for t in linear)
        return 8 * sum(t.record_bytes for t in linear) / n if n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "mode": self.mode, "estimated_file_bytes": self.file_bytes,
                "header_bytes": self.header_bytes, "data_bytes": self.data_bytes, "parameters": self.n_weights,
                "tensors": [{"name": t.name, "shape": list(t.shape), "codec": _CODEC_NAMES[t.codec],
                             "dtype": t.dtype, "bits_per_weight": t.bpw, "estimated_bytes": round(t.record_bytes),
                             "exact": t.exact} for t in self.tensors]}


def plan_conversion(src: str, options: ConvertOptions = ConvertOptions(), *,
                    log: Callable[[str], None] | None = None, progress: bool = False) -> ConversionPlan:
    """The plan of `convert(src, out, options)`; writes nothing."""
    import sys

    log = log or (lambda msg: print(msg, file=sys.stderr))
    with opened(src, options) as (source, options, policy):
        mode = "lossless" if options.lossless else f"bpw {options.bpw:g}" if options.bpw is not None else "raw"
        plan = ConversionPlan(source=src, mode=mode, blob_bytes=len(source.tokenizer.tokenizer_json))
        prepare(source, options, policy, log, progress)
        expected = tensor_shapes(source.config)
        for t in checked_pass(source, expected, "plan", progress=progress):
            plan.tensors.append(_plan_tensor(t, options, policy))
            del t
        missing = sorted(set(expected) - {t.name for t in plan.tensors})
        if missing:
            raise ConversionError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
        plan.header_bytes = _header_estimate(plan, file_metadata(source, options, policy))
        return plan


def _plan_tensor(t: SourceTensor, options: ConvertOptions, policy: Policy) -> PlannedTensor:
    """Mirrors Policy.encode's choice of codec."""
    shape = tuple(int(d) for d in t.data.shape)
    n = int(t.data.size)
    if options.lossless:
        dtype = "f32" if t.dtype == "quantized" else t.dtype
        data = t.data if t.dtype != "quantized" else t.data.astype(np.float32)
        size = estimate_payload_bytes(data, dtype=dtype, chunk_size=options.chunk_size)
        return PlannedTensor(t.name, shape, PlanesCodec.id, dtype, size, False)
    if t.name in policy.chosen:
        return PlannedTensor(t.name, shape, policy.codec_id(t.name), "f32", policy.estimated_bits[t.name] / 8, False)
    if policy.two_pass:
        dtype = "f32"
    else:
        dtype = options.dtype if options.dtype != "auto" else "f32" if t.dtype == "quantized" else t.dtype
    return PlannedTensor(t.name, shape, RawCodec.id, dtype, n * C.DTYPES[dtype][0], True)


def _header_estimate(plan: ConversionPlan, metadata: dict[str, Any]) -> int:
    """The header's JSON size: the metadata, and each section's entry laid out as the writer lays it out (raw and
    planes params are `{}`; ecsq and tcq params are counted in their record sizes; checksums at a typical 10 digits)."""
    offset = plan.blob_bytes  # the blob is the first section, at offset 0
    entries = []
    for t in plan.tensors:
        offset = C.align_up(offset)
        entries.append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "codec": t.codec,
                        "codec_version": 1, "params": {}, "offset": offset, "length": round(t.record_bytes),
                        "crc32": _TYPICAL_CRC})
        offset += round(t.record_bytes)
    blobs = [{"name": "tokenizer.json", "offset": 0, "length": plan.blob_bytes, "crc32": _TYPICAL_CRC}]
    return len(canonical_json({"metadata": metadata, "blobs": blobs, "tensors": entries, "data_length": offset}))


def render(plan: ConversionPlan, is_linear: Callable[[str], bool]) -> str:
    mib = 1 << 20
    rows = [f"plan for {plan.source} ({plan.mode}); nothing written", "",
            f"{'tensor':<48} {'shape':>14} {'codec':>6} {'dtype':>5} {'bits/w':>7} {'bytes':>13}"]
    for t in plan.tensors:
        approx = "" if t.exact else "~"
        rows.append(f"{t.name:<48} {'x'.join(map(str, t.shape)):>14} {_CODEC_NAMES[t.codec]:>6} {t.dtype:>5} "
                    f"{t.bpw:>7.3f} {approx + format(round(t.record_bytes), ','):>13}")
    lin = plan.linear_bpw(is_linear)
    rows += ["",
             f"{len(plan.tensors)} tensors, {plan.n_weights:,} parameters; linear layers {lin:.3f} bits per weight",
             f"header ~{plan.header_bytes:,} bytes, tokenizer {plan.blob_bytes:,} bytes, data ~{plan.data_bytes:,} bytes",
             f"estimated file size: {plan.file_bytes:,} bytes ({plan.file_bytes / mib:.1f} MiB, "
             f"{8 * plan.file_bytes / max(plan.n_weights, 1):.3f} bits per parameter overall)"]
    return "\n".join(rows) + "\n"
