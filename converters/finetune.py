"""Tuning the step multipliers end to end: codes frozen, scales fitted by distillation.

Error-feedback rounding (converters/gptq.py) makes each layer as good as its own output error allows, but the errors of
a few hundred layers compound through the network, and nothing in a per-layer objective sees that. This step looks at
the whole model once every tensor is coded. An ecsq or tcq record (format_spec/occ.md 5.2, 5.4) rebuilds

    W = Q_outᵀ · (U·V + Δ · diag(a) · C · diag(b)) · Q_in

where the integer codes C (tcq: the fine codes K on its trellis, Δ = δ) carry almost all the bits and a (n_out,), b (n_in,) are f16 step multipliers. With C, Δ,
U, V and the rotations fixed, W is differentiable in a and b, so we fit

    min over log a, log b (every coded linear layer):
        mean over calibration tokens of KL(p_source(· | context) ‖ p_coded(· | context))

with Adam, the source model as the teacher on the calibration's windows: its last hidden states come from the
calibration's forward pass (converters/calibrate.py), so only its head is evaluated here and its linear weights are
never loaded for the tuning. The codes' ANS streams are reused
byte for byte: the rate does not move (a and b are side data the rate control already counted, because frames are
built with unit multipliers when tuning is on), only the decoder's dequantization changes. The norm gains stay as the
source has them: tuning them too (they are stored raw, so it would cost no bits) fitted the calibration text and hurt
the evaluation text on SmolLM2 (benchmarks/quality_results.md).

This is the same family of fixes as learned step sizes / scale fine-tuning in the quantization literature; it needs
the calibration text (`occrt convert --calib FILE --tune-steps N`), and torch, like the calibration itself.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from occrt.codecs.base import Encoded
from occrt.codecs.ecsq import EcsqCodec, Layout, to_f16
from occrt.codecs.registry import codec_for
from occrt.codecs.tcq import TcqCodec
from occrt.codecs.rotation import RotationSpec
from occrt.converters.source import MallocThresholds

DEFAULT_STEPS = 32
DEFAULT_LR = 3e-3  # Adam on the log-multipliers, the peak of the schedule at 3 bits (benchmarks/quality_results.md)


def peak_rate(bpw: float) -> float:
    """The schedule's peak for a file of `bpw` bits per linear weight: DEFAULT_LR up to 3 bits, halved per bit more.

    Adam moves each log-multiplier by about the learning rate per step, whatever its gradient's size, while the
    correction a row or column needs scales with its quantization error relative to the weights, ~2^-bpw. Measured on
    SmolLM2 with the cosine schedule (enwiki perplexity ratio): at 3.0 bits (alice29) a peak of 3e-3 gave 1.257 and
    1e-3 gave 1.273; at 4.0 bits (--calib self) 3e-3 gave 1.048 and 1e-3 gave 1.045. Below 3 bits the peak does not
    grow: at 2.0 bits (alice29) a peak of 6e-3 gave 2.714 against 2.611 at a constant 3e-3."""
    return DEFAULT_LR * 2.0 ** min(0.0, 3.0 - bpw)


def decays(bpw: float, steps: int = DEFAULT_STEPS) -> bool:
    """Whether the rate decays (`learning_rate`) for `steps` tuning steps on a file of `bpw` bits per linear weight:
    from 2.5 bits up, and below that when there are more steps than DEFAULT_STEPS. Far from the source 32 steps are
    still descending when the cosine has shrunk them: with alice29 on SmolLM2 (enwiki perplexity ratio) the decay
    gave 2.720 at 2.0 bits against 2.611 at a constant 3e-3, while at 2.5 bits it gave 1.568 against 1.580 (and
    1.257 against 1.263 at 3.0). With more steps the constant rate ends on large, noisy ones: at 2.0 bits with 16,384
    Wikipedia tokens, 128 steps at 3e-3 gave 1.761 and 96 steps along the cosine 1.662 (32 at 3e-3: 1.710;
    benchmarks/quality_results.md, "Where 3.0 bits stands")."""
    return bpw >= 2.5 or steps > DEFAULT_STEPS


def learning_rate(step: int, steps: int, peak: float = DEFAULT_LR, decay: bool = True) -> float:
    """Adam's learning rate at `step` (0-based) of `steps`: a half cosine from `peak` down toward 0. At a constant
    rate the last steps are as large as the first, and one window's update can undo what the earlier ones fitted
    (--calib self at 4.0 bits on SmolLM2, constant 3e-3: the KL on the windows seen before rose from ~0.06 to ~0.2
    nats per token on the second pass); decaying the rate ends the tuning on small steps: enwiki perplexity ratio
    1.086 -> 1.048 there, 1.263 -> 1.257 with alice29 at 3.0 bits (benchmarks/quality_results.md)."""
    if not decay:
        return peak
    return 0.5 * peak * (1.0 + math.cos(math.pi * step / steps))


_BF16_EXACT = 256  # bfloat16's 8-bit significand holds every integer of magnitude up to 2^8 exactly


def product_dtype():
    """The type the student's coded products are computed in: bfloat16 where the CPU multiplies it natively
    (AVX512-BF16 or AMX), float32 elsewhere (bfloat16 is emulated there, slower than float32).

    The codes are exact in bfloat16 (`_BF16_EXACT`); the scaled activations round to 8 significant bits (a relative
    error of ~2^-9 against the ~2^-bpw the quantization leaves), and the products accumulate in float32. On a
    Sapphire Rapids core a (512 x 1536) x (1536 x 576) product takes 0.44 ms instead of 2.7 ms. With `HeadKL`, 24
    tuning steps on SmolLM2 at 3.0 bits took 63 s instead of 87 s, and the perplexity after 128 steps moved by 0.02 %
    (benchmarks/quality_results.md, "A faster tuning step")."""
    import torch

    native = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.bfloat16 if any(f is not None and f() for f in native) else torch.float32


def _side(enc: Encoded) -> bytes:
    return bytes(enc.payload[0])


class _Rotation:
    """One input rotation Q of the student. q, k and v (gate and up) read the same activation one after the other and
    share their rotation's seed (converters/policy.py), so Q x is computed once for them: `last` (shared by all the
    rotations of a student) remembers the latest (rotation, x, Q x). One slot only, keyed by the tensor object it
    holds (a new activation is never taken for the old one), and emptied after each forward and backward
    (`Student.forget`): a cached activation keeps its layer's autograd graph alive."""

    def __init__(self, hadamard, last: list):
        self.hadamard = hadamard
        self.last = last  # [rotation, x, Q x] or []

    def rotate(self, x):
        if not (self.last and self.last[0] is self and self.last[1] is x):
            self.last[:] = [self, x, self.hadamard.rotate(x)]
        return self.last[2]

    def unrotate(self, y):
        return self.hadamard.unrotate(y)


