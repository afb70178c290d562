"""Tuning the step multipliers end to end: codes frozen, scales fitted by distillation.

Error-feedback rounding (converters/gptq.py) makes each layer as good as its own output error allows, but the errors of
a few hundred layers compound through the network, and nothing in a per-layer objective sees that. This step looks at
the whole model once every tensor is coded. An ecsq record (format_spec/occ.md 5.2) rebuilds

    W = Q_outᵀ · (U·V + Δ · diag(a) · C · diag(b)) · Q_in

where the integer codes C carry almost all the bits and a (n_out,), b (n_in,) are f16 step multipliers. With C, Δ,
U, V and the rotations fixed, W is differentiable in a and b, so we fit

    min over log a, log b (every coded linear layer):
        mean over calibration tokens of KL(p_source(· | context) ‖ p_coded(· | context))

with Adam, the source model (float32, torch) as the teacher on the same windows. The codes' ANS streams are reused
byte for byte: the rate does not move (a and b are side data the rate control already counted, because frames are
built with unit multipliers when tuning is on), only the decoder's dequantization changes. The norm gains stay as the
source has them: tuning them too (they are stored raw, so it would cost no bits) fitted the calibration text and hurt
the evaluation text on SmolLM2 (benchmarks/quality_results.md).

This is the same family of fixes as learned step sizes / scale fine-tuning in the quantization literature; it needs
the calibration text (`occrt convert --calib FILE --tune-steps N`), and torch, like the calibration itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from occrt.codecs import ans
from occrt.codecs.base import Encoded
from occrt.codecs.ecsq import ECSQ, EcsqCodec, Layout, to_f16
from occrt.codecs.rotation import RotationSpec, unrotate

DEFAULT_STEPS = 32
DEFAULT_LR = 3e-3  # Adam on the log-multipliers: the one setting tried on SmolLM2 (benchmarks/quality_results.md)


@dataclass
class _Coded:
    """One ecsq record opened for tuning (torch tensors; `codes` already multiplied by the step)."""

    codes: "object"  # (n_out, n_in) float32: Δ·C
    a0: "object"  # (n_out,) float32
    b0: "object"  # (n_in,) float32
    structure: "object | None"  # (n_out, n_in) float32: U·V, or None for rank 0
    q_in: "object | None"  # (n_in, n_in): W = W_r · q_in
    q_out_t: "object | None"  # (n_out, n_out): W = q_out_t · W_r
    layout: Layout
    log_a: "object" = None
    log_b: "object" = None


def _side(enc: Encoded) -> bytes:
    return bytes(enc.payload[0])


def _open_record(enc: Encoded, torch) -> _Coded:
    n_out, n_in = enc.shape
    params = enc.params
    layout = Layout.of(n_out, n_in, params)
    if layout.row_scales is None or layout.col_scales is None:
        raise ValueError("tuning needs records built with row and column multipliers")
    side = np.frombuffer(_side(enc), dtype=np.uint8)
    block = np.frombuffer(bytes(enc.payload[1]), dtype=np.uint8)
    codes = ans.decode_symbols(block, n_symbols=n_out * n_in).reshape(n_out, n_in)

    def f16(part):
        start, n_bytes = part
        return side[start:start + n_bytes].view("<f2").astype(np.float32)

    structure = None
    if params["rank"]:
        r = params["rank"]
        structure = torch.from_numpy(f16(layout.u).reshape(n_out, r) @ f16(layout.v).reshape(r, n_in))

    def dense(spec_json, n, axis):
        if spec_json is None:
            return None
        return torch.from_numpy(unrotate(np.eye(n, dtype=np.float32), RotationSpec.from_json(spec_json), axis=axis))

    return _Coded(codes=torch.from_numpy(codes.astype(np.float32) * np.float32(params["step"])),
                  a0=torch.from_numpy(f16(layout.row_scales)), b0=torch.from_numpy(f16(layout.col_scales)),
                  structure=structure, q_in=dense(params["rot_in"], n_in, 1), q_out_t=dense(params["rot_out"], n_out, 0),
                  layout=layout)


def _weight(c: _Coded, torch):
    w = c.codes * (c.a0 * torch.exp(c.log_a))[:, None] * (c.b0 * torch.exp(c.log_b))[None, :]  # (n_out, n_in)
    if c.structure is not None:
        w = w + c.structure
    if c.q_in is not None:
        w = w @ c.q_in
    if c.q_out_t is not None:
        w = c.q_out_t @ w
    return w


def _with_scales(enc: Encoded, c: _Coded) -> Encoded:
    """The record with its multipliers replaced by the tuned ones (codes, step, structure unchanged)."""
    side = bytearray(_side(enc))
    for part, base, log in ((c.layout.row_scales, c.a0, c.log_a), (c.layout.col_scales, c.b0, c.log_b)):
        values = to_f16((base * log.detach().exp()).numpy())
        values = np.where(values.astype(np.float32) > 0, values, np.float16(2.0 ** -24))  # the codec needs a > 0
        side[part[0]:part[0] + part[1]] = values.astype("<f2").tobytes()
    return Encoded(codec=enc.codec, codec_version=enc.codec_version, dtype=enc.dtype, shape=enc.shape,
                   payload=[bytes(side), enc.payload[1]], params=enc.params)


def tune_scales(teacher, records: dict[str, Encoded], fixed: dict[str, np.ndarray], windows: list[list[int]], *,
                steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                log: Callable[[str], None] = lambda msg: None) -> dict[str, Encoded]:
    """Fit the multipliers of `records` (ecsq, name -> record, HF parameter names of `teacher`) so the coded model's
    next-token distributions follow `teacher`'s on `windows`.

    `fixed`: the other coded tensors as the decoder rebuilds them (e.g. the embedding), substituted as constants.
    Returns the tuned records. `teacher` is a torch module in float32 whose parameters are the source's."""
    import torch
    from torch.func import functional_call

    if steps <= 0 or not windows:
        return records
    started = time.monotonic()
    for p in teacher.parameters():
        p.requires_grad_(False)
    coded = {}
    for name, enc in records.items():
        if enc.codec != EcsqCodec.id:
            continue
        c = _open_record(enc, torch)
        c.log_a = torch.zeros(enc.shape[0], requires_grad=True)
        c.log_b = torch.zeros(enc.shape[1], requires_grad=True)
        coded[name] = c
    constants = {n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in fixed.items()}
    params = [c.log_a for c in coded.values()] + [c.log_b for c in coded.values()]
    optimizer = torch.optim.Adam(params, lr=lr)

    def student(ids):
        overrides = {**constants, **{n: _weight(c, torch) for n, c in coded.items()}}
        return functional_call(teacher, overrides, (ids,), strict=False).logits[0].float()

    first = last = None
    for step in range(steps):
        ids = torch.tensor([windows[step % len(windows)]])
        with torch.no_grad():
            target = torch.log_softmax(teacher(ids).logits[0].float(), dim=-1)  # (T, vocab)
        predicted = torch.log_softmax(student(ids), dim=-1)
        kl = (target.exp() * (target - predicted)).sum(dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        kl.backward()
        optimizer.step()
        value = float(kl.detach())
        first = value if first is None else first
        last = value
        log(f"tuning: step {step + 1}/{steps}, KL {value:.4f} nats/token ({time.monotonic() - started:.0f} s)")
    log(f"tuning: KL {first:.4f} -> {last:.4f} nats/token over {steps} steps ({time.monotonic() - started:.0f} s)")
    out = dict(records)
    for name, c in coded.items():
        out[name] = _with_scales(records[name], c)
    return out


def decode_record(enc: Encoded) -> np.ndarray:
    """The tensor a record decodes to (for the constants of the student model)."""
    parts = enc.payload if isinstance(enc.payload, list) else [enc.payload]
    payload = memoryview(b"".join(bytes(p) for p in parts))
    return ECSQ.decode(payload, version=enc.codec_version, dtype=enc.dtype, shape=enc.shape, params=enc.params)
