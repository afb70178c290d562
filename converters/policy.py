"""Which codec each tensor gets, and with what choices: the converter's coding policy.

    raw (default)      every tensor in its source dtype (codec 0)
    --lossless         every tensor through the `planes` codec: exact values, entropy-coded bit fields (codec 2)
    --bpw B            linear layers of the blocks through `ecsq` (codec 1) at B bits per weight on average,
                       allocated across tensors by the equal-slope rule (converters/ratecontrol.py); the embedding
                       and output head through `ecsq` with per-row steps at --embed-bpw (their own budget, default
                       6); norms and biases raw float32
    --calib FILE       (with --bpw) inputs rotated by default; each tensor's distortion weighted by its loss
                       sensitivity (Fisher); codes rounded with error feedback under the inputs' second moments
                       (converters/calibrate.py, converters/gptq.py); --calib self: the same on text the source
                       model samples itself (no calibration data)
    --quantizer Q      (with --bpw) how the linear layers' codes are chosen: `trellis` (default; codec 3, tcq: a
                       Viterbi path down each column, ~0.9 dB less error than scalar rounding at the same rate) or
                       `scalar` (codec 1, ecsq: each code rounded alone). The rate control measures scalar curves at
                       step Δ either way; the trellis codes at δ = Δ/2, which costs the same rate (occrt/codecs/tcq.py)
    --tune-steps N     (with --calib; default 32 where the family allows it, 0: off) linear layers carry per-row
                       and per-column step multipliers, fitted after coding by distillation from the source model
                       (converters/finetune.py)

With --bpw, conversion makes two passes over the source: the first measures each tensor's rate-distortion curves
(`measure`), `finalize` allocates the budget, the second encodes (`encode`). Only one tensor is in memory at a time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from occrt.codecs import ans, tcq
from occrt.codecs.base import Encoded
from occrt.codecs.ecsq import CodingFrame, EcsqCodec
from occrt.codecs.planes import PlanesCodec
from occrt.codecs.raw import RawCodec
from occrt.codecs.rotation import RotationSpec, derive_seed, rotate
from occrt.converters.calibrate import DEFAULT_TOKENS, Calibration
from occrt.converters.gptq import cholesky_inverse_upper, ecsq_error_feedback, tcq_error_feedback
from occrt.converters.ratecontrol import Candidate, TensorCurves, allocate, measure, step_exponents
from occrt.converters.source import SourceTensor
from occrt.errors import ConversionError
from occrt.format.constants import bf16_bits_to_f32
from occrt.format.writer import canonical_json

ROTATIONS = ("none", "in", "out", "both")
QUANTIZERS = ("trellis", "scalar")
TRELLIS = (tcq.DEFAULT_STATES, tcq.DEFAULT_GENERATOR)  # (states, generator) of the trellis the converter writes
# Damping of H for error feedback, as a fraction of its mean diagonal. Measured on SmolLM2 at 3 bpw (rotated inputs,
# alice29 calibration, enwiki evaluation): 0.1 gave perplexity ratio 1.50, 0.01 gave 1.57, 0.001 gave 1.55.
# Re-measured with the trellis and the tuning (3 bpw, alice29): flat from 0.1 to 1.0 (1.225 / 1.220 / 1.228), 1.283 at
# 0.03 (benchmarks/quality_results.md, "Aimed at the MLP").
FEEDBACK_DAMP = 0.1
# ΔL ≈ ½ F_t ‖E_t‖² says weight each tensor's squared error by its Fisher F_t (power 1: steps scale as F^-1/2).
# Measured on SmolLM2 at 3 bpw with error feedback (same setting as above): power 1 gave 1.53, power 0.5 gave 1.43,
# no weighting 1.50; a per-tensor Fisher from a few thousand tokens is noisy, and shrinking it toward equal weights
# pays. Without error feedback (plain rounding) power 1 gave 1.76 and 0.5 gave 1.88, against 2.04 unweighted.
SENSITIVITY_POWER = 0.5
# With the end-to-end tuning after coding (--tune-steps, the default with --calib) the weighting shrinks further: the
# tuning's multipliers absorb much of the attention projections' error (SmolLM2 at 3 bpw, alice29, tuned: coding only
# q, k, v or o moves enwiki perplexity by < 0.6 %, only gate, up or down by 6-8 %), while their Fisher is the largest
# (v's ~12x the geometric mean). Enwiki perplexity ratio, seeds 0 / 1: power 0.5 gave 1.257 / 1.255, 0.25 gave
# 1.225 / 1.242, 0 gave 1.283 (seed 0) (benchmarks/quality_results.md, "Where the loss sits").
TUNED_SENSITIVITY_POWER = 0.25
_LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
# input spaces: projections reading the same activation share the input rotation's seed (the runtime rotates once)
_INPUT_SPACE = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "down": 3}
_OUTPUT_LABEL = {"q": 10, "k": 11, "v": 12, "o": 13, "gate": 14, "up": 15, "down": 16}
_EMBED_LAYER = 1 << 20  # layer label for the embedding/head rotations


@dataclass(frozen=True)
class CodingOptions:
    dtype: str = "auto"  # raw storage dtype: auto keeps the source's (dequantized GGUF blocks become f32)
    bpw: float | None = None  # target bits per weight of the blocks' linear layers (ecsq)
    lossless: bool = False
    rotate: str | None = None  # sides of each linear weight rotated; None: "in" with calibration, else "none"
    ranks: tuple[int, ...] = (0,)  # structural ranks offered to the rate control per tensor
    embed_bpw: float = 6.0  # bits per weight of the embedding and output head under --bpw
    quantizer: str = "trellis"  # the linear layers' codes: "trellis" (codec 3, tcq) or "scalar" (codec 1, ecsq)
    seed: int = 0  # rotation seeds derive from this, and --calib self's samples
    calib: str | None = None  # calibration text file: error-feedback rounding and sensitivity-weighted allocation
    calib_tokens: int = DEFAULT_TOKENS
    # with calib: steps of end-to-end tuning of the step multipliers (converters/finetune.py); None: the default,
    # finetune.DEFAULT_STEPS with --calib where the family's torch model has the linear layers as occrt stores them
    # (Llama, Mistral, Qwen, Gemma), else 0 (`for_source` decides)
    tune_steps: int | None = None
    # with calib: code the linear layers in order, each from the coded model's own inputs (converters/sequential.py);
    # None: the default, `sequential.by_default(bpw)` with --calib where the tuning is supported (`for_source`)
    sequential: bool | None = None
    correction: float = 0.0  # with sequential: the share α of the layers below's error each layer is fitted to undo
    chunk_size: int = ans.DEFAULT_CHUNK_SIZE

    def validate(self) -> None:
        if self.lossless and self.bpw is not None:
            raise ConversionError("--lossless and --bpw exclude each other")
        if self.bpw is not None and not 0.5 <= self.bpw <= 16:
            raise ConversionError(f"--bpw must be in [0.5, 16], got {self.bpw}")
        if not 0.5 <= self.embed_bpw <= 16:
            raise ConversionError(f"--embed-bpw must be in [0.5, 16], got {self.embed_bpw}")
        if self.calib is not None and self.bpw is None:
            raise ConversionError("--calib needs --bpw (calibration steers the lossy codec)")
        if not 16 <= self.calib_tokens <= 1 << 22:
            raise ConversionError(f"--calib-tokens must be in [16, 4194304], got {self.calib_tokens}")
        if self.tune_steps and self.calib is None:
            raise ConversionError("--tune-steps needs --calib (the tuning distils the source model on that text)")
        if self.tune_steps is not None and not 0 <= self.tune_steps <= 1 << 20:
            raise ConversionError(f"--tune-steps must be in [0, 1048576], got {self.tune_steps}")
        if self.sequential and self.calib is None:
            raise ConversionError("--sequential on needs --calib (it codes from the coded model's inputs on that text)")
        if not 0 <= self.correction <= 1:
            raise ConversionError(f"--correction must be in [0, 1], got {self.correction}")
        if self.correction and self.sequential is False:
            raise ConversionError("--correction needs sequential coding (--sequential on)")
        if self.quantizer not in QUANTIZERS:
            raise ConversionError(f"--quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise ConversionError(f"--rotate must be one of {ROTATIONS}, got {self.rotate!r}")
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise ConversionError(f"--ranks must be non-negative integers, got {self.ranks}")
        if not 0 <= self.seed < 1 << 53:
            raise ConversionError(f"--seed must be in [0, 2^53), got {self.seed}")


    def for_source(self, cfg) -> "CodingOptions":
        """These options with the defaults that depend on the model settled (tune_steps None -> a number,
        sequential None -> on or off): both need the family's torch model to hold the linear layers as occrt stores
        them."""
        from occrt.converters.finetune import DEFAULT_STEPS, tunable
        from occrt.converters.sequential import by_default

        supported = self.calib is not None and tunable(cfg)
        out = self
        if self.tune_steps is None:
            out = replace(out, tune_steps=DEFAULT_STEPS if supported else 0)
        if self.sequential is None:
            out = replace(out, sequential=supported and by_default(self.bpw))
        if out.sequential and not supported:
            raise ConversionError("--sequential on needs --calib and a Llama, Mistral, Qwen or Gemma model (the "
                                  "family's torch model must hold the linear layers as occrt stores them)")
        if out.correction and not out.sequential:
            raise ConversionError("--correction needs sequential coding (--sequential on; the default with --calib "
                                  "below 2.5 bits), which needs --calib and a Llama, Mistral, Qwen or Gemma model")
        return out


def as_f32(t: SourceTensor) -> np.ndarray:
    return bf16_bits_to_f32(t.data) if t.dtype == "bf16" else np.asarray(t.data, dtype=np.float32)


def record_bits(enc: Encoded) -> int:
    """Bits of a tensor's record: its payload and its params (steps, seeds, ranks live there)."""
    parts = enc.payload if isinstance(enc.payload, list) else [enc.payload]
    return 8 * (sum(memoryview(p).nbytes for p in parts) + len(canonical_json(enc.params)))