class _CodedLinear:
    """One ecsq or tcq record opened for tuning, computing its layer's output from the compact form, as the runtime does
    (occrt/model/decoder_torch.py): x_r = Q_in x, y = Q_outᵀ(((x_r ⊙ b) (Δ·C)ᵀ) ⊙ a + (x_r Vᵀ) Uᵀ) + bias, with
    a = a0·exp(log_a), b = b0·exp(log_b). The codes stay integers (the smallest type that holds them); C is widened
    inside the call, so with checkpointed layers no float copy of the model's weights is kept. `dtype`: the type of
    the product's operands, float32 or bfloat16 (`product_dtype`); bfloat16 holds every integer up to 256 exactly, so
    a record with larger codes is multiplied in float32 whatever `dtype` says."""

    def __init__(self, enc: Encoded, hadamards: dict, torch, dtype=None):
        from occrt.kernels.hadamard import TorchHadamard

        n_out, n_in = enc.shape
        params = enc.params
        self.layout = layout = Layout.of(n_out, n_in, params)
        if layout.row_scales is None or layout.col_scales is None:
            raise ValueError("tuning needs records built with row and column multipliers")
        side = np.frombuffer(_side(enc), dtype=np.uint8)
        whole = np.frombuffer(b"".join(bytes(p) for p in enc.payload), dtype=np.uint8)
        codes = codec_for(enc.codec).fine_codes(whole, layout, (n_out, n_in), params)  # ecsq's C or tcq's K
        peak = int(np.abs(codes).max(initial=0))
        small = np.int8 if peak < 1 << 7 else np.int16 if peak < 1 << 15 else np.int32
        self.codes = torch.from_numpy(codes.astype(small))
        self.step = float(params["step"])
        self.dtype = torch.float32 if dtype is None or peak > _BF16_EXACT else dtype

        def f16(part):
            start, n_bytes = part
            return torch.from_numpy(side[start:start + n_bytes].view("<f2").astype(np.float32))

        self.a0, self.b0 = f16(layout.row_scales), f16(layout.col_scales)
        r = params["rank"]
        self.u = f16(layout.u).reshape(n_out, r) if r else None
        self.v = f16(layout.v).reshape(r, n_in) if r else None

        def hadamard(spec_json):
            if spec_json is None:
                return None
            spec = RotationSpec.from_json(spec_json)
            if spec not in hadamards:
                hadamards[spec] = _Rotation(TorchHadamard(spec), hadamards.setdefault("last", []))
            return hadamards[spec]

        self.q_in, self.q_out = hadamard(params["rot_in"]), hadamard(params["rot_out"])
        self.log_a = torch.zeros(n_out, requires_grad=True)
        self.log_b = torch.zeros(n_in, requires_grad=True)

    def __call__(self, x, bias):
        import torch

        x_r = x if self.q_in is None else self.q_in.rotate(x)
        y = ((x_r * (self.b0 * torch.exp(self.log_b))).to(self.dtype) @ self.codes.to(self.dtype).T).float()
        y = y * (self.a0 * (self.step * torch.exp(self.log_a)))
        if self.u is not None:
            y = y + (x_r @ self.v.T) @ self.u.T
        if self.q_out is not None:
            y = self.q_out.unrotate(y)
        return y if bias is None else y + bias


def _with_scales(enc: Encoded, c: _CodedLinear) -> Encoded:
    """The record with its multipliers replaced by the tuned ones (codes, step, structure unchanged)."""
    side = bytearray(_side(enc))
    for part, base, log in ((c.layout.row_scales, c.a0, c.log_a), (c.layout.col_scales, c.b0, c.log_b)):
        values = to_f16((base * log.detach().exp()).numpy())
        values = np.where(values.astype(np.float32) > 0, values, np.float16(2.0 ** -24))  # the codec needs a > 0
        side[part[0]:part[0] + part[1]] = values.astype("<f2").tobytes()
    return Encoded(codec=enc.codec, codec_version=enc.codec_version, dtype=enc.dtype, shape=enc.shape,
                   payload=[bytes(side), enc.payload[1]], params=enc.params)


class HeadKL:
    """KL(p_teacher ‖ p_student) summed over positions, from both models' last hidden states, and its gradient in the
    student's, in closed form, a slice of positions at a time in three (slice, vocab) float32 buffers.

    With z the student's logits and log q = z - logsumexp(z), d/dz Σ_v p_v (log p_v - log q_v) = q - p (a row of p
    sums to 1), so no graph over the vocabulary is built: autograd's slices of logits, log-softmaxes and their
    gradients were ~10 fresh (128 x 49152) tensors per slice on SmolLM2, each mapped and faulted in anew (0.63 s of a
    3.5 s tuning step). Gemma's final soft cap z = c·tanh(l/c) multiplies the gradient by dz/dl = 1 - (z/c)². The
    logits stay float32: a softmax over 49,152 of them feels their absolute error, which bfloat16 (~0.06 at |z| = 30)
    would put near the KL itself at 4 bits. The buffers live for one call: kept, their 75 MB would sit on top of the
    layers' backward, the tuning's peak."""

    def __init__(self, model, teacher_weight, chunk: int):
        self.head = model.get_output_embeddings()  # its weight is the student's while the student is switched on
        self.teacher_weight = teacher_weight  # (vocab, d) the source's head
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.chunk = chunk

    def _logits(self, hidden, weight, out):
        import torch

        torch.mm(hidden, weight.t(), out=out)  # (m, vocab)
        if self.head.bias is not None:
            out += self.head.bias
        if self.softcap:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def backward(self, hidden, hidden_teacher, scale: float) -> float:
        """Backpropagate scale · Σ_positions KL into the graph that made `hidden` (T, d); `hidden_teacher` (T, d) is
        the source model's. Returns scale · Σ KL."""
        import torch

        weight = self.head.weight  # (vocab, d)
        buffers = [torch.empty(min(self.chunk, len(hidden)), weight.shape[0]) for _ in range(3)]  # (slice, vocab)
        total = 0.0
        with torch.no_grad():
            grad = torch.empty_like(hidden)  # (T, d)
            for a in range(0, len(hidden), self.chunk):
                b = min(a + self.chunk, len(hidden))
                log_p, p, g = (buf[:b - a] for buf in buffers)
                self._logits(hidden_teacher[a:b], self.teacher_weight, log_p)
                log_p -= log_p.amax(dim=-1, keepdim=True)
                torch.exp(log_p, out=p)
                norm = p.sum(dim=-1, keepdim=True)
                p /= norm
                log_p -= norm.log_()
                self._logits(hidden.detach()[a:b], weight, g)
                g -= g.amax(dim=-1, keepdim=True)
                kl = torch.dot(p.view(-1), log_p.view(-1)) - torch.dot(p.view(-1), g.view(-1))  # + Σ log Σ exp below
                g.exp_()
                norm = g.sum(dim=-1, keepdim=True)
                total += float(kl + norm.log().sum())
                g /= norm
                g -= p  # q - p: the gradient in the (capped) logits
                if self.softcap:
                    cap = self._logits(hidden.detach()[a:b], weight, log_p).div_(self.softcap)
                    g *= cap.square_().neg_().add_(1.0)
                torch.mm(g, weight, out=grad[a:b]).mul_(scale)
        del buffers, log_p, p, g
        torch.autograd.backward(hidden, grad)
        return scale * total