class Policy:
    def __init__(self, options: CodingOptions):
        options.validate()
        self.o = options
        self.curves: dict[str, TensorCurves] = {}
        self.embed_curves: dict[str, TensorCurves] = {}
        self.chosen: dict[str, tuple[dict[str, Any], float]] = {}  # name -> (frame options, step)
        self.report: dict[str, Any] = {}
        self.estimated_bits: dict[str, float] = {}  # name -> estimated record bits of each tensor `chosen` holds
        self.calibration: Calibration | None = None
        self.rotate = options.rotate or ("in" if options.calib else "none")
        self._fisher_scale = 1.0

    def use_calibration(self, calibration: Calibration) -> None:
        """Weight distortions by loss sensitivity and round with error feedback (before pass 1)."""
        self.calibration = calibration
        values = [v for v in calibration.fisher.values() if v > 0]
        # normalize by the geometric mean: the allocation only sees ratios, this keeps numbers near 1
        self._fisher_scale = float(np.exp(np.mean(np.log(values)))) if values else 1.0

    def importance(self, name: str) -> float:
        """Weight of tensor `name`'s squared error in the allocation: (F_t / geometric mean F) ** SENSITIVITY_POWER,
        or ** TUNED_SENSITIVITY_POWER where the tuning follows the coding."""
        if self.calibration is None or name not in self.calibration.fisher:
            return 1.0
        power = TUNED_SENSITIVITY_POWER if self.o.tune_steps else SENSITIVITY_POWER  # None (not settled): untuned
        return max(self.calibration.fisher[name] / self._fisher_scale, 1e-12) ** power

    def codec_id(self, name: str) -> int:
        """The lossy codec a tensor the rate control codes gets: tcq for the linear layers with --quantizer trellis,
        else ecsq (the embedding and head always: per-row steps at their own rate)."""
        if self.o.quantizer == "trellis" and self.is_linear(name):
            return tcq.TcqCodec.id
        return EcsqCodec.id

    @property
    def two_pass(self) -> bool:
        return self.o.bpw is not None

    @staticmethod
    def is_linear(name: str) -> bool:
        return _LINEAR.fullmatch(name) is not None

    # -- frames -------------------------------------------------------------------------------------------------------
    def _frame_options(self, name: str, shape: tuple[int, int]) -> list[dict[str, Any]]:
        n_out, n_in = shape
        if name in EMBEDDINGS:
            return [{"rank": 0, "rot_in": None, "rot_out": None, "row_scales": True}]
        m = _LINEAR.fullmatch(name)
        layer, proj = int(m.group(1)), m.group(3)
        rot_in = RotationSpec(1, derive_seed(self.o.seed, layer, _INPUT_SPACE[proj]), n_in)
        rot_out = RotationSpec(1, derive_seed(self.o.seed, layer, _OUTPUT_LABEL[proj]), n_out)
        sides = {"none": (None, None), "in": (rot_in, None), "out": (None, rot_out), "both": (rot_in, rot_out)}
        r_in, r_out = sides[self.rotate]
        ranks = sorted({min(r, n_out, n_in) for r in self.o.ranks})
        # with tuning, unit multipliers a = b = 1 from the start: the rate control counts their bytes, the tuning
        # (after every tensor is coded) fills in their values
        unit = bool(self.o.tune_steps)  # None (not settled by for_source) counts as off
        return [{"rank": r, "rot_in": r_in, "rot_out": r_out, "row_scales": False, "unit_scales": unit}
                for r in ranks]

    @staticmethod
    def _frame(w: np.ndarray, opts: dict[str, Any]) -> CodingFrame:
        row_scales = None
        if opts["row_scales"]:
            rms = np.empty(w.shape[0])  # (n_out,) per-row step multipliers; in blocks of rows (float64 copies)
            for a in range(0, w.shape[0], 256):
                rms[a:a + 256] = np.sqrt(np.mean(w[a:a + 256].astype(np.float64) ** 2, axis=1))
            row_scales = np.maximum(rms, max(float(rms.max()) * 1e-3, 1e-30))
            row_scales = np.clip(row_scales / float(np.median(row_scales)), 2.0 ** -14, 6e4)
        col_scales = None
        if opts.get("unit_scales"):
            row_scales, col_scales = np.ones(w.shape[0]), np.ones(w.shape[1])
        return CodingFrame(w, rank=opts["rank"], rot_in=opts["rot_in"], rot_out=opts["rot_out"],
                           row_scales=row_scales, col_scales=col_scales)

    @staticmethod
    def _feedback_factor(h: np.ndarray, frame: CodingFrame) -> np.ndarray:
        """H in the frame the codes live in: rotated like the inputs (x_r = Q_in x), scaled by the column steps."""
        if frame.rot_in is not None:
            h = rotate(rotate(h, frame.rot_in, axis=1), frame.rot_in, axis=0)
        if frame.b is not None:
            b = frame.b.astype(np.float64)
            h = h * np.outer(b, b)
        return cholesky_inverse_upper(h, damp=FEEDBACK_DAMP)

    # -- pass 1 -------------------------------------------------------------------------------------------------------
    def measure(self, t: SourceTensor) -> None:
        if not self.two_pass or not (self.is_linear(t.name) or t.name in EMBEDDINGS):
            return
        w = as_f32(t)
        importance = self.importance(t.name)
        curves = TensorCurves(t.name, int(w.size), importance)
        trellis = TRELLIS if self.codec_id(t.name) == tcq.TcqCodec.id else None
        grid = step_exponents(self.o.embed_bpw if t.name in EMBEDDINGS else self.o.bpw)
        for opts in self._frame_options(t.name, w.shape):
            cand: Candidate = measure(t.name, self._frame(w, opts), opts, importance=importance,
                                      chunk_size=self.o.chunk_size, trellis=trellis, exponents=grid)
            curves.candidates.append(cand)
        (self.embed_curves if t.name in EMBEDDINGS else self.curves)[t.name] = curves

    def finalize(self) -> None:
        if not self.two_pass:
            return
        for group, bpw, flag in ((self.curves, self.o.bpw, "--bpw"), (self.embed_curves, self.o.embed_bpw,
                                                                        "--embed-bpw")):
            names = list(group)
            n_params = sum(group[n].n_params for n in names)
            if not n_params:
                continue
            try:
                choices, lam = allocate([group[n] for n in names], bpw * n_params)
            except ValueError as e:
                raise ConversionError(f"{flag} {bpw:g}: {e}") from None
            for name, c in zip(names, choices):
                cand = group[name].candidates[c.candidate]
                self.chosen[name] = (cand.options, float(cand.steps[c.step_index]))
                self.estimated_bits[name] = c.bits  # the record's size as the rate control estimated it
        self.report["linear_params"] = sum(c.n_params for c in self.curves.values())

    # -- pass 2 -------------------------------------------------------------------------------------------------------
    def encode(self, t: SourceTensor, hessian: np.ndarray | None = None) -> Encoded:
        """`t`'s record. `hessian`: the input second moments its error feedback weighs the error by, in place of the
        calibration's (converters/sequential.py: the coded model's own inputs)."""
        if self.o.lossless:
            dtype = "f32" if t.dtype == "quantized" else t.dtype
            return PlanesCodec.encode(t.data if t.dtype != "quantized" else as_f32(t), dtype=dtype,
                                      chunk_size=self.o.chunk_size)
        if t.name in self.chosen:
            opts, step = self.chosen[t.name]
            frame = self._frame(as_f32(t), opts)
            h = hessian
            if h is None and self.calibration is not None:
                h = self.calibration.hessian_for(t.name)
            u = None if h is None else self._feedback_factor(h, frame)
            if self.codec_id(t.name) == tcq.TcqCodec.id:
                # the scalar step Δ the rate control chose, as a trellis on the fine grid δ = Δ/2 (same rate)
                fine = step / 2
                codes = None if u is None else tcq_error_feedback(frame.residual, u, fine,
                                                                  tcq.parity_table(*TRELLIS))
                return frame.encode(fine, chunk_size=self.o.chunk_size, codes=codes, trellis=TRELLIS)
            codes = None if u is None else ecsq_error_feedback(frame.residual, u, step)
            return frame.encode(step, chunk_size=self.o.chunk_size, codes=codes)
        if self.two_pass:
            return RawCodec.encode(as_f32(t), dtype="f32")  # norms and biases: small, kept exact
        dtype = self.o.dtype
        if dtype == "auto":
            dtype = "f32" if t.dtype == "quantized" else t.dtype
        if t.dtype == "bf16" and dtype != "bf16":
            return RawCodec.encode(as_f32(t), dtype=dtype)
        return RawCodec.encode(t.data, dtype=dtype)