class Student:
    """The coded model inside the source's torch model (`teacher`), without a second copy of it.

    Each coded linear module computes from its record (`_CodedLinear`) while `student` is on, from the source's
    weights otherwise; the embedding (and a tied head) use the decoded `fixed` tensors while it is on. Use as a
    context manager: the modules are restored on exit. `dtype`: the coded products' type (`_CodedLinear`)."""

    def __init__(self, teacher, records: dict[str, Encoded], fixed: dict[str, np.ndarray], dtype=None):
        import torch

        self.model = teacher
        self.on = False
        self._rotations: dict = {"last": []}  # spec -> _Rotation, and their shared slot
        self.coded = {name: _CodedLinear(enc, self._rotations, torch, dtype) for name, enc in records.items()
                      if enc.codec in (EcsqCodec.id, TcqCodec.id)}
        self._modules = [(teacher.get_submodule(name.rsplit(".", 1)[0]), c) for name, c in self.coded.items()]
        self._swaps = []  # (module, attribute, source parameter, coded tensor)
        for name, value in fixed.items():
            original = teacher.get_parameter(name)
            coded = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            self._swaps += [(m, attr, original, coded) for m in teacher.modules()
                            for attr, p in m._parameters.items() if p is original]  # a tied head too

    def __enter__(self) -> "Student":
        import torch

        for module, coded in self._modules:
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"tuning needs plain linear modules, got {type(module).__name__}")

            def forward(x, module=module, coded=coded):
                return coded(x, module.bias) if self.on else torch.nn.functional.linear(x, module.weight, module.bias)

            module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        self.set(False)
        self.forget()
        for module, _ in self._modules:
            del module.forward  # back to the class's method

    def set(self, on: bool) -> None:
        """Switch between the coded model (True) and the source model (False)."""
        self.on = on
        for module, attr, original, coded in self._swaps:
            module._parameters[attr] = coded if on else original

    def forget(self) -> None:
        """Drop the rotated activation the student remembers (call after each forward and backward)."""
        self._rotations["last"].clear()

    def parameters(self) -> list:
        return [c.log_a for c in self.coded.values()] + [c.log_b for c in self.coded.values()]

    def hidden(self, ids):
        """Last hidden states (T, d) of the model currently switched on."""
        try:
            return self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        finally:
            self.forget()


def tune_scales(teacher, records: dict[str, Encoded], fixed: dict[str, np.ndarray], windows: list[list[int]], *,
                teacher_hidden: list[np.ndarray], steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                decay: bool = True, log: Callable[[str], None] = lambda msg: None,
                heap: MallocThresholds | None = None, dtype=None) -> dict[str, Encoded]:
    """Fit the multipliers of `records` (ecsq, name -> record, HF parameter names of `teacher`) so the coded model's
    next-token distributions follow `teacher`'s on `windows`.

    `fixed`: the other coded tensors as the decoder rebuilds them (e.g. the embedding), substituted as constants.
    `lr`: the peak of the learning-rate schedule (`learning_rate`), `decay`: whether it decays. Returns the tuned
    records. `teacher` is the source's torch model (float32); its coded linear weights are never used and may be
    left on the meta device (converters/calibrate.calibration_model), since `teacher_hidden` holds the source model's
    last hidden states (T, d) per window (the calibration's second-moment pass computes them).
    Memory: the teacher's other tensors, the codes as small integers, the hidden states, the layers' inputs
    (checkpointed layers) and one slice of logits at a time (converters/calibrate.py's helpers). `heap`: glibc's
    malloc thresholds as the command line installs them: the steps reuse the heap (`checkpointed_layers`).
    `dtype`: the coded products' type (None: `product_dtype()`)."""
    import torch

    from occrt.converters.calibrate import HEAD_CHUNK, checkpointed_layers

    if steps <= 0 or not windows:
        return records
    started = time.monotonic()
    for p in teacher.parameters():
        p.requires_grad_(False)
    kl = HeadKL(teacher, teacher.get_output_embeddings().weight, HEAD_CHUNK)  # the source's head, before the swap
    if len(teacher_hidden) != len(windows):
        raise ValueError(f"{len(teacher_hidden)} teacher hidden states for {len(windows)} windows")
    targets = [torch.from_numpy(np.asarray(h, dtype=np.float32)) for h in teacher_hidden]  # a few MB for all
    dtype = product_dtype() if dtype is None else dtype
    log(f"tuning: coded products in {str(dtype).removeprefix('torch.')}")

    first = last = None
    with Student(teacher, records, fixed, dtype) as student, \
            checkpointed_layers(teacher, teacher.config.num_hidden_layers, heap):
        optimizer = torch.optim.Adam(student.parameters(), lr=lr)
        student.set(True)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr, decay)
            k = step % len(windows)
            ids = torch.tensor([windows[k]])
            hidden_teacher = targets[k]
            optimizer.zero_grad(set_to_none=True)
            hidden = student.hidden(ids)
            value = kl.backward(hidden, hidden_teacher, 1.0 / len(hidden))
            student.forget()  # the checkpointed layers' recomputation rotated again
            optimizer.step()
            del hidden
            first = value if first is None else first
            last = value
            log(f"tuning: step {step + 1}/{steps}, KL {value:.4f} nats/token ({time.monotonic() - started:.0f} s)")
        student.set(False)
    log(f"tuning: KL {first:.4f} -> {last:.4f} nats/token over {steps} steps ({time.monotonic() - started:.0f} s)")
    out = dict(records)
    for name, c in student.coded.items():
        out[name] = _with_scales(records[name], c)
    return out


def tunable(cfg) -> bool:
    """Whether the family's torch model holds every coded linear layer as occrt stores it (one plain matrix under
    the same name): the student swaps those modules' forwards (Llama, Mistral, Qwen2/3, Gemma 2/3: yes; Phi-3's
    fused q/k/v and gate/up, GPT-2's Conv1D: no)."""
    from occrt.converters.architectures import for_architecture
    from occrt.converters.calibrate import _LINEAR

    rules = [r for r in for_architecture(cfg.architecture).hf_rules(cfg) if _LINEAR.fullmatch(r.parts[0])]
    return bool(rules) and all(r.parts == (r.source,) and not (r.transpose or r.offset or r.permute_heads)
                               for r in rules)


def decode_record(enc: Encoded) -> np.ndarray:
    """The tensor a record decodes to (for the constants of the student model)."""
    parts = enc.payload if isinstance(enc.payload, list) else [enc.payload]
    payload = memoryview(b"".join(bytes(p) for p in parts))
    return codec_for(enc.codec).decode(payload, version=enc.codec_version, dtype=enc.dtype, shape=enc.shape,
                                       params=enc.params)
